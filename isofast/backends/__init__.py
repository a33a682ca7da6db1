"""Backends: who runs the ops (``mlp_pullback``, ``mlp_hutchinson``, the generic path's reductions
and the spectral ops); :mod:`isofast.dispatch` says which backend implements which op.

``"torch"`` (pure PyTorch, always present) is the reference twin every other backend is tested
against. Compiled backends register here by name and are imported only when asked about, so
importing isofast never compiles anything and never needs a GPU:

- ``"cpu"``: the C++ extension in ``csrc/`` (CPU tensors);
- ``"cuda"``: the CUDA kernels of the same extension (CUDA tensors);
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

:func:`available` says which can run; :func:`use` forces one inside a ``with`` block (per thread).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from isofast.backends.base import Backend

#: backend name -> module whose ``BACKEND`` attribute is the :class:`Backend` instance.
REGISTRY: dict[str, str] = {
    "torch": "isofast.backends.torch_backend",
    "cpu": "isofast.backends.cpu_backend",
    "cuda": "isofast.backends.cuda_backend",
    "triton": "isofast.backends.triton_backend",
}

#: Preference order of ``backend="auto"`` by device type; the first available one wins.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

#: Per-thread settings of enclosing use() and precision() blocks: attributes ``forced`` and
#: ``precision``, each a tuple (innermost last) that a block replaces and restores, never mutates.
#: A threading.local read with getattr is what torch.compile traces and guards on (it cannot
#: trace ContextVar.get or threading.get_ident).
_local = threading.local()
_cache: dict[str, Backend | None] = {}
_status: dict[str, tuple[bool, str]] = {}


def get(name: str) -> Backend | None:
    """The backend called ``name``, or ``None`` when its module is not part of this build."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {sorted(REGISTRY)}, got {name!r}")
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(REGISTRY[name]).BACKEND
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("isofast"):
                raise
            _cache[name] = None
    return _cache[name]


def status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for one backend; the reason says what is missing.

    Answers are cached for the process (plan() asks on every call, and torch.compile traces a
    dict lookup where it could not trace an extension loader); :func:`refresh` forgets them.
    """
    if name not in _status:
        backend = get(name)
        _status[name] = (False, "not part of this build") if backend is None else backend.availability()
    return _status[name]


def refresh() -> None:
    """Forget cached availability, e.g. after building the C++ extension in this process."""
    _status.clear()


def available() -> dict[str, bool]:
    """Which backends can run in this process, e.g. ``{"torch": True, "triton": False, ...}``."""
    return {name: status(name)[0] for name in REGISTRY}


@contextmanager
def use(name: str) -> Iterator[Backend]:
    """Force backend ``name`` for fused-path calls inside the block (raises if it cannot run).

    The setting is per thread (other threads are unaffected); blocks nest."""
    ok, why = status(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {why}")
    outer = getattr(_local, "forced", ())
    _local.forced = (*outer, name)
    try:
        yield get(name)  # type: ignore[misc]
    finally:
        _local.forced = outer


#: GEMM operand precisions of the compiled backends, for :func:`precision`.
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


@contextmanager
def precision(mode: str) -> Iterator[str]:
    """GEMM operand precision of the compiled GPU backends inside the block.

    ``"fp32"`` (the default): fp32 operands, ieee fp32 products, fp32 accumulation.
    ``"tf32"``: tensor-core tf32 operands (about 10 mantissa bits), fp32 accumulation.
    ``"bf16"``: bf16 operands (8 mantissa bits), fp32 accumulation.
    Traces, Grams and the loss are always accumulated in fp32. The mode in effect when an op's
    forward runs is also used by its backward. The torch twin ignores it (its matmuls follow
    ``torch.backends.cuda.matmul.allow_tf32``). Per thread, like :func:`use`; blocks nest.
    """
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {mode!r}")
    outer = getattr(_local, "precision", ())
    _local.precision = (*outer, mode)
    try:
        yield mode
    finally:
        _local.precision = outer


def current_precision() -> str:
    """The GEMM precision set by an enclosing :func:`precision` block (``"fp32"`` outside one)."""
    modes = getattr(_local, "precision", ())
    return modes[-1] if modes else "fp32"


def forced() -> str | None:
    """The backend forced by an enclosing :func:`use` in this thread, if any."""
    names = getattr(_local, "forced", ())
    return names[-1] if names else None


def select(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Backend, str]:
    """The backend the fused path takes for tensors of ``dtype`` on ``device``, and why."""
    name = forced()
    if name is not None:
        backend = get(name)
        assert backend is not None  # use() checked it
        ok, why = backend.supports(device, dtype)
        if not ok:
            raise ValueError(f"backend {name!r} (forced by isofast.backends.use) cannot run here: {why}")
        return backend, f"forced by isofast.backends.use({name!r})"
    skipped = []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        ok, why = status(name)
        if ok:
            backend = get(name)
            assert backend is not None
            ok, why = backend.supports(device, dtype)
        if ok:
            note = f" ({'; '.join(skipped)})" if skipped else ""
            return backend, f"first available for {device.type} {str(dtype).removeprefix('torch.')} tensors{note}"  # type: ignore[return-value]
        skipped.append(f"{name}: {why}")
    raise AssertionError("the torch backend supports every device")  # pragma: no cover


__all__ = [
    "AUTO_ORDER", "PRECISIONS", "REGISTRY", "Backend", "available", "current_precision", "forced", "get",
    "precision", "refresh", "select", "status", "use",
]
