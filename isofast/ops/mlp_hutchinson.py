"""``mlp_hutchinson``: per-probe trace statistics ``||J v||^2`` and ``||J^T J v||^2`` of an MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from isofast.backends.base import Backend
from isofast.mlp import MLPSpec, interleave
from isofast.ops.mlp_pullback import autocast_off


class MLPHutchinson(torch.autograd.Function):
    """``(z, probes, W_1, b_1, ...) -> stats (B, K, 2)``: one JVP and one VJP chain per probe."""

    @staticmethod
    def forward(
        ctx: Any, backend: Backend, acts: tuple, z: Tensor, probes: Tensor, *params: Tensor | None
    ) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        with autocast_off(z.device):
            stats, saved = backend.mlp_hutchinson_forward(z, probes, weights, biases, acts)
        ctx.backend, ctx.acts = backend, acts
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.save_for_backward(*weights, *saved)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_stats: Tensor) -> tuple[Tensor | None, ...]:
        n = len(ctx.acts)
        weights, saved = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        with autocast_off(grad_stats.device):
            grad_z, grad_w, grad_b = ctx.backend.mlp_hutchinson_backward(
                grad_stats.contiguous(), weights, ctx.has_bias, ctx.acts, saved
            )
        return (None, None, grad_z, None, *interleave(grad_w, grad_b))


def mlp_hutchinson(backend: Backend, spec: MLPSpec, z: Tensor, probes: Tensor) -> Tensor:
    """``stats (B, K, 2)`` for codes ``z (B, m)`` and probes ``(B, K, m)`` (treated as constants):
    ``stats[..., 0] = ||J v_k||^2``, ``stats[..., 1] = ||J^T J v_k||^2``."""
    return MLPHutchinson.apply(backend, spec.activations, z, probes, *spec.params())
