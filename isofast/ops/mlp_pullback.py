"""``mlp_pullback``: exact pullback metric ``H = J^T J`` (or ``J^T diag(w) J``) of an MLP, forward and
backward fused."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from isofast import dispatch
from isofast.backends.base import Backend, autocast_dtype
from isofast.mlp import MLPSpec, interleave


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast around a backend's forward or backward: the call casts the op's inputs to
    the planned dtype, and autocast must not recast the GEMMs inside the kernels (a backward may
    run inside the user's autocast block too)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def check_data_weight(backend: Backend, spec: MLPSpec, data_weight: Tensor | None) -> Tensor | None:
    """``data_weight`` as the backends take it (contiguous, detached), after shape-only checks (no
    value is read back to the host: positivity and finiteness are the caller's)."""
    if data_weight is None:
        return None
    backend.refuse_data_weight(data_weight)
    if data_weight.shape != (spec.out_features,):
        raise ValueError(f"data_weight must have shape ({spec.out_features},) (the MLP's output width), "
                         f"got {tuple(data_weight.shape)}")
    return data_weight.detach().contiguous()


class MLPPullback(torch.autograd.Function):
    """``(z, w, W_1, b_1, ..., W_L, b_L) -> H (B, m, m)`` through the hand-written forward and
    backward of ``backend``, the implementation :mod:`isofast.dispatch` resolved (``w``: the
    diagonal data-space metric or ``None``, a constant)."""

    @staticmethod
    def forward(
        ctx: Any, backend: Backend, acts: tuple, z: Tensor, data_weight: Tensor | None, *params: Tensor | None
    ) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        with autocast_off(z.device):
            h, saved = backend.mlp_pullback_forward(z, weights, biases, acts, data_weight)
        ctx.backend, ctx.acts = backend, acts
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.save_for_backward(data_weight, *weights, *saved)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        n = len(ctx.acts)
        data_weight, weights, saved = ctx.saved_tensors[0], ctx.saved_tensors[1 : n + 1], ctx.saved_tensors[n + 1 :]
        with autocast_off(grad_h.device):
            grad_z, grad_w, grad_b = ctx.backend.mlp_pullback_backward(
                grad_h.contiguous(), weights, ctx.has_bias, ctx.acts, saved, data_weight
            )
        return (None, None, grad_z, None, *interleave(grad_w, grad_b))


def mlp_pullback(backend: Backend, spec: MLPSpec, z: Tensor, data_weight: Tensor | None = None) -> Tensor:
    """Exact ``H (B, m, m) = J^T diag(w) J`` of the MLP ``spec`` at codes ``z (B, m)`` (``J^T J`` when
    ``data_weight`` is ``None``), on ``backend``'s implementation or its declared fallback;
    differentiable in ``z`` and the parameters through a hand-written backward (no double backward). ``data_weight``: ``w (D,)``, ``z``'s dtype and device, positive
    and finite, treated as a constant (no gradient); only backends with ``diagonal_data_metric``."""
    impl = dispatch.resolve("mlp_pullback", backend, z.device, z.dtype).impl
    return MLPPullback.apply(impl, spec.activations, z, check_data_weight(backend, spec, data_weight), *spec.params())
