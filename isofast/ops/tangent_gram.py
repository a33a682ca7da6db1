"""``tangent_gram`` and ``tangent_sqnorm``: the generic path's reductions of tangent images.

For tangent images ``x (B, K, D)`` (rows ``J v_k``):

- ``tangent_gram(x) = G (B, K, K)``, ``G[b] = x[b] x[b]^T`` (the exact metric when ``v_k`` is the
  latent basis); backward ``x_bar = (G_bar + G_bar^T) x``;
- ``tangent_sqnorm(x) = s (B, K)``, ``s[b, k] = ||x[b, k]||^2`` (Hutchinson's trace terms);
  backward ``x_bar = 2 s_bar[..., None] x``.

The squared norms are their own op rather than the Gram's diagonal: the diagonal would cost
``K (K + 1) / 2`` dot products and ``K^2`` outputs per sample where ``K`` suffice.

Forward runs the implementation :mod:`isofast.dispatch` selects (the cuda backend's kernels on
CUDA tensors, which the triton backend declares as its fallback; the torch expression elsewhere
and under ``isofast.backends.use("torch")``); backward is always torch, written with
differentiable ops so a double backward works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from isofast import dispatch


class TangentGram(torch.autograd.Function):
    """``x (B, K, D) -> x x^T (B, K, K)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return dispatch.select("tangent_gram", x.device, x.dtype).impl.tangent_gram(x)

    @staticmethod
    def backward(ctx: Any, grad_g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad_g + grad_g.transpose(1, 2)) @ x


class TangentSqnorm(torch.autograd.Function):
    """``x (B, K, D) -> ||x||^2 (B, K)`` over the last dimension."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return dispatch.select("tangent_sqnorm", x.device, x.dtype).impl.tangent_sqnorm(x)

    @staticmethod
    def backward(ctx: Any, grad_s: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * grad_s.unsqueeze(-1) * x


def tangent_gram(x: Tensor) -> Tensor:
    """Per-sample Gram ``G (B, K, K) = x x^T`` of float32/float64 tangent images ``x (B, K, D)``."""
    return TangentGram.apply(x)


def tangent_sqnorm(x: Tensor) -> Tensor:
    """Squared norms ``s (B, K) = sum_d x^2`` of float32/float64 tangent images ``x (B, K, D)``."""
    return TangentSqnorm.apply(x)
