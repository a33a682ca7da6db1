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
- ``hutchinson`` (the official recipe's estimator): ``Tr H^2 = mean_k ||J^T a_k||^2`` by one VJP
  per probe, first order: the VJP is a constant ``h``, and a second tangent image ``J h`` carries
  the gradient (:func:`hutchinson_traces`).

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
from isofast.geometry import IDENTITY, Geometry, check_product_gram, whiten_covectors, whiten_vectors
from isofast.ops.tangent_gram import tangent_gram, tangent_sqnorm
from isofast import streams
from isofast.tangents import checked_decoder, tangent_images

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


@dataclass
class Images:
    """Normalised tangent images of one call: ``a (B, K, D) = R J S v / s`` in fp32 or wider,
    ``ga = G(x) a`` for a product-form data metric (else ``None``), the primal ``(B, D)`` and the
    detached scale ``s`` (0-d)."""

    primal: Tensor
    a: Tensor
    ga: Tensor | None
    s: Tensor

    def gram(self) -> Tensor:
        """``(B, K, K)``: ``a a^T``, or ``a (G a)^T`` for a product-form metric (checked symmetric
        and with a non-negative diagonal, where values may be read)."""
        if self.ga is None:
            return tangent_gram(self.a)
        g = self.a @ self.ga.transpose(1, 2)
        check_product_gram(g)
        return g

    def sqnorm(self) -> Tensor:
        """``(B, K)``: ``||a_k||_G^2``."""
        return tangent_sqnorm(self.a) if self.ga is None else (self.a * self.ga).sum(-1)

    def cotangent(self, geo: Geometry) -> Tensor:
        """``R^T a`` (or ``G a``): the cotangent whose VJP gives ``J^T G J S v / s``."""
        if self.ga is not None:
            return self.ga
        return self.a if geo.data is None else geo.data.cotangent(self.a)


class _Repeat:
    """The generic path's :class:`isofast.streams.Carrier`: forward mode cannot resume from a
    finished primal pass, so every call of ``tangents`` runs the decoder again (``primal`` is the
    first call's)."""

    def __init__(self, decoder: Decoder, z: Tensor) -> None:
        self.decoder, self.z, self.primal = decoder, z, None

    def tangents(self, vectors: Tensor) -> Tensor:
        primal, jv = tangent_images(self.decoder, self.z, vectors)
        if self.primal is None:
            self.primal = primal
        return jv


def _normalised_images(decoder: Decoder, z: Tensor, vectors: Tensor, group: object | None,
                       geo: Geometry = IDENTITY, carrier: streams.Carrier | _Repeat | None = None) -> Images:
    """Tangent images of ``vectors (B, K, *latent_shape)`` (already whitened on the latent side),
    in one pass with the primal, or through ``carrier``'s kept primal pass."""
    if carrier is not None:
        jv = carrier.tangents(vectors)
        primal = carrier.primal
        assert primal is not None
    else:
        # The stream path hands its layers (a SequentialSpec) instead of the decoder: same contract.
        images = streams.tangent_images if isinstance(decoder, streams.SequentialSpec) else tangent_images
        primal, jv = images(decoder, z, vectors)
    jv, ga = _acc(jv), None
    if geo.data is not None:
        geo.data.check_size(jv.shape[-1])
        jv, ga = geo.data.apply(primal, jv)
    s = _scale(jv, group)
    return Images(primal, jv / s, None if ga is None else ga / s, s)


def latent_basis(z: Tensor) -> Tensor:
    """``(B, m, *latent_shape)``: the latent basis for each sample."""
    m = z[0].numel()
    eye = torch.eye(m, dtype=z.dtype, device=z.device).reshape(m, *z.shape[1:])
    return eye.expand(z.shape[0], *eye.shape)


def _vectors(z: Tensor, u: Tensor, whitening: Tensor | None) -> Tensor:
    return u if whitening is None else whiten_vectors(whitening, u)


def generic_metric(decoder: Decoder, z: Tensor, group: object | None = None, geo: Geometry = IDENTITY) -> Scaled:
    """Exact ``S^T H S (B, m, m)`` (scaled; ``H = J^T G J``) from the ``m`` whitened basis tangent images."""
    im = _normalised_images(decoder, z, _vectors(z, latent_basis(z), geo.whitening(z)), group, geo)
    with torch.autocast(z.device.type, enabled=False):
        return Scaled(im.s * im.s, metric=im.gram())


def forward_traces(decoder: Decoder, z: Tensor, probes: Tensor, group: object | None = None,
                   orthonormal: bool = False, geo: Geometry = IDENTITY) -> Scaled:
    """First-order ``Tr H`` and ``Tr H^2`` (scaled) from the ``K x K`` Gram ``G`` of probe images.

    ``probes (B, K, *latent_shape)``: independent ``N(0, I)`` draws, or with ``orthonormal`` the
    scaled orthonormal frames of :func:`isofast.probes.orthonormal_probes`, for which
    ``Tr H^2 = (mean_i G_ii^2 + (m - 1) mean_{i != j} G_ij^2) / m`` (docs/maths.md section 3).
    With a geometry ``geo`` these are the traces of the whitened ``S^T J^T G J S``.
    """
    k, m = probes.shape[1], z[0].numel()
    im = _normalised_images(decoder, z, _vectors(z, probes, geo.whitening(z)), group, geo)
    with torch.autocast(z.device.type, enabled=False):
        g = im.gram()
        diag = torch.diagonal(g, dim1=1, dim2=2)
        tr = diag.mean(-1)
        off = torch.triu(torch.ones(k, k, dtype=torch.bool, device=g.device), diagonal=1)
        off_mean = g.square()[:, off].mean(-1)
        tr2 = (diag.square().mean(-1) + (m - 1) * off_mean) / m if orthonormal else off_mean
    return Scaled(im.s * im.s, tr=tr, tr2=tr2)


def _vjp(primal: Tensor, zg: Tensor, cot: Tensor, create_graph: bool) -> Tensor | None:
    """``J^T c`` for cotangents ``cot (K, B, D)``, ``(K, *z.shape)`` or ``None`` where the
    output does not depend on ``z``; with ``create_graph`` differentiating it is a double backward,
    without it the result is a constant and the primal's graph is kept for the caller. One backward
    per cotangent: a vmapped backward (``is_grads_batched``) fails on custom autograd functions
    without batching rules, the stream path's gates among them."""
    if not primal.requires_grad:
        return None
    out = []
    for c in cot:
        (g,) = torch.autograd.grad(primal, zg, c, create_graph=create_graph, retain_graph=True, allow_unused=True)
        if g is None:
            return None
        out.append(g)
    return torch.stack(out)


def hutchinson_traces(decoder: Decoder, z: Tensor, probes: Tensor, group: object | None = None,
                      geo: Geometry = IDENTITY) -> Scaled:
    """``Tr H = mean ||J v||^2`` and ``Tr H^2 = mean ||J^T J v||^2`` (scaled), one VJP per probe,
    first order; with a geometry, of the whitened ``J~ = R J S`` (``||S^T J^T G J S u||^2``).

    With ``a = J~ u`` (a tangent image), ``h = J~^T a = H~ u`` (a VJP *without* a graph, so a
    constant) and ``b = J~ h`` (a second tangent image): ``a . b = u^T H~^2 u``, and with ``h``
    held fixed ``d (a . b) = u^T dH~ H~ u``, half the derivative of ``u^T H~^2 u``. So
    ``2 a.b - sg(a.b)`` has the value and the gradient (in ``z`` and the parameters) of the
    official recipe's ``||J^T J u||^2``, from forward-mode products and one plain VJP: no double
    backward (docs/maths.md section 3). For a product-form data metric ``a . b`` is ``(G a) . b``.
    """
    with torch.enable_grad():  # the VJP needs a graph even when the caller evaluates under no_grad
        zg = z if z.requires_grad else z.detach().requires_grad_()
        whitening = geo.whitening(zg)
        # the primal once (stream path) for both tangent images
        carrier = streams.Carrier(decoder, zg) if isinstance(decoder, streams.SequentialSpec) else _Repeat(decoder, zg)
        im = _normalised_images(decoder, zg, _vectors(zg, probes, whitening), group, geo, carrier)
        k, bsz = probes.shape[1], z.shape[0]
        cot = im.cotangent(geo).detach()
        # h = J^T R^T a / s = H~ u / s after the latent whitening: a constant covector
        h = _vjp(im.primal, zg, cot.transpose(0, 1).to(im.primal.dtype), create_graph=False)
        with torch.autocast(z.device.type, enabled=False):
            tr = im.sqnorm().mean(-1)
        if h is None:  # the output does not depend on z: H = 0
            return Scaled(im.s * im.s, tr=tr, tr2=torch.zeros_like(tr))
        h = _acc(h).reshape(k, bsz, -1).transpose(0, 1)  # (B, K, m)
        if whitening is not None:
            h = whiten_covectors(whitening, h).detach()  # held constant: S(z)'s derivative enters through b
        hs = _scale(h, group)  # keeps the second images O(1) for any Jacobian scale
        seeds = (h / hs).reshape(bsz, k, *z.shape[1:]).to(z.dtype)
        im2 = _normalised_images(decoder, zg, _vectors(zg, seeds, whitening), group, geo, carrier)
        with torch.autocast(z.device.type, enabled=False):
            # im.a = J~ u / s, seeds = H~ u / (s hs), im2.a = J~ seeds / s2: a . b = u^T H~^2 u / (s^2 hs s2)
            ab = ((im.a if im.ga is None else im.ga) * im2.a).sum(-1)
            tr2 = (2 * ab - ab.detach()).mean(-1) * (hs * im2.s / (im.s * im.s))
    return Scaled(im.s * im.s, tr=tr, tr2=tr2)


def _path_noise(bsz: int, d: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """StyleGAN2's data-space noise ``(B, D)``: ``N(0, I) / sqrt(D)``, drawn on ``like``'s device."""
    return torch.randn(bsz, d, generator=generator, device=like.device, dtype=like.dtype) / d**0.5


def path_lengths(decoder: Decoder, z: Tensor, estimator: str, generator: torch.Generator | None = None,
                 group: object | None = None, geo: Geometry = IDENTITY) -> tuple[Tensor, Tensor]:
    """``(lengths (B,), s)``: StyleGAN2's path lengths ``||J~^T w||`` in units of the detached ``s``,
    for data-space noise ``w ~ N(0, I_D) / sqrt(D)`` drawn here with ``generator``.

    ``estimator="exact"``: first order, ``J~^T w = [(R J S e_i) . w]_i`` from the ``m`` whitened basis
    tangent images; ``"hutchinson"``: one VJP (a double backward when differentiated).
    """
    bsz = z.shape[0]
    if estimator == "exact":
        im = _normalised_images(decoder, z, _vectors(z, latent_basis(z), geo.whitening(z)), group, geo)
        noise = _path_noise(bsz, im.a.shape[-1], im.a, generator)
        with torch.autocast(z.device.type, enabled=False):
            grad = (im.a @ noise.unsqueeze(-1)).squeeze(-1)  # (B, m)
            return grad.square().sum(-1).sqrt(), im.s
    with torch.enable_grad():
        zg = z if z.requires_grad else z.detach().requires_grad_()
        whitening = geo.whitening(zg)
        primal = checked_decoder(decoder, bsz, z.dtype)(zg)
        if geo.data is not None:
            geo.data.check_size(primal.shape[-1])
        noise = _path_noise(bsz, primal.shape[-1], primal, generator)
        cot = noise if geo.data is None else geo.data.cotangent(noise)
        g = _vjp(primal, zg, cot.unsqueeze(0), create_graph=True)
        g = torch.zeros(1, *z.shape, dtype=acc_dtype(z.dtype), device=z.device) if g is None else _acc(g)
        g = g.reshape(1, z.shape[0], -1).transpose(0, 1)  # (B, 1, m)
        if whitening is not None:
            g = whiten_covectors(whitening, g)
        with torch.autocast(z.device.type, enabled=False):
            s = _scale(g, group)
            return tangent_sqnorm(g / s).squeeze(1).sqrt(), s


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
