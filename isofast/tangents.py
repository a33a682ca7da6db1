"""``tangent_images``: a decoder's primal and its Jacobian-vector products, computed once per sample.

``tangent_images(decoder, z, vectors) -> (primal (B, D), jv (B, K, D))`` for codes
``z (B, *latent_shape)`` and tangents ``vectors (B, K, *latent_shape)``: ``jv[b, k] = J(z_b) v_{b,k}``
with the output flattened per sample. The primal is computed once; the ``K`` tangents are carried
batched (``torch.func.jvp`` under ``vmap`` over the tangents), so a Dropout layer draws one mask per
sample, shared by its tangents. Both outputs are differentiable by ordinary reverse mode in ``z``
and the decoder's parameters. This is the interface every tangent-stream implementation provides;
the planner routes a call to one of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from isofast.forward_ad_fixes import ForwardADFixes

Decoder = Callable[[Tensor], Tensor]


def checked_decoder(decoder: Decoder, bsz: int, dtype: torch.dtype) -> Decoder:
    """``decoder`` with its output validated: one tensor with one row per code."""

    def run(z: Tensor) -> Tensor:
        out = decoder(z)
        if not isinstance(out, Tensor):
            raise TypeError(f"decoder must return one torch.Tensor of shape (B, ...), got a {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != bsz:
            raise ValueError(f"decoder must return one output per code, shape ({bsz}, ...); got {tuple(out.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"decoder must return a floating tensor, got {out.dtype}")
        if out.dtype != dtype and not torch.is_autocast_enabled(out.device.type):
            raise TypeError(f"decoder returned dtype {out.dtype} for z of dtype {dtype}; give z the decoder's dtype")
        return out.reshape(bsz, -1)

    return run


def tangent_images(decoder: Decoder, z: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``(primal (B, D), jv (B, K, D))`` for ``z (B, *latent_shape)``, ``vectors (B, K, *latent_shape)``.

    Runs under :class:`isofast.forward_ad_fixes.ForwardADFixes`, so attention and GroupNorm have
    working forward-mode rules.
    """
    run = checked_decoder(decoder, z.shape[0], z.dtype)
    # Dual tensors are written in place by forward mode: inputs must not alias (expanded codes, bases).
    z, vectors = z.contiguous(), vectors.contiguous()

    def one(v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(run, (z,), (v,))

    with ForwardADFixes():
        # out_dims=0: vmap expands a tangent that does not depend on v (a decoder ignoring z) correctly
        primal, jv = torch.func.vmap(one, in_dims=1, out_dims=(None, 0), randomness="same")(vectors)
    return primal, jv.transpose(0, 1)
