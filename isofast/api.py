"""The public regulariser API: distortion measures, the IRVAE loss and the pullback metric."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from isofast._checks import ESTIMATORS, check_choice, check_eta
from isofast.generic import Scaled, forward_traces, generic_metric, hutchinson_traces, unscale
from isofast.measures import MEASURES, BatchMean, from_metric, from_traces
from isofast.mixup import mixup_unchecked
from isofast.ops import mlp_hutchinson, mlp_pullback
from isofast.planning import Plan, plan
from isofast.train_mode import frozen_running_stats

Decoder = Callable[[Tensor], Tensor]

#: Measures unchanged when H is multiplied by a constant: the generic path hands them its
#: scale-normalised statistics as they are.
SCALE_INVARIANT = ("scaled_isometry", "conformal", "volume")

_GENERIC = {"exact": generic_metric, "forward": forward_traces, "hutchinson": hutchinson_traces}


def _generic(p: Plan, decoder: Decoder, z: Tensor, probes: Tensor | None, group: object | None) -> Scaled:
    """The generic path's statistics. Under ``torch.inference_mode`` (where forward mode is off)
    they are computed outside it on copies of the inputs."""
    args = (z,) if probes is None else (z, probes)
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return _generic_stats(p, decoder, tuple(a.clone() for a in args), group)
    return _generic_stats(p, decoder, args, group)


def _generic_stats(p: Plan, decoder: Decoder, args: tuple[Tensor, ...], group: object | None) -> Scaled:
    with frozen_running_stats(decoder):
        return _GENERIC[p.estimator](decoder, *args, group=group)


def pullback_metric(decoder: Decoder, z: Tensor) -> Tensor:
    """Exact pullback metric ``H_b = J(z_b)^T J(z_b)``, shape ``(B, m, m)``, at codes ``z (B, *latent_shape)``
    with ``m = prod(latent_shape)``.

    ``decoder`` maps ``(B, *latent_shape)`` to ``(B, ...)``; codes and outputs are flattened per
    sample. Differentiable in ``z`` and the decoder's parameters.
    """
    p = plan(decoder, z, measure=None, eta=None)
    if p.path == "fused_mlp":
        return mlp_pullback(p.backend_impl, p.spec, z)  # type: ignore[arg-type]
    sc = _generic(p, decoder, z, None, None)
    return unscale(sc.metric, sc.scale2, 1, "the pullback metric")  # type: ignore[arg-type]


def distortion(
    decoder: Decoder,
    z: Tensor,
    measure: str = "scaled_isometry",
    *,
    eta: float | None = 0.2,
    estimator: str = "auto",
    n_probes: int | None = None,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
    sync: bool | object = False,
) -> Tensor:
    """A distortion measure of ``decoder`` on mixup-augmented codes; a 0-d tensor.

    Args:
        decoder: maps ``(B, *latent_shape)`` to ``(B, ...)``. MLPs (``nn.Sequential`` of ``nn.Linear``
            and elementwise activations) on codes ``(B, m)`` take the fused path, anything else the
            generic path.
        z: codes ``(B, m)`` or ``(B, *latent_shape)``, ``m = prod(latent_shape)``; gradients flow
            back into them (and so into an encoder).
        measure: ``"scaled_isometry"`` (``mean Tr H^2 / (mean Tr H)^2``, minimum ``1/m``),
            ``"isometry"`` (``mean Tr (H - I)^2``), ``"conformal"`` (``mean Tr H^2 / (Tr H)^2``),
            ``"volume"`` (variance of ``logdet H``, exact only) or ``"jacobian_frobenius"``
            (``mean Tr H``). Means are over the augmented batch.
        eta: mixup range, ``alpha ~ U[-eta, 1 + eta]``; ``None`` uses ``z`` as given.
        estimator: ``"exact"`` (H from ``m`` tangent streams), ``"forward"`` (first order, generic
            path: ``Tr H = mean_k ||J u_k||^2``, ``Tr H^2 = mean_{i<j} (J u_i . J u_j)^2``, ``K >= 2``),
            ``"hutchinson"`` (``Tr H = E||Jv||^2``, ``Tr H^2 = E||J^T J v||^2`` with ``v ~ N(0, I)``)
            or ``"auto"`` (fused path: exact for ``m <= isofast.planning.EXACT_MAX_LATENT``, else
            Hutchinson; generic path: exact for ``m <= GENERIC_EXACT_MAX_LATENT``, else forward).
        n_probes: probes per sample ``K`` (default 1 for Hutchinson, ``FORWARD_PROBES`` for forward).
        probes: explicit Gaussian probes ``(B, K, *latent_shape)``, for reproducibility.
        generator: drives the mixup and probe draws, on ``z``'s device.
        sync: ``True`` or a process group to average over the global batch of all ranks.

    Draw order: mixup permutation, mixup coefficients, then probes.
    """
    p = plan(decoder, z, measure, eta=eta, estimator=estimator, n_probes=n_probes, probes=probes,
             generator=generator, sync=sync)
    z_aug = mixup_unchecked(z, eta, generator)  # plan() validated every argument
    mean = BatchMean(sync)
    if p.estimator != "exact" and probes is None:
        probes = torch.randn(z.shape[0], p.n_probes, *z.shape[1:], generator=generator, device=z.device, dtype=z.dtype)
    if p.path == "fused_mlp":
        if p.estimator == "exact":
            return from_metric(measure, mlp_pullback(p.backend_impl, p.spec, z_aug), mean)  # type: ignore[arg-type]
        stats = mlp_hutchinson(p.backend_impl, p.spec, z_aug, probes).mean(1)  # type: ignore[arg-type]
        return from_traces(measure, stats[:, 0], stats[:, 1], z.shape[1], mean)
    sc = _generic(p, decoder, z_aug, probes, mean.group)
    invariant = measure in SCALE_INVARIANT
    if p.estimator == "exact":
        metric = sc.metric if invariant else unscale(sc.metric, sc.scale2, 1, f"the {measure} measure's H")
        return from_metric(measure, metric, mean)  # type: ignore[arg-type]
    tr, tr2 = sc.tr, sc.tr2
    if not invariant:
        tr, tr2 = unscale(tr, sc.scale2, 1, f"the {measure} measure's Tr H"), unscale(tr2, sc.scale2, 2, f"the {measure} measure's Tr H^2")
    return from_traces(measure, tr, tr2, z[0].numel(), mean)  # type: ignore[arg-type]


def relaxed_distortion(
    decoder: Decoder,
    z: Tensor,
    *,
    eta: float | None = 0.2,
    estimator: str = "auto",
    n_probes: int | None = None,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
    sync: bool | object = False,
) -> Tensor:
    """IRVAE's loss ``mean_b Tr H_b^2 / (mean_b Tr H_b)^2``: :func:`distortion` with
    ``measure="scaled_isometry"``. Scale invariant; its minimum ``1/m`` means ``H = c I``."""
    return distortion(decoder, z, "scaled_isometry", eta=eta, estimator=estimator, n_probes=n_probes,
                      probes=probes, generator=generator, sync=sync)


class IsometricRegularizer(nn.Module):
    """``weight * distortion(decoder, z, measure, ...)`` as a module, to add to a training loss.

    >>> reg = IsometricRegularizer(weight=1.0)
    >>> loss = recon_loss + reg(vae.decoder, z)
    """

    def __init__(
        self,
        measure: str = "scaled_isometry",
        weight: float = 1.0,
        eta: float | None = 0.2,
        estimator: str = "auto",
        n_probes: int | None = None,
        sync: bool | object = False,
    ) -> None:
        super().__init__()
        check_choice("measure", measure, list(MEASURES))
        check_choice("estimator", estimator, ESTIMATORS)
        check_eta(eta)
        self.measure, self.weight, self.eta = measure, float(weight), eta
        self.estimator, self.n_probes, self.sync = estimator, n_probes, sync

    def forward(self, decoder: Decoder, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.weight * distortion(decoder, z, self.measure, eta=self.eta, estimator=self.estimator,
                                        n_probes=self.n_probes, generator=generator, sync=self.sync)

    def plan(self, decoder: Decoder, z: Tensor) -> Plan:
        """What :meth:`forward` will do for these arguments."""
        return plan(decoder, z, self.measure, eta=self.eta, estimator=self.estimator, n_probes=self.n_probes,
                    sync=self.sync)

    def extra_repr(self) -> str:
        return f"measure={self.measure!r}, weight={self.weight}, eta={self.eta}, estimator={self.estimator!r}"
