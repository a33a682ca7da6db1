"""The compiled extension's batched spectral kernels, as drop-in entries of ``spectral._IMPL``.

:func:`install` is called by :mod:`isofast.spectral` on its first use; it only loads an already
built extension (never compiles). Each entry runs the extension for CPU tensors (and CUDA tensors
when the extension has its CUDA kernels) with ``m <= 32``, and otherwise calls the reference
implementation it replaced, so results keep the public ops' documented shapes, dtypes and edge
cases (``inf`` condition numbers and distances, floored log-determinants).

Differentiability: ``logdet`` has a hand-written backward (``d logdet / dH = U diag(1/lambda) U^T``,
zero for floored eigenvalues; first order only). ``eigvalsh``, ``condition_numbers`` and
``airm_sq_to_mean`` defer to the reference implementation when a gradient is being recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from isofast import _ext

MAX_DIM = 32
Impl = Callable[[Tensor], Tensor]


def _kernel(module: Any, name: str, H: Tensor) -> Callable | None:
    """The extension function for ``H``'s device, or ``None`` when the extension cannot serve it."""
    if H.shape[-1] > MAX_DIM or H.shape[0] == 0:
        return None
    if H.device.type == "cpu":
        return getattr(module, name)
    if H.device.type == "cuda":
        return getattr(module, f"cuda_{name}", None)
    return None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _LogDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable, H: Tensor) -> Tensor:
        out, grad = fn(H, H.requires_grad)
        if grad is not None:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor]:
        (grad,) = ctx.saved_tensors
        return None, g[:, None, None].to(grad.dtype) * grad


def _wrap(name: str, fallback: Impl, module: Any) -> Impl:
    def impl(H: Tensor) -> Tensor:
        fn = _kernel(module, name, H)
        if fn is None:
            return fallback(H)
        if name == "logdet":
            work = H.to(_work_dtype(H.dtype))
            return _LogDet.apply(fn, work).to(H.dtype)
        if H.requires_grad and torch.is_grad_enabled():
            return fallback(H)
        work = torch.float64 if name in ("condition_numbers", "airm_sq_to_mean") else _work_dtype(H.dtype)
        return fn(H.to(work)).to(H.dtype)

    impl.__name__ = f"_{name}_compiled"
    impl.__doc__ = f"{name} through the compiled extension (falls back to {fallback.__name__})."
    impl.fallback = fallback  # type: ignore[attr-defined]
    return impl


def install(table: dict[str, Impl]) -> bool:
    """Replace the entries of ``table`` (``spectral._IMPL``) by the extension's kernels when the
    extension is built and loadable; returns whether it did. Idempotent."""
    module, _ = _ext.load()
    if module is None:
        return False
    for name in ("eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean"):
        current = table[name]
        if getattr(current, "fallback", None) is None:
            table[name] = _wrap(name, current, module)
    return True
