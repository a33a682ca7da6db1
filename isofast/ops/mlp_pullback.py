"""``mlp_pullback``: exact pullback metric ``H = J^T J`` of an MLP, forward and backward fused."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from isofast.backends.base import Backend, autocast_dtype
from isofast.mlp import MLPSpec, interleave


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast around a backend's forward or backward: the call casts the op's inputs to
    the planned dtype, and autocast must not recast the GEMMs inside the kernels (a backward may
    run inside the user's autocast block too)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class MLPPullback(torch.autograd.Function):
    """``(z, W_1, b_1, ..., W_L, b_L) -> H (B, m, m)`` through ``backend``'s hand-written kernels."""

    @staticmethod
    def forward(ctx: Any, backend: Backend, acts: tuple, z: Tensor, *params: Tensor | None) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        with autocast_off(z.device):
            h, saved = backend.mlp_pullback_forward(z, weights, biases, acts)
        ctx.backend, ctx.acts = backend, acts
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.save_for_backward(*weights, *saved)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        n = len(ctx.acts)
        weights, saved = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        with autocast_off(grad_h.device):
            grad_z, grad_w, grad_b = ctx.backend.mlp_pullback_backward(
                grad_h.contiguous(), weights, ctx.has_bias, ctx.acts, saved
            )
        return (None, None, grad_z, *interleave(grad_w, grad_b))


def mlp_pullback(backend: Backend, spec: MLPSpec, z: Tensor) -> Tensor:
    """Exact ``H (B, m, m)`` of the MLP ``spec`` at codes ``z (B, m)``; differentiable in ``z`` and
    the parameters through a hand-written backward (no double backward)."""
    return MLPPullback.apply(backend, spec.activations, z, *spec.params())
