"""The public regulariser API: distortion measures, the IRVAE loss and the pullback metric."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from isofast import scale
from isofast._checks import ESTIMATORS, can_read_values, check_choice, check_eta
from isofast.backends.base import acc_dtype
from isofast.generic import Scaled, forward_traces, generic_metric, hutchinson_traces, unscale
from isofast.measures import MEASURES, BatchMean, from_metric, from_traces
from isofast.mixup import mixup_unchecked
from isofast.ops import mlp_hutchinson, mlp_pullback
from isofast.planning import Plan, plan
from isofast.probes import draw as draw_probes
from isofast.train_mode import frozen_running_stats

Decoder = Callable[[Tensor], Tensor]


def _metric(p: Plan, z: Tensor) -> Tensor:
    """Exact ``H (B, m, m)`` on the fused MLP path."""
    if p.compute_dtype is None:
        return mlp_pullback(p.backend_impl, p.spec, z)  # type: ignore[arg-type]
    # Under autocast the op gets its inputs in the planned dtype (and keeps autocast out of its kernels).
    return mlp_pullback(p.backend_impl, p.spec.to(p.compute_dtype), z.to(p.compute_dtype))  # type: ignore[arg-type, union-attr]


def _stats(p: Plan, z: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson statistics ``(B, K, 2)`` on the fused MLP path."""
    if p.compute_dtype is None:
        return mlp_hutchinson(p.backend_impl, p.spec, z, probes)  # type: ignore[arg-type]
    dt = p.compute_dtype
    return mlp_hutchinson(p.backend_impl, p.spec.to(dt), z.to(dt), probes.to(dt))  # type: ignore[arg-type, union-attr]


def _scaled_stats(p: Plan, z: Tensor, probes: Tensor, measure: str, mean: BatchMean) -> tuple[Tensor, float | None]:
    """``(stats (B, K, 2), probe_scale)``: fused Hutchinson statistics; for a ratio measure whose
    first statistics are out of range, recomputed with probes scaled by ``probe_scale``
    (:func:`isofast.scale.probe_rescale`; eager mode only), else ``probe_scale`` is ``None``."""
    stats = _stats(p, z, probes)
    if measure not in scale.SCALE_INVARIANT or not can_read_values():
        return stats, None
    factor = scale.probe_rescale(stats, mean.group)
    if factor is not None:
        stats = _stats(p, z, probes * factor)
    return stats, factor


def _generic(p: Plan, decoder: Decoder, z: Tensor, probes: Tensor | None, group: object | None) -> Scaled:
    """The generic path's scale-normalised statistics. Under ``torch.inference_mode`` (where
    forward mode is off) they are computed outside it on copies of the inputs."""
    args = (z,) if probes is None else (z, probes)
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return _generic_stats(p, decoder, tuple(a.clone() for a in args), group)
    return _generic_stats(p, decoder, args, group)


def _generic_stats(p: Plan, decoder: Decoder, args: tuple[Tensor, ...], group: object | None) -> Scaled:
    # The stream path computes the tangent images from the decoder's layers (p.spec).
    source = p.spec if p.path == "fused_sequential" else decoder
    with frozen_running_stats(decoder):
        if p.estimator == "exact":
            return generic_metric(source, *args, group=group)  # type: ignore[arg-type]
        if p.estimator == "forward":
            return forward_traces(source, *args, group=group, orthonormal=p.probe_distribution == "orthonormal")  # type: ignore[arg-type]
        return hutchinson_traces(source, *args, group=group)  # type: ignore[arg-type]


def _generic_distortion(p: Plan, decoder: Decoder, z: Tensor, probes: Tensor | None, measure: str,
                        mean: BatchMean) -> Tensor:
    sc = _generic(p, decoder, z, probes, mean.group)
    # The generic path normalises its tangent images before squaring; measures unchanged when H is
    # multiplied by a constant take the normalised statistics as they are.
    invariant = measure in scale.SCALE_INVARIANT or measure == "volume"
    if p.estimator == "exact":
        metric = sc.metric if invariant else unscale(sc.metric, sc.scale2, 1, f"the {measure} measure's H")
        return from_metric(measure, metric, mean)  # type: ignore[arg-type]
    tr, tr2 = sc.tr, sc.tr2
    if not invariant:
        tr, tr2 = (unscale(tr, sc.scale2, 1, f"the {measure} measure's Tr H"),
                   unscale(tr2, sc.scale2, 2, f"the {measure} measure's Tr H^2"))
    return from_traces(measure, tr, tr2, z[0].numel(), mean)  # type: ignore[arg-type]


def pullback_metric(decoder: Decoder, z: Tensor) -> Tensor:
    """Exact pullback metric ``H_b = J(z_b)^T J(z_b)``, shape ``(B, m, m)``, at codes ``z (B, *latent_shape)``
    with ``m = prod(latent_shape)``.

    ``decoder`` maps ``(B, *latent_shape)`` to ``(B, ...)``; codes and outputs are flattened per
    sample. Differentiable in ``z`` and the decoder's parameters.
    """
    p = plan(decoder, z, measure=None, eta=None)
    if p.path == "fused_mlp":
        return _metric(p, z)
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
        eta: mixup range, ``alpha ~ U[-eta, 1 + eta]``, a real number in
            ``[0, isofast._checks.ETA_MAX]`` (1000); ``None`` uses ``z`` as given.
        estimator: ``"exact"`` (H from ``m`` tangent streams), ``"forward"`` (first order, generic
            path: traces from the ``K x K`` Gram of the images ``J u_k``, ``K >= 2``; probes drawn as
            random orthonormal frames, see :mod:`isofast.probes`),
            ``"hutchinson"`` (``Tr H = E||Jv||^2``, ``Tr H^2 = E||J^T J v||^2`` with ``v ~ N(0, I)``)
            or ``"auto"`` (fused path: exact for ``m <= isofast.planning.EXACT_MAX_LATENT``, else
            Hutchinson; generic path: exact for ``m <= GENERIC_EXACT_MAX_LATENT``, else forward).
        n_probes: probes per sample ``K`` (default 1 for Hutchinson, ``FORWARD_PROBES`` for forward); refused with ``estimator="exact"``.
        probes: explicit probes ``(B, K, *latent_shape)``, read as independent ``N(0, I)`` draws
            (a ``generator`` reproduces the default draws instead).
        generator: drives the mixup and probe draws, on ``z``'s device.
        sync: ``True`` or a process group to average over the global batch of all ranks.

    Draw order: mixup permutation, mixup coefficients, then probes.
    """
    p = plan(decoder, z, measure, eta=eta, estimator=estimator, n_probes=n_probes, probes=probes,
             generator=generator, sync=sync)
    z_aug = mixup_unchecked(z, eta, generator)  # plan() validated every argument
    mean = BatchMean(sync)
    if p.estimator != "exact" and probes is None:
        probes = draw_probes(p.probe_distribution, z, p.n_probes, generator)  # type: ignore[arg-type]
    if p.path != "fused_mlp":
        value = _generic_distortion(p, decoder, z_aug, probes, measure, mean)
    elif p.estimator == "exact":
        value = from_metric(measure, _metric(p, z_aug), mean)
    else:
        stats, factor = _scaled_stats(p, z_aug, probes, measure, mean)  # type: ignore[arg-type]
        stats = stats.mean(1)
        value = from_traces(measure, stats[:, 0], stats[:, 1], z.shape[1], mean, factor)
    if can_read_values():
        scale.check_representable(value, measure)
    return value


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

    Cheaper regularisation for long runs, in training mode (``reg.train()``, the default):

    - ``every=k``: lazy regularisation (StyleGAN2). The distortion is computed on every ``k``-th
      call only, starting with the first, and scaled by ``k``, so its expected gradient per call is
      unchanged; the other calls return a zero (0-d, no graph) at the cost of nothing. The call
      count is saved in ``state_dict`` so a resumed run keeps the schedule. Under DDP every rank
      calls in step, so all ranks regularise on the same calls.
    - ``subsample=f``: the distortion of ``ceil(f B)`` codes drawn without replacement from the
      batch (drawn first, with ``generator``), an unbiased estimate of the full batch's.

    In eval mode every call computes the full-batch distortion, unscaled.
    """

    def __init__(
        self,
        measure: str = "scaled_isometry",
        weight: float = 1.0,
        eta: float | None = 0.2,
        estimator: str = "auto",
        n_probes: int | None = None,
        sync: bool | object = False,
        every: int = 1,
        subsample: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice("measure", measure, list(MEASURES))
        check_choice("estimator", estimator, ESTIMATORS)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(subsample, bool) or not isinstance(subsample, (int, float)) or not 0 < subsample <= 1:
            raise ValueError(f"subsample must be a fraction in (0, 1], got {subsample!r}")
        self.measure, self.weight, self.eta = measure, float(weight), check_eta(eta)
        self.estimator, self.n_probes, self.sync = estimator, n_probes, sync
        self.every, self.subsample, self.calls = every, float(subsample), 0

    def forward(self, decoder: Decoder, z: Tensor, generator: torch.Generator | None = None,
                recon_scale: Tensor | float | None = None) -> Tensor:
        """``weight * distortion`` of ``decoder`` on codes ``z (B, ...)``, a 0-d tensor.

        In training mode with ``every = k > 1`` only every k-th call regularises, with the loss
        scaled by ``k`` (the others return a graph-free 0); ``subsample = f < 1`` uses ``ceil(f B)``
        codes drawn with ``generator``. Eval mode always computes the full batch, unscaled.

        ``recon_scale`` (a positive number or 0-d tensor, used detached) multiplies the loss by the
        reconstruction term's current scale, e.g. ``sigma0**2 / sigma**2`` for a Gaussian decoder
        whose learned noise ``sigma`` started at ``sigma0``: the reconstruction gradient grows as
        ``1 / sigma**2`` while ``sigma`` shrinks, and with a constant ``weight`` the regulariser's
        share of the objective fades in proportion (README, "A weighting that keeps the geometry").
        """
        factor = self.weight
        if self.training:
            due = self.calls % self.every == 0
            self.calls += 1
            if not due:
                return torch.zeros((), dtype=acc_dtype(z.dtype), device=z.device)
            factor *= self.every
            if self.subsample < 1:
                n = math.ceil(self.subsample * z.shape[0])
                z = z[torch.randperm(z.shape[0], generator=generator, device=z.device)[:n]]
        loss = factor * distortion(decoder, z, self.measure, eta=self.eta, estimator=self.estimator,
                                  n_probes=self.n_probes, generator=generator, sync=self.sync)
        if recon_scale is None:
            return loss
        if isinstance(recon_scale, Tensor):
            if recon_scale.numel() != 1 or not recon_scale.is_floating_point():
                raise ValueError(f"recon_scale must be a positive number or a one-element float tensor, "
                                 f"got a {recon_scale.dtype} tensor of shape {tuple(recon_scale.shape)}")
            return loss * recon_scale.detach().reshape(()).to(loss.dtype)
        if not (isinstance(recon_scale, (int, float)) and 0 < float(recon_scale) < float("inf")):
            raise ValueError(f"recon_scale must be a finite number > 0, got {recon_scale!r}")
        return loss * float(recon_scale)

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    def plan(self, decoder: Decoder, z: Tensor) -> Plan:
        """What :meth:`forward` will do for these arguments (on a call that regularises)."""
        return plan(decoder, z, self.measure, eta=self.eta, estimator=self.estimator, n_probes=self.n_probes,
                    sync=self.sync)

    def extra_repr(self) -> str:
        return (f"measure={self.measure!r}, weight={self.weight}, eta={self.eta}, estimator={self.estimator!r}, "
                f"every={self.every}, subsample={self.subsample}")
