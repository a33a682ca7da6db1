"""Which implementation of each op runs on each backend: one table, explicit fallbacks.

Every op below :mod:`isofast.ops` and :mod:`isofast.spectral` runs through this table. For each
backend (``isofast.backends.REGISTRY``) and each op in :data:`OPS`, :data:`TABLE` holds either

- :class:`Native`: the backend implements the op itself, as its method of the op's name
  (``mlp_pullback_forward`` and ``mlp_pullback_backward`` for the autograd ops ``mlp_*``); or
- :class:`Fallback`: the backend lacks the op and names, in order, the backends whose
  implementation runs instead (the first that is available and takes the tensors; ``"torch"``
  last, which always does). No backend inherits another's methods.

:func:`select` picks the backend of a call (forced by :func:`isofast.backends.use`, else
``AUTO_ORDER``) and follows its entry; :func:`describe` says what it chose, for ``isofast.plan``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from isofast import backends
from isofast.backends.base import Backend

#: The ops, by name: the fused MLP ops (autograd functions over forward and backward methods), the
#: generic path's reductions of tangent images, and the batched spectral ops.
MLP_OPS = ("mlp_pullback", "mlp_hutchinson")
OPS = (*MLP_OPS, "tangent_gram", "tangent_sqnorm", "eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean")


@dataclass(frozen=True)
class Native:
    """The backend's own implementation; ``label`` says what runs (for ``plan``)."""

    label: str


@dataclass(frozen=True)
class Fallback:
    """The backend lacks the op: the first of ``to`` that can run the tensors runs it; ``why`` says
    why the backend has none."""

    to: tuple[str, ...]
    why: str


_SPECTRAL = ("eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean")
# The kernels take m <= 32 and, but for logdet's, no gradient; torch.linalg runs the rest (_spectral_ext).
_EXT_SPECTRAL = "C++ extension; torch.linalg for m > 32 or a gradient"
_CUDA_SPECTRAL = "CUDA kernels; torch.linalg for m > 32 or a gradient"

TABLE: dict[str, dict[str, Native | Fallback]] = {
    "torch": {
        "mlp_pullback": Native("PyTorch twin"),
        "mlp_hutchinson": Native("PyTorch twin"),
        "tangent_gram": Native("PyTorch"),
        "tangent_sqnorm": Native("PyTorch"),
        **{op: Native("torch.linalg") for op in _SPECTRAL},
    },
    "cpu": {
        "mlp_pullback": Native("C++ extension"),
        "mlp_hutchinson": Native("C++ extension"),
        "tangent_gram": Fallback(("torch",), "no CPU reduction kernel: one batched GEMM is the reduction"),
        "tangent_sqnorm": Fallback(("torch",), "no CPU reduction kernel"),
        **{op: Native(_EXT_SPECTRAL) for op in _SPECTRAL},
    },
    "cuda": {
        "mlp_pullback": Native("ATen GEMMs and CUDA epilogues"),
        "mlp_hutchinson": Fallback(("torch",), "no CUDA Hutchinson kernels: the torch twin on CUDA tensors"),
        "tangent_gram": Native("CUDA kernel"),
        "tangent_sqnorm": Native("CUDA kernel"),
        **{op: Native(_CUDA_SPECTRAL) for op in _SPECTRAL},
    },
    "triton": {
        "mlp_pullback": Native("Triton kernels"),
        "mlp_hutchinson": Native("Triton kernels"),
        **{op: Fallback(("cuda", "torch"), "no Triton kernel") for op in ("tangent_gram", "tangent_sqnorm", *_SPECTRAL)},
    },
}


@dataclass(frozen=True)
class Choice:
    """The implementation an op runs: ``impl`` is the backend whose method runs, chosen for the
    call's ``backend`` (they differ where ``backend``'s entry is a :class:`Fallback`)."""

    op: str
    backend: str
    impl: Backend
    label: str
    why: str

    def __str__(self) -> str:
        via = "" if self.impl.name == self.backend else f", declared fallback of {self.backend}: {self.why}"
        return f"{self.op}: {self.impl.name} ({self.label}{via})"


def _runs(name: str, device: torch.device, dtype: torch.dtype) -> Backend | None:
    """Backend ``name`` when it is available and takes tensors of ``dtype`` on ``device``."""
    if not backends.status(name)[0]:
        return None
    backend = backends.get(name)
    return backend if backend is not None and backend.supports(device, dtype)[0] else None


def resolve(op: str, backend: Backend, device: torch.device, dtype: torch.dtype) -> Choice:
    """The implementation of ``op`` for a call on ``backend``, following its declared fallback."""
    if backend.name not in TABLE:
        raise ValueError(f"backend {backend.name!r} has no entries in isofast.dispatch.TABLE")
    entry = TABLE[backend.name][op]
    if isinstance(entry, Native):
        return Choice(op, backend.name, backend, entry.label, "")
    for target in entry.to:
        impl = _runs(target, device, dtype)
        if impl is not None:
            label = TABLE[target][op]
            assert isinstance(label, Native), f"{backend.name}'s {op} falls back to {target}, which lacks it too"
            return Choice(op, backend.name, impl, label.label, entry.why)
    raise AssertionError(f"{backend.name}'s {op} fallbacks {entry.to} must end with torch")  # pragma: no cover


def select(op: str, device: torch.device, dtype: torch.dtype) -> Choice:
    """The implementation of ``op`` for tensors of ``dtype`` on ``device``: on the backend that
    :func:`isofast.backends.select` picks (forced or automatic), or its declared fallback."""
    backend, _ = backends.select(device, dtype)
    return resolve(op, backend, device, dtype)


def describe(choices: list[Choice]) -> str:
    """``plan``'s ``reasons["ops"]``: one ``op: backend (what runs)`` per op the call runs."""
    return "; ".join(map(str, choices))


__all__ = ["MLP_OPS", "OPS", "TABLE", "Choice", "Fallback", "Native", "describe", "resolve", "select"]
