"""Backends: who runs the fused MLP ops (``mlp_pullback``, ``mlp_hutchinson``).

``"torch"`` (pure PyTorch, always present) is the reference twin every other backend is tested
against. Compiled backends register here by name and are imported only when asked about, so
importing isofast never compiles anything and never needs a GPU:

- ``"cpu"``: the C++ extension in ``csrc/`` (CPU tensors);
- ``"cuda"``: the CUDA kernels of the same extension (CUDA tensors);
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

:func:`available` says which can run; :func:`use` forces one inside a ``with`` block.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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

_forced: ContextVar[str | None] = ContextVar("isofast_backend", default=None)
_cache: dict[str, Backend | None] = {}


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
    """``(available, reason)`` for one backend; the reason says what is missing."""
    backend = get(name)
    if backend is None:
        return False, "not part of this build"
    return backend.availability()


def available() -> dict[str, bool]:
    """Which backends can run in this process, e.g. ``{"torch": True, "triton": False, ...}``."""
    return {name: status(name)[0] for name in REGISTRY}


@contextmanager
def use(name: str) -> Iterator[Backend]:
    """Force backend ``name`` for fused-path calls inside the block (raises if it cannot run)."""
    ok, why = status(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {why}")
    token = _forced.set(name)
    try:
        yield get(name)  # type: ignore[misc]
    finally:
        _forced.reset(token)


def forced() -> str | None:
    """The backend forced by an enclosing :func:`use`, if any."""
    return _forced.get()


def select(device: torch.device) -> tuple[Backend, str]:
    """The backend the fused path takes for tensors on ``device``, and why."""
    name = forced()
    if name is not None:
        backend = get(name)
        assert backend is not None  # use() checked it
        ok, why = backend.supports(device)
        if not ok:
            raise ValueError(f"backend {name!r} (forced by isofast.backends.use) cannot run here: {why}")
        return backend, f"forced by isofast.backends.use({name!r})"
    skipped = []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        ok, why = status(name)
        if ok:
            backend = get(name)
            assert backend is not None
            ok, why = backend.supports(device)
        if ok:
            note = f" ({'; '.join(skipped)})" if skipped else ""
            return backend, f"first available for {device.type} tensors{note}"  # type: ignore[return-value]
        skipped.append(f"{name}: {why}")
    raise AssertionError("the torch backend supports every device")  # pragma: no cover


__all__ = ["Backend", "REGISTRY", "AUTO_ORDER", "available", "forced", "get", "select", "status", "use"]
