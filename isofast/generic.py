"""The generic path: any decoder (conv, custom modules), by forward-mode AD over repeated codes.

Each sample is repeated ``K`` times and carried with tangent ``v_k`` as a dual tensor, so one
decoder call returns all ``J v_k``; exact mode seeds the latent basis (``K = m``). The result is
differentiable with respect to ``z`` and the decoder parameters by ordinary reverse mode. The
decoder must treat samples independently (no batch statistics), as any per-sample Jacobian assumes.
The Gram and squared-norm reductions are :mod:`isofast.ops.tangent_gram` (CUDA kernels on CUDA
tensors where the cuda backend is available).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

from isofast.backends.base import acc_dtype
from isofast.ops.tangent_gram import tangent_gram, tangent_sqnorm

Decoder = Callable[[Tensor], Tensor]


def _acc(x: Tensor) -> Tensor:
    return x.to(acc_dtype(x.dtype))


def _tangent_images(decoder: Decoder, z: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z_rep (B*K, m), out_rep (B*K, D), Jv (B, K, D))`` for ``vectors (B, K, m)``."""
    bsz, k, m = vectors.shape
    z_rep = z.unsqueeze(1).expand(bsz, k, m).reshape(bsz * k, m)
    if not z_rep.requires_grad:
        # J^T (J v) below is a gradient with respect to the codes, so they must be in the graph.
        z_rep = z_rep.detach().requires_grad_()
    with fwad.dual_level():
        out = decoder(fwad.make_dual(z_rep, vectors.reshape(bsz * k, m)))
        primal, tangent = fwad.unpack_dual(out)
    if primal.shape[0] != bsz * k:
        raise ValueError(
            f"decoder must return one output per code: got batch size {primal.shape[0] // k} "
            f"for z of batch size {bsz}"
        )
    if tangent is None:
        tangent = torch.zeros_like(primal)
    return z_rep, primal.reshape(bsz * k, -1), tangent.reshape(bsz, k, -1)


def generic_pullback(decoder: Decoder, z: Tensor) -> Tensor:
    """Exact ``H = J^T J (B, m, m)`` at ``z (B, m)``: one forward-mode pass over the latent basis."""
    bsz, m = z.shape
    basis = torch.eye(m, dtype=z.dtype, device=z.device).expand(bsz, m, m)
    _, _, jt = _tangent_images(decoder, z, basis)
    return tangent_gram(_acc(jt))


def generic_hutchinson(decoder: Decoder, z: Tensor, probes: Tensor) -> Tensor:
    """``stats (B, K, 2)``: ``||J v_k||^2`` by forward mode and ``||J^T J v_k||^2`` by one VJP."""
    bsz, k, _ = probes.shape
    with torch.enable_grad():  # the VJP needs a graph even when the caller evaluates under no_grad
        z_rep, primal, jv = _tangent_images(decoder, z, probes)
        (jtjv,) = torch.autograd.grad(primal, z_rep, jv.reshape(bsz * k, -1), create_graph=True)
    return torch.stack([tangent_sqnorm(_acc(jv)), tangent_sqnorm(_acc(jtjv).reshape(bsz, k, -1))], dim=-1)
