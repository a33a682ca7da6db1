"""The generic path: any decoder (conv, normalisation, attention, custom modules), by forward mode.

Codes are ``z (B, *latent_shape)`` with ``m = prod(latent_shape)``; the decoder maps them to
``(B, *out_shape)``, flattened per sample to ``D`` entries. The tangent images ``J v`` come from
:func:`isofast.tangents.tangent_images` (primal once per sample, ``K`` tangents batched). Three
estimators of the per-sample traces ``Tr H_b`` and ``Tr H_b^2`` of ``H = J^T J``:

- ``exact``: ``H = G`` for ``v`` the latent basis (``K = m``);
- ``forward`` (first order; no VJP): with ``a_k = J u_k``, ``u_k ~ N(0, I)`` independent,
  ``Tr H = mean_k ||a_k||^2`` and ``Tr H^2 = mean_{i<j} (a_i . a_j)^2`` (needs ``K >= 2``), both
  unbiased since ``E (u^T H v)^2 = E u^T H v v^T H u = Tr H^2``; with orthonormal frames
  (:mod:`isofast.probes`, the default draw) ``Tr H^2`` also uses the diagonal of the Gram and is
  exact at ``K = m`` and at ``H = c I``. Per sample, with Gaussian probes,
  ``Var = [2 (Tr H^2)^2 + (4K - 2) Tr H^4] / (K (K - 1) / 2)`` for the ``Tr H^2`` estimate
  (``Var (u^T H v)^2 = 2 (Tr H^2)^2 + 6 Tr H^4``, and pairs sharing one probe covary by
  ``2 Tr H^4``) and ``2 Tr H^2 / K`` for ``Tr H``;
- ``hutchinson`` (the official recipe): ``Tr H^2 = mean_k ||J^T a_k||^2`` by one VJP per probe,
  with ``create_graph=True`` (a double backward when the loss is differentiated).

Scale: the tangent images are divided by a detached batch scale ``s = max |J v|`` (all-reduced
over ranks when synced) before anything is squared, so Grams and traces are O(1) in fp32 for any
Jacobian scale; the statistics come back in units of ``s^2`` (``Tr H``) and ``s^4`` (``Tr H^2``),
which the scale-invariant measures use as they are. All reductions run in fp32 or wider with
autocast off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from isofast._checks import can_read_values
from isofast.backends.base import acc_dtype
from isofast.ops.tangent_gram import tangent_gram, tangent_sqnorm
from isofast import streams
from isofast.tangents import tangent_images

Decoder = Callable[[Tensor], Tensor]


@dataclass
class Scaled:
    """Per-sample statistics in units of the detached scale: the true value is ``value * scale2 ** power``.

    ``tr (B,)`` and ``tr2 (B,)`` (powers 1 and 2), or ``metric (B, m, m)`` (power 1); ``scale2 = s^2``.
    """

    scale2: Tensor
    tr: Tensor | None = None
    tr2: Tensor | None = None
    metric: Tensor | None = None


def _acc(x: Tensor) -> Tensor:
    return x.to(acc_dtype(x.dtype))


def _scale(jv: Tensor, group: object | None) -> Tensor:
    """Detached ``max |jv|`` over the (global) batch, 1 where the images vanish."""
    s = jv.detach().abs().amax()
    if group is not None:
        s = s.clone()
        dist.all_reduce(s, op=dist.ReduceOp.MAX, group=group)
    return torch.where(s > 0, s, torch.ones_like(s))


def _normalised_images(decoder: Decoder, z: Tensor, vectors: Tensor, group: object | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(primal (B, D), a (B, K, D) = J v / s in fp32+, s)``."""
    # The stream path hands its layers (a SequentialSpec) instead of the decoder: same contract.
    images = streams.tangent_images if isinstance(decoder, streams.SequentialSpec) else tangent_images
    primal, jv = images(decoder, z, vectors)
    jv = _acc(jv)
    s = _scale(jv, group)
    return primal, jv / s, s


def latent_basis(z: Tensor) -> Tensor:
    """``(B, m, *latent_shape)``: the latent basis for each sample."""
    m = z[0].numel()
    eye = torch.eye(m, dtype=z.dtype, device=z.device).reshape(m, *z.shape[1:])
    return eye.expand(z.shape[0], *eye.shape)


def generic_metric(decoder: Decoder, z: Tensor, group: object | None = None) -> Scaled:
    """Exact ``H (B, m, m)`` (scaled) from the ``m`` basis tangent images."""
    _, a, s = _normalised_images(decoder, z, latent_basis(z), group)
    with torch.autocast(z.device.type, enabled=False):
        return Scaled(s * s, metric=tangent_gram(a))


def forward_traces(decoder: Decoder, z: Tensor, probes: Tensor, group: object | None = None,
                   orthonormal: bool = False) -> Scaled:
    """First-order ``Tr H`` and ``Tr H^2`` (scaled) from the ``K x K`` Gram ``G`` of probe images.

    ``probes (B, K, *latent_shape)``: independent ``N(0, I)`` draws, or with ``orthonormal`` the
    scaled orthonormal frames of :func:`isofast.probes.orthonormal_probes`, for which
    ``Tr H^2 = (mean_i G_ii^2 + (m - 1) mean_{i != j} G_ij^2) / m`` (docs/maths.md section 3).
    """
    k, m = probes.shape[1], z[0].numel()
    _, a, s = _normalised_images(decoder, z, probes, group)
    with torch.autocast(z.device.type, enabled=False):
        g = tangent_gram(a)
        diag = torch.diagonal(g, dim1=1, dim2=2)
        tr = diag.mean(-1)
        off = torch.triu(torch.ones(k, k, dtype=torch.bool, device=g.device), diagonal=1)
        off_mean = g.square()[:, off].mean(-1)
        tr2 = (diag.square().mean(-1) + (m - 1) * off_mean) / m if orthonormal else off_mean
    return Scaled(s * s, tr=tr, tr2=tr2)


def hutchinson_traces(decoder: Decoder, z: Tensor, probes: Tensor, group: object | None = None) -> Scaled:
    """``Tr H = mean ||J v||^2`` and ``Tr H^2 = mean ||J^T J v||^2`` (scaled), one VJP per probe."""
    with torch.enable_grad():  # the VJP needs a graph even when the caller evaluates under no_grad
        zg = z if z.requires_grad else z.detach().requires_grad_()
        primal, a, s = _normalised_images(decoder, zg, probes, group)
        k = probes.shape[1]
        if primal.requires_grad:
            cot = a.transpose(0, 1).to(primal.dtype)  # (K, B, D): J^T a_k is linear in a_k, so J^T (J v / s)
            if k == 1:  # one plain VJP; the batched form vmaps the backward
                (jta,) = torch.autograd.grad(primal, zg, cot[0], create_graph=True, allow_unused=True)
                jta = None if jta is None else jta.unsqueeze(0)
            else:
                (jta,) = torch.autograd.grad(primal, zg, cot, create_graph=True, is_grads_batched=True, allow_unused=True)
        else:
            jta = None
        jta = torch.zeros(k, *z.shape, dtype=a.dtype, device=z.device) if jta is None else _acc(jta)
        with torch.autocast(z.device.type, enabled=False):
            tr = tangent_sqnorm(a).mean(-1)
            # ||J^T J v||^2 / s^4 = ||J^T a / s||^2
            tr2 = tangent_sqnorm((jta / s).reshape(k, z.shape[0], -1).transpose(0, 1)).mean(-1)
    return Scaled(s * s, tr=tr, tr2=tr2)


def unscale(x: Tensor, scale2: Tensor, power: int, what: str) -> Tensor:
    """``x * scale2 ** power``, refused where it is not representable in ``x``'s dtype."""
    out = x * scale2**power
    if can_read_values() and not bool(torch.isfinite(out).all()):
        raise OverflowError(
            f"{what} is not representable in {x.dtype}: the decoder's Jacobian scale is about "
            f"{float(scale2.sqrt()):.3g}; use a scale-invariant measure ('scaled_isometry', 'conformal') "
            f"or float64 codes and decoder"
        )
    return out
