"""``mlp_hutchinson``: per-probe trace statistics ``||J v||^2`` and ``||J^T J v||^2`` of an MLP (with a
diagonal data-space metric ``W``: ``v^T J^T W J v`` and ``||J^T W J v||^2``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from isofast import dispatch
from isofast.backends.base import Backend
from isofast.mlp import MLPSpec, interleave
from isofast.ops.mlp_pullback import autocast_off, check_data_weight


class MLPHutchinson(torch.autograd.Function):
    """``(z, probes, W_1, b_1, ...) -> stats (B, K, 2)``: one JVP and one VJP chain per probe."""

    @staticmethod
    def forward(
        ctx: Any, backend: Backend, acts: tuple, z: Tensor, probes: Tensor, data_weight: Tensor | None,
        *params: Tensor | None,
    ) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        with autocast_off(z.device):
            stats, saved = backend.mlp_hutchinson_forward(z, probes, weights, biases, acts, data_weight)
        ctx.backend, ctx.acts = backend, acts
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.save_for_backward(data_weight, *weights, *saved)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_stats: Tensor) -> tuple[Tensor | None, ...]:
        n = len(ctx.acts)
        data_weight, weights, saved = ctx.saved_tensors[0], ctx.saved_tensors[1 : n + 1], ctx.saved_tensors[n + 1 :]
        with autocast_off(grad_stats.device):
            grad_z, grad_w, grad_b = ctx.backend.mlp_hutchinson_backward(
                grad_stats.contiguous(), weights, ctx.has_bias, ctx.acts, saved, data_weight
            )
        return (None, None, grad_z, None, None, *interleave(grad_w, grad_b))


def mlp_hutchinson(
    backend: Backend, spec: MLPSpec, z: Tensor, probes: Tensor, data_weight: Tensor | None = None
) -> Tensor:
    """``stats (B, K, 2)`` for codes ``z (B, m)`` and probes ``(B, K, m)`` (treated as constants), on
    ``backend``'s implementation or its declared fallback (the cuda backend's is the torch twin's):
    ``stats[..., 0] = sum_d w_d (J v_k)_d^2``, ``stats[..., 1] = ||J^T diag(w) J v_k||^2`` (``w = 1``
    when ``data_weight`` is ``None``). ``data_weight``: ``w (D,)``, ``z``'s dtype and device,
    positive and finite, treated as a constant (no gradient); only backends with
    ``diagonal_data_metric``."""
    impl = dispatch.resolve("mlp_hutchinson", backend, z.device, z.dtype).impl
    return MLPHutchinson.apply(impl, spec.activations, z, probes, check_data_weight(backend, spec, data_weight),
                               *spec.params())
