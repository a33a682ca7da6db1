"""The batched spectral ops on the compiled extension: the cpu and cuda backends' implementations.

Each runs the custom op ``isofast::<op>`` (:mod:`isofast.library`; its CPU or CUDA kernel by the
tensor's device) for ``H (B, m, m)`` with ``m <= MAX_DIM``, and the torch reference
(:mod:`isofast.spectral`) above it, so results keep the public ops' documented shapes, dtypes and
edge cases (``inf`` condition numbers and distances, floored log-determinants).

Differentiability: ``logdet`` has a hand-written backward (``d logdet / dH = U diag(1/lambda) U^T``,
zero for floored eigenvalues; first order only). ``eigvalsh``, ``condition_numbers`` and
``airm_sq_to_mean`` run the torch reference when a gradient is being recorded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from isofast import library, spectral

#: The largest ``m`` the extension's kernels take (``csrc/spectral_math.h``'s kMaxDim).
MAX_DIM = 32


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _compiled(H: Tensor) -> bool:
    """Whether the extension's kernel takes ``H`` without a gradient to record."""
    return H.shape[-1] <= MAX_DIM and not (H.requires_grad and torch.is_grad_enabled())


class _LogDet(torch.autograd.Function):
    """``H (B, m, m) -> logdet (B,)`` through ``isofast::logdet``, with its own first-order backward."""

    @staticmethod
    def forward(ctx: Any, H: Tensor) -> Tensor:
        out, grad = library.call("logdet", H.device, H, H.requires_grad)
        if H.requires_grad:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (grad,) = ctx.saved_tensors
        return g[:, None, None].to(grad.dtype) * grad


def eigvalsh(H: Tensor) -> Tensor:
    """``(B, m)`` ascending eigenvalues of ``H (B, m, m)``, in ``H``'s dtype."""
    if not _compiled(H):
        return spectral._eigvalsh_torch(H)
    return library.call("eigvalsh", H.device, H.to(_work_dtype(H.dtype))).to(H.dtype)


def logdet(H: Tensor) -> Tensor:
    """``(B,)`` floored log-determinants of ``H (B, m, m)``, differentiable, in ``H``'s dtype."""
    if H.shape[-1] > MAX_DIM:
        return spectral._logdet_torch(H)
    return _LogDet.apply(H.to(_work_dtype(H.dtype))).to(H.dtype)


def condition_numbers(H: Tensor) -> Tensor:
    """``(B,)`` condition numbers of ``H (B, m, m)``, computed in float64, in ``H``'s dtype."""
    if not _compiled(H):
        return spectral._condition_numbers_torch(H)
    return library.call("condition_numbers", H.device, H.to(torch.float64)).to(H.dtype)


def airm_sq_to_mean(H: Tensor) -> Tensor:
    """``(B,)`` squared AIRM distances of ``H (B, m, m)`` to its mean, in float64, in ``H``'s dtype."""
    if not _compiled(H):
        return spectral._airm_sq_to_mean_torch(H)
    return library.call("airm_sq_to_mean", H.device, H.to(torch.float64)).to(H.dtype)
