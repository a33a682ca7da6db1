"""What users run today, re-implemented as references: test oracles and benchmark baselines.

Every function takes already-augmented codes ``z (B, m)`` (no mixup inside) and, for the
Hutchinson recipes, probes ``v (B, m)`` (one probe per sample, as the official code draws), and
returns the scaled-isometry ratio ``mean Tr H^2 / (mean Tr H)^2`` as a 0-d tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

Decoder = Callable[[Tensor], Tensor]


def official_relaxed_distortion(decoder: Decoder, z: Tensor, v: Tensor) -> Tensor:
    """The IRVAE paper's recipe: ``torch.autograd.functional.jvp`` and ``vjp`` with
    ``create_graph=True`` (the JVP itself is a double-backward trick), as in the authors' code."""
    bsz = z.shape[0]
    jv = torch.autograd.functional.jvp(decoder, z, v=v, create_graph=True)[1].reshape(bsz, -1)
    tr = jv.square().sum(1).mean()
    jtjv = torch.autograd.functional.vjp(decoder, z, v=jv.reshape_as(decoder(z)), create_graph=True)[1]
    tr2 = jtjv.reshape(bsz, -1).square().sum(1).mean()
    return tr2 / tr**2


def func_relaxed_distortion(decoder: Decoder, z: Tensor, v: Tensor) -> Tensor:
    """``torch.func.jvp`` then ``torch.func.vjp`` (functorch transforms)."""
    bsz = z.shape[0]
    out, jv = torch.func.jvp(decoder, (z,), (v,))
    _, pullback = torch.func.vjp(decoder, z)
    (jtjv,) = pullback(jv)
    tr = jv.reshape(bsz, -1).square().sum(1).mean()
    tr2 = jtjv.reshape(bsz, -1).square().sum(1).mean()
    return tr2 / tr**2


def forward_ad_relaxed_distortion(decoder: Decoder, z: Tensor, v: Tensor) -> Tensor:
    """Dual tensors (``torch.autograd.forward_ad``) for ``J v``, then one reverse-mode VJP."""
    bsz = z.shape[0]
    z = z if z.requires_grad else z.detach().requires_grad_()
    with fwad.dual_level():
        primal, jv = fwad.unpack_dual(decoder(fwad.make_dual(z, v)))
    (jtjv,) = torch.autograd.grad(primal, z, jv, create_graph=True)
    tr = jv.reshape(bsz, -1).square().sum(1).mean()
    tr2 = jtjv.reshape(bsz, -1).square().sum(1).mean()
    return tr2 / tr**2


def vmap_exact_relaxed_distortion(decoder: Decoder, z: Tensor) -> Tensor:
    """Exact ``H`` from ``vmap(jvp)`` over the latent basis, then the ratio of batch means."""
    bsz, m = z.shape
    basis = torch.eye(m, dtype=z.dtype, device=z.device).unsqueeze(1).expand(m, bsz, m)
    _, cols = torch.func.vmap(lambda e: torch.func.jvp(decoder, (z,), (e,)), out_dims=(None, 0))(basis)
    j = cols.reshape(m, bsz, -1)
    h = torch.einsum("kbd,lbd->bkl", j, j)
    tr = torch.diagonal(h, dim1=1, dim2=2).sum(-1)
    tr2 = (h * h).sum((1, 2))
    return tr2.mean() / tr.mean() ** 2


def repeated_codes_hutchinson(decoder: Decoder, z: Tensor, probes: Tensor) -> Tensor:
    """isofast 0.1's generic path: each code repeated ``K`` times so one dual-tensor call gives every
    ``J v_k`` (the primal is computed ``K`` times), then one VJP with ``create_graph=True``."""
    bsz, k = probes.shape[:2]
    z_rep = z.unsqueeze(1).expand(bsz, k, *z.shape[1:]).reshape(bsz * k, *z.shape[1:])
    z_rep = z_rep if z_rep.requires_grad else z_rep.detach().requires_grad_()
    with fwad.dual_level():
        primal, jv = fwad.unpack_dual(decoder(fwad.make_dual(z_rep, probes.reshape(z_rep.shape))))
    (jtjv,) = torch.autograd.grad(primal, z_rep, jv, create_graph=True)
    tr = jv.reshape(bsz, -1).square().sum(1).mean() / k
    tr2 = jtjv.reshape(bsz, -1).square().sum(1).mean() / k
    return tr2 / tr**2
