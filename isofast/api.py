"""The public regulariser API: distortion measures, the IRVAE loss and the pullback metric."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from isofast import scale
from isofast._checks import ESTIMATORS, can_read_values, check_choice, check_eta
from isofast.backends.base import acc_dtype
from isofast.generic import Scaled, forward_traces, generic_metric, hutchinson_traces, path_lengths as _lengths, unscale
from isofast.geometry import whiten_metric
from isofast.measures import MEASURES, PATH_MEASURES, BatchMean, from_metric, from_path_lengths, from_traces
from isofast.mixup import mixup_unchecked
from isofast.ops import mlp_hutchinson, mlp_pullback
from isofast.planning import Plan, plan
from isofast.probes import draw as draw_probes
from isofast.train_mode import frozen_running_stats

Decoder = Callable[[Tensor], Tensor]


def _data_weight(p: Plan, dtype: torch.dtype) -> dict[str, Tensor]:
    """The fused ops' ``data_weight`` keyword: the diagonal data metric in ``dtype``, if any."""
    data = p.geo.data
    if data is None:
        return {}
    data.check_size(p.spec.out_features)  # type: ignore[union-attr]
    return {"data_weight": data.weight.to(dtype)}  # type: ignore[union-attr]


def _metric(p: Plan, z: Tensor) -> Tensor:
    """Exact ``H (B, m, m)`` on the fused MLP path (``J^T G J``, whitened by a latent metric)."""
    dt = p.compute_dtype or z.dtype
    # Under autocast the op gets its inputs in the planned dtype (and keeps autocast out of its kernels).
    spec, zc = (p.spec, z) if p.compute_dtype is None else (p.spec.to(dt), z.to(dt))  # type: ignore[union-attr]
    h = mlp_pullback(p.backend_impl, spec, zc, **_data_weight(p, dt))  # type: ignore[arg-type]
    whitening = p.geo.whitening(z)
    return h if whitening is None else whiten_metric(whitening, h)


def _stats(p: Plan, z: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson statistics ``(B, K, 2)`` on the fused MLP path."""
    dt = p.compute_dtype or z.dtype
    if p.compute_dtype is None:
        return mlp_hutchinson(p.backend_impl, p.spec, z, probes, **_data_weight(p, dt))  # type: ignore[arg-type]
    return mlp_hutchinson(p.backend_impl, p.spec.to(dt), z.to(dt), probes.to(dt), **_data_weight(p, dt))  # type: ignore[arg-type, union-attr]


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


def _outside_inference_mode(fn: Callable[..., object], *args: Tensor) -> object:
    """``fn(*args)``; under ``torch.inference_mode`` (where forward mode is off) outside it, on
    copies of the inputs."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return fn(*(a.clone() for a in args))
    return fn(*args)


def _generic(p: Plan, decoder: Decoder, z: Tensor, probes: Tensor | None, group: object | None) -> Scaled:
    """The generic path's scale-normalised statistics."""
    args = (z,) if probes is None else (z, probes)
    return _outside_inference_mode(lambda *a: _generic_stats(p, decoder, a, group), *args)  # type: ignore[return-value]


def _generic_stats(p: Plan, decoder: Decoder, args: tuple[Tensor, ...], group: object | None) -> Scaled:
    # The stream path computes the tangent images from the decoder's layers (p.spec).
    source = p.spec if p.path == "fused_sequential" else decoder
    geo = p.geo
    with frozen_running_stats(decoder):
        if p.estimator == "exact":
            return generic_metric(source, *args, group=group, geo=geo)  # type: ignore[arg-type]
        if p.estimator == "forward":
            return forward_traces(source, *args, group=group, orthonormal=p.probe_distribution == "orthonormal", geo=geo)  # type: ignore[arg-type]
        return hutchinson_traces(source, *args, group=group, geo=geo)  # type: ignore[arg-type]


def _path_lengths(p: Plan, decoder: Decoder, z: Tensor, generator: torch.Generator | None,
                  group: object | None) -> Tensor:
    """Path lengths ``(B,)`` of the planned call, in the data's units."""
    source = p.spec if p.path == "fused_sequential" else decoder

    def run(zz: Tensor) -> Tensor:
        with frozen_running_stats(decoder):
            lengths, s = _lengths(source, zz, p.estimator, generator, group, p.geo)  # type: ignore[arg-type]
        return unscale(lengths, s, 1, "the path length")

    return _outside_inference_mode(run, z)  # type: ignore[return-value]


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


def pullback_metric(decoder: Decoder, z: Tensor, *, data_metric: object = None, latent_metric: object = None) -> Tensor:
    """Exact pullback metric ``H_b = J(z_b)^T G J(z_b)``, shape ``(B, m, m)``, at codes ``z (B, *latent_shape)``
    with ``m = prod(latent_shape)``.

    ``decoder`` maps ``(B, *latent_shape)`` to ``(B, ...)``; codes and outputs are flattened per
    sample. ``data_metric`` is ``G`` (default the identity; see :func:`distortion`). With a
    ``latent_metric`` ``M(z) = L L^T`` the result is ``L^{-1} H L^{-T}``: ``H`` in an
    ``M``-orthonormal frame, whose eigenvalues are those of ``M^{-1} H`` (1 everywhere for an
    isometry onto ``M``). Differentiable in ``z`` and the decoder's parameters.
    """
    p = plan(decoder, z, measure=None, eta=None, data_metric=data_metric, latent_metric=latent_metric)
    if p.path == "fused_mlp":
        return _metric(p, z)
    sc = _generic(p, decoder, z, None, None)
    return unscale(sc.metric, sc.scale2, 1, "the pullback metric")  # type: ignore[arg-type]


def path_lengths(decoder: Decoder, z: Tensor, *, eta: float | None = None, estimator: str = "auto",
                 generator: torch.Generator | None = None, data_metric: object = None,
                 latent_metric: object = None) -> Tensor:
    """StyleGAN2's path lengths ``L_b = ||J(z_b)^T w_b||`` at codes ``z (B, *latent_shape)``: ``(B,)``.

    ``w_b ~ N(0, I_D) / sqrt(D)`` is drawn in data space (``D`` outputs per sample) with
    ``generator``; with a data metric ``G = R^T R`` the lengths are ``||J^T R^T w||``, with a latent
    metric ``M`` the dual norm ``||L^{-1} J^T R^T w||`` (``M = L L^T``). ``estimator``: ``"exact"``
    (the default under ``"auto"``: ``J^T w`` from ``m`` tangent streams, first order) or
    ``"hutchinson"`` (one VJP, a double backward when differentiated). ``eta``: mixup first
    (default ``None``: the codes as given). Draw order: mixup, then the noise.
    """
    p = plan(decoder, z, "path_length", eta=eta, estimator=estimator, generator=generator,
             data_metric=data_metric, latent_metric=latent_metric)
    return _path_lengths(p, decoder, mixup_unchecked(z, eta, generator), generator, None)


def _evaluate(p: Plan, decoder: Decoder, z: Tensor, eta: float | None, probes: Tensor | None,
              generator: torch.Generator | None, mean: BatchMean,
              path_target: Callable[[Tensor], Tensor | float | None] | None = None) -> Tensor:
    """The planned measure of ``decoder`` on mixup-augmented codes (see :func:`distortion`).
    ``path_target`` maps the path lengths ``(B,)`` to the penalty's target ``a`` (default: none,
    the detached batch mean)."""
    measure = p.measure
    z_aug = mixup_unchecked(z, eta, generator)  # plan() validated every argument
    if measure in PATH_MEASURES:
        lengths = _path_lengths(p, decoder, z_aug, generator, mean.group)
        value = from_path_lengths(lengths, None if path_target is None else path_target(lengths), mean)
    else:
        if p.estimator != "exact" and probes is None:
            probes = draw_probes(p.probe_distribution, z, p.n_probes, generator)  # type: ignore[arg-type]
        if p.path != "fused_mlp":
            value = _generic_distortion(p, decoder, z_aug, probes, measure, mean)  # type: ignore[arg-type]
        elif p.estimator == "exact":
            value = from_metric(measure, _metric(p, z_aug), mean)  # type: ignore[arg-type]
        else:
            stats, factor = _scaled_stats(p, z_aug, probes, measure, mean)  # type: ignore[arg-type]
            stats = stats.mean(1)
            tr, tr2 = stats[:, 0], stats[:, 1]
            whitening = p.geo.whitening(z_aug)
            if whitening is not None:  # conformal (plan routes matrix metrics with probes elsewhere): H / lambda
                inv = whitening.square().to(tr.dtype)
                tr, tr2 = tr * inv, tr2 * inv.square()
            value = from_traces(measure, tr, tr2, z.shape[1], mean, factor)  # type: ignore[arg-type]
    if can_read_values():
        scale.check_representable(value, measure)  # type: ignore[arg-type]
    return value


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
    data_metric: object = None,
    latent_metric: object = None,
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
            ``"volume"`` (variance of ``logdet H``, exact only), ``"jacobian_frobenius"``
            (``mean Tr H``) or ``"path_length"`` (StyleGAN2's ``mean (L_b - a)^2`` of the path
            lengths of :func:`path_lengths`, ``a`` their detached batch mean; exact or hutchinson).
            Means are over the augmented batch.
        eta: mixup range, ``alpha ~ U[-eta, 1 + eta]``, a real number in
            ``[0, isofast._checks.ETA_MAX]`` (1000); ``None`` uses ``z`` as given.
        estimator: ``"exact"`` (H from ``m`` tangent streams), ``"forward"`` (first order, generic
            path: traces from the ``K x K`` Gram of the images ``J u_k``, ``K >= 2``; probes drawn as
            random orthonormal frames, see :mod:`isofast.probes`),
            ``"hutchinson"`` (``Tr H = E||Jv||^2``, ``Tr H^2 = E||J^T J v||^2`` with ``v ~ N(0, I)``)
            or ``"auto"`` (fused path: exact for ``m <= isofast.planning.EXACT_MAX_LATENT``, else
            Hutchinson; generic path: exact for ``m <= GENERIC_EXACT_MAX_LATENT``, else forward).
        n_probes: probes per sample ``K`` (default 1 for Hutchinson, ``planning.auto_forward_probes(m)`` for forward: 8 up to m = 32, 16 above); refused with ``estimator="exact"``.
        probes: explicit probes ``(B, K, *latent_shape)``, read as independent ``N(0, I)`` draws
            (a ``generator`` reproduces the default draws instead).
        generator: drives the mixup and probe draws, on ``z``'s device.
        sync: ``True`` or a process group to average over the global batch of all ranks.
        data_metric: the data-space metric ``G`` of ``H = J^T G J`` (:mod:`isofast.geometry`):
            ``None`` (identity), positive per-output weights (a tensor of ``D`` entries: a diagonal
            ``G``), ``isofast.geometry.spd_matrix(G)`` for a fixed SPD ``(D, D)`` matrix, or a
            callable ``(x (N, D), w (N, D)) -> G(x) w`` on rows flattened per sample.
        latent_metric: the metric ``M(z)`` the distortion is measured against (the measures see
            the eigenvalues of ``M^{-1} H``): ``None`` (identity), ``"sphere_stereographic"``, a
            fixed SPD ``(m, m)`` tensor, or a callable mapping codes ``(B, m)`` to ``(B,)``
            conformal factors or ``(B, m, m)`` metrics.

    Draw order: mixup permutation, mixup coefficients, then probes (or the path-length noise).
    """
    p = plan(decoder, z, measure, eta=eta, estimator=estimator, n_probes=n_probes, probes=probes,
             generator=generator, sync=sync, data_metric=data_metric, latent_metric=latent_metric)
    return _evaluate(p, decoder, z, eta, probes, generator, BatchMean(sync))


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
    data_metric: object = None,
    latent_metric: object = None,
) -> Tensor:
    """IRVAE's loss ``mean_b Tr H_b^2 / (mean_b Tr H_b)^2``: :func:`distortion` with
    ``measure="scaled_isometry"``. Scale invariant; its minimum ``1/m`` means ``H = c I``
    (``H = c M`` with a latent metric)."""
    return distortion(decoder, z, "scaled_isometry", eta=eta, estimator=estimator, n_probes=n_probes,
                      probes=probes, generator=generator, sync=sync, data_metric=data_metric,
                      latent_metric=latent_metric)


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

    ``measure="path_length"`` is StyleGAN2's path-length regulariser ``mean (L_b - a)^2``: ``a`` is an
    exponential moving average of the mean path length kept in the buffer ``pl_mean`` (updated
    first on every regularising call in training mode, ``a <- a + pl_decay (mean L - a)``, from 0;
    read as is in eval mode). ``data_metric`` and ``latent_metric`` are those of :func:`distortion`.
    """

    pl_mean: Tensor

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
        data_metric: object = None,
        latent_metric: object = None,
        pl_decay: float = 0.01,
    ) -> None:
        super().__init__()
        check_choice("measure", measure, [*MEASURES, *PATH_MEASURES])
        check_choice("estimator", estimator, ESTIMATORS)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(subsample, bool) or not isinstance(subsample, (int, float)) or not 0 < subsample <= 1:
            raise ValueError(f"subsample must be a fraction in (0, 1], got {subsample!r}")
        self.measure, self.weight, self.eta = measure, float(weight), check_eta(eta)
        self.estimator, self.n_probes, self.sync = estimator, n_probes, sync
        self.every, self.subsample, self.calls = every, float(subsample), 0
        self.data_metric, self.latent_metric = data_metric, latent_metric
        if not (isinstance(pl_decay, (int, float)) and not isinstance(pl_decay, bool) and 0 < pl_decay <= 1):
            raise ValueError(f"pl_decay must be a number in (0, 1], got {pl_decay!r}")
        self.pl_decay = float(pl_decay)
        if measure in PATH_MEASURES:
            self.register_buffer("pl_mean", torch.zeros((), dtype=torch.float32))

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
        p = self.plan(decoder, z, generator)
        loss = factor * _evaluate(p, decoder, z, self.eta, None, generator, BatchMean(self.sync), self._path_target)
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

    def _path_target(self, lengths: Tensor) -> Tensor:
        """The path-length target: the running mean, first moved towards this batch's mean in training mode."""
        if self.training:
            (batch_mean,) = BatchMean(self.sync)(lengths.detach().to(self.pl_mean.dtype))
            self.pl_mean.lerp_(batch_mean.to(self.pl_mean.device), self.pl_decay)
        return self.pl_mean

    def plan(self, decoder: Decoder, z: Tensor, generator: torch.Generator | None = None) -> Plan:
        """What :meth:`forward` will do for these arguments (on a call that regularises)."""
        return plan(decoder, z, self.measure, eta=self.eta, estimator=self.estimator, n_probes=self.n_probes,
                    generator=generator, sync=self.sync, data_metric=self.data_metric, latent_metric=self.latent_metric)

    def extra_repr(self) -> str:
        return (f"measure={self.measure!r}, weight={self.weight}, eta={self.eta}, estimator={self.estimator!r}, "
                f"every={self.every}, subsample={self.subsample}")
