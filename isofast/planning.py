"""``isofast.plan``: which path, backend, estimator and precision a call takes, and why.

Every public entry point builds its :class:`Plan` first and then executes it, so what ``plan``
reports is exactly what runs; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from isofast import _checks, backends, dispatch, geometry
from isofast.backends.base import Backend, acc_dtype, autocast_dtype
from isofast.geometry import IDENTITY, Geometry
from isofast.measures import EXACT_ONLY, MEASURES, PATH_MEASURES
from isofast.mlp import MLPSpec, extract_mlp
from isofast.streams import SequentialSpec, extract_sequential, plan_sequential

#: ``estimator="auto"`` takes the exact metric up to this latent width and Hutchinson above it:
#: exact wherever it costs no more than the official one-probe Hutchinson estimator. Measured
#: (benchmarks/results/cpu, paper decoder, batch 1024, fwd+bwd, cpu backend, exact / Hutchinson
#: K=1 time): 0.94 at m = 2, 1.8 at m = 4, 3.0 at m = 8, 5.8 at m = 16, while one probe leaves a
#: relative standard deviation of 60% (m = 2) to 170% (m = 64) in the parameter gradient. Ask for
#: ``estimator="exact"`` to buy zero variance at larger m.
EXACT_MAX_LATENT = 2

#: The generic and stream paths' ``auto``, by gradient variance per unit time
#: (benchmarks/results/estimator_choice*.md: an MLP, the DeConvNet28-style conv decoder on the
#: generic and stream paths, a residual GroupNorm/attention decoder; at initialisation and after
#: regularising each to MCN 1.5):
#:
#: - ``m <= GENERIC_EXACT_MAX_LATENT``: exact (``m`` tangent streams cost no more than the probes);
#: - up to :data:`WIDE_LATENT`: ``forward`` on :data:`FORWARD_PROBES` orthonormal directions; at
#:   m = 16 it leaves 0.35-0.71 times the official recipe's variance per unit time, less than
#:   Hutchinson on every decoder, while K = 2 leaves 4-20 times the official recipe's;
#: - above: Hutchinson with one probe (first order, :func:`isofast.generic.hutchinson_traces`) on the
#:   stream path, whose kept primal pass makes it about twice as fast as the official recipe per step
#:   with the same variance (1.6-6 times less variance per unit time than ``forward`` with K = 16 at
#:   m = 64 and 256); on the generic path, where forward mode runs the decoder twice for it, above
#:   :data:`GENERIC_HUTCHINSON_LATENT` only (better at m = 256 on every decoder, worse than K = 16
#:   on two of three at m = 64), with ``forward`` on :data:`FORWARD_PROBES_WIDE` directions between.
#:
#: ``n_probes=2`` with ``estimator="forward"`` is the fast setting per step.
FORWARD_PROBES = 8
FORWARD_PROBES_WIDE = 16
WIDE_LATENT = 32
GENERIC_HUTCHINSON_LATENT = 128
GENERIC_EXACT_MAX_LATENT = FORWARD_PROBES


def auto_forward_probes(m: int) -> int:
    """``K`` of the forward estimator at latent width ``m`` (``auto``'s, and the default of an explicit
    ``estimator="forward"``)."""
    return FORWARD_PROBES if m <= WIDE_LATENT else FORWARD_PROBES_WIDE


#: The largest exact pullback metric the generic path builds: ``B m^2`` entries.
MAX_METRIC_ENTRIES = 2**28


@dataclass(frozen=True)
class Plan:
    """What a call does. ``path`` is ``"fused_mlp"``, ``"fused_sequential"`` or ``"generic"``; ``n_probes`` is ``None``
    for the exact estimator; ``precision`` says in which dtypes the GEMMs run and the traces
    accumulate (e.g. ``"bfloat16 GEMMs (autocast), float32 accumulation"``); ``reasons`` maps
    ``"path"``, ``"backend"``, ``"estimator"`` and ``"precision"`` to why, and ``"ops"`` to the
    implementation of every registered op (:mod:`isofast.dispatch`) the call runs, e.g.
    ``"mlp_pullback: cpu (C++ extension); logdet: cpu (...)"``.

    ``probe_distribution`` is ``None`` (exact) or how the probes are drawn (or, when given, read):
    ``"gaussian"`` or ``"orthonormal"`` (:mod:`isofast.probes`).

    ``compute_dtype`` (fused path only) is the dtype the fused op runs in when it differs from the
    inputs' or autocast is on: the call then casts to it and runs with autocast disabled.

    ``geometry`` holds the call's data and latent metrics (:mod:`isofast.geometry`), ``None`` when
    neither is given; otherwise ``reasons["geometry"]`` says which and how they are applied."""

    path: str
    backend: str
    estimator: str
    n_probes: int | None
    measure: str | None
    reasons: dict[str, str]
    precision: str = ""
    latent_shape: tuple[int, ...] = ()
    spec: MLPSpec | SequentialSpec | None = field(default=None, repr=False, compare=False)
    backend_impl: Backend | None = field(default=None, repr=False, compare=False)
    compute_dtype: torch.dtype | None = field(default=None, repr=False, compare=False)
    probe_distribution: str | None = None
    geometry: Geometry | None = field(default=None, repr=False, compare=False)

    @property
    def geo(self) -> Geometry:
        """:attr:`geometry`, with :data:`isofast.geometry.IDENTITY` for ``None``."""
        return IDENTITY if self.geometry is None else self.geometry

    def __str__(self) -> str:
        probes = "" if self.n_probes is None else f", K={self.n_probes}"
        head = f"isofast plan: path={self.path}, backend={self.backend}, estimator={self.estimator}{probes}"
        if self.measure is not None:
            head += f", measure={self.measure}"
        if self.precision:
            head += f", precision={self.precision}"
        return "\n".join([head] + [f"  {k}: {v}" for k, v in self.reasons.items()])


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_params(spec: MLPSpec, z: Tensor, autocast: torch.dtype | None) -> torch.dtype:
    """The decoder's parameter dtype, after checking every layer against ``z``: same device, and
    the same dtype (under autocast any of float32/float16/bfloat16 mix, as in the module)."""
    dtype, device = z.dtype, z.device
    if all(t is None or (t.dtype == dtype and t.device == device) for t in spec.params()):
        return dtype  # the common case, checked first: plan() runs on every call
    mixable = (torch.float32, torch.float16, torch.bfloat16)
    dtype = spec.weights[0].dtype
    for i, (w, b) in enumerate(zip(spec.weights, spec.biases)):
        for what, t in (("weight", w), ("bias", b)):
            if t is None:
                continue
            where = f"the decoder's nn.Linear layer {i} {what}"
            if t.device != z.device:
                raise ValueError(f"z must be on the decoder's device: {where} is on {t.device}, z on {z.device}")
            if t.dtype == z.dtype and t.dtype == dtype:
                continue
            if autocast is not None and t.dtype in mixable and z.dtype in mixable and dtype in mixable:
                continue
            raise TypeError(
                f"z must have the decoder's dtype: {where} is {t.dtype}, the first weight {dtype}, z {z.dtype}"
                + ("" if autocast is None else " (autocast mixes only float32, float16 and bfloat16)")
            )
    return dtype


def _path(decoder: object, z: Tensor) -> tuple[MLPSpec | None, str]:
    if not callable(decoder):
        raise TypeError(f"decoder must be a callable or nn.Module mapping (B, m) to (B, ...), got {type(decoder).__name__}")
    if not isinstance(decoder, nn.Module):
        return None, "decoder is a plain callable, not an nn.Module"
    spec, why = extract_mlp(decoder)
    if spec is None:
        return None, why
    if z.dim() != 2:
        return None, f"{why}, but z has latent shape {tuple(z.shape[1:])} and the fused path takes (B, m)"
    m = z.shape[1]
    if spec.in_features != m:
        raise ValueError(f"z has latent width m = {m} but the decoder's first nn.Linear expects {spec.in_features}")
    return spec, why


def _fused_precision(impl: Backend, z: Tensor, dtype: torch.dtype,
                     autocast: torch.dtype | None) -> tuple[torch.dtype | None, str, str]:
    """``(compute_dtype, precision, why)`` of the fused op for parameters of ``dtype``."""
    acc = _name(acc_dtype(dtype))
    if autocast is None or dtype == torch.float64 or z.dtype == torch.float64:
        gemm = _name(dtype)
        mode = backends.current_precision()
        if impl.name == "triton" and mode != "fp32" and dtype == torch.float32:
            return None, f"{mode} GEMM operands, {acc} accumulation", f"isofast.backends.precision({mode!r})"
        why = "autocast does not apply to float64" if autocast is not None else "the decoder's dtype"
        return None, f"{gemm} GEMMs, {acc} accumulation", why
    ok, not_why = impl.supports(z.device, autocast)
    if ok:
        return autocast, f"{_name(autocast)} GEMMs (autocast), float32 accumulation", \
            f"autocast {_name(autocast)}; traces and the loss accumulate and return in float32"
    return torch.float32, "float32 GEMMs, float32 accumulation", \
        f"autocast asks for {_name(autocast)} but the {impl.name} backend cannot run it ({not_why}): it runs float32"


def _generic_precision(z: Tensor, autocast: torch.dtype | None) -> tuple[str, str]:
    acc = _name(acc_dtype(z.dtype))
    if autocast is None or z.dtype == torch.float64:
        return f"{_name(z.dtype)} GEMMs, {acc} accumulation", "the decoder runs in its own dtypes"
    return f"autocast {_name(autocast)} GEMMs, {acc} accumulation", f"the decoder runs under autocast {_name(autocast)}"


def _estimator(
    estimator: str, measure: str | None, m: int, probes: Tensor | None, n_probes: int | None, fused: bool,
    stream: bool = False,
) -> tuple[str, str]:
    if measure in PATH_MEASURES:
        return _path_length_estimator(estimator, probes, n_probes)
    if n_probes is not None and estimator == "exact":
        raise ValueError(f"n_probes is only used by estimator='forward' or 'hutchinson' (or 'auto'), got "
                         f"n_probes={n_probes} with estimator='exact'")
    if probes is not None:
        if estimator == "exact":
            raise ValueError("probes are only used by estimator='forward', 'hutchinson' (or 'auto'), got estimator='exact'")
        if estimator == "auto":
            if fused:
                return "hutchinson", "probes were given (estimator='forward' takes them too)"
            if probes.shape[1] >= 2:
                return "forward", "auto: probes were given, K >= 2: the first-order estimator on their pairs"
            return "hutchinson", ("one probe was given: Hutchinson (first order: a plain VJP and a second tangent "
                                  "image per probe, no double backward)")
    if estimator == "auto":
        if measure in EXACT_ONLY:
            chosen, why = "exact", f"measure {measure!r} needs the exact metric"
        elif fused and m <= EXACT_MAX_LATENT:
            chosen, why = "exact", f"auto: latent width m = {m} <= {EXACT_MAX_LATENT}, exact is no dearer than one probe and has no variance"
        elif fused:
            chosen, why = "hutchinson", f"auto: latent width m = {m} > {EXACT_MAX_LATENT}, exact would carry m streams and cost more than one probe"
        elif m <= GENERIC_EXACT_MAX_LATENT:
            chosen, why = "exact", (f"auto (generic): m = {m} <= {GENERIC_EXACT_MAX_LATENT}, the exact metric's {m} tangent "
                                    f"streams cost no more than the forward estimator's {FORWARD_PROBES} and have no variance")
        elif m > (WIDE_LATENT if stream else GENERIC_HUTCHINSON_LATENT) and torch.compiler.is_compiling():
            chosen, why = "forward", (f"auto under torch.compile: m = {m}, the first-order estimator with "
                                      f"{auto_forward_probes(m)} probe directions (Hutchinson, otherwise chosen here, "
                                      f"calls autograd.grad, which would break the compiled graph)")
        elif m > (WIDE_LATENT if stream else GENERIC_HUTCHINSON_LATENT):
            where = "stream path, whose kept primal pass carries both tangent images" if stream else "generic"
            chosen, why = "hutchinson", (f"auto ({where}): m = {m} > {WIDE_LATENT if stream else GENERIC_HUTCHINSON_LATENT}, "
                                         f"Hutchinson with one probe, first order (a plain VJP and a second tangent "
                                         f"image): the least gradient variance per unit time (isofast.planning)")
        else:
            chosen, why = "forward", (f"auto (generic): m = {m} > {GENERIC_EXACT_MAX_LATENT}, the first-order estimator with "
                                      f"{auto_forward_probes(m)} probe directions, the least gradient variance per unit time "
                                      f"(isofast.planning; n_probes=2 is faster per step, with several times the gradient "
                                      f"variance per unit time)")
    else:
        chosen, why = estimator, "requested"
    if chosen == "exact" and n_probes is not None:
        why += f"; n_probes={n_probes} is unused (it applies to the probe estimators only)"
    if chosen in ("hutchinson", "forward") and measure in EXACT_ONLY:
        raise ValueError(f"measure {measure!r} needs estimator='exact' (it uses det H), got estimator={estimator!r}")
    return chosen, why


def _path_length_estimator(estimator: str, probes: Tensor | None, n_probes: int | None) -> tuple[str, str]:
    if probes is not None or n_probes is not None:
        raise ValueError("the path_length measure draws its own data-space noise (one draw per sample); "
                         f"probes and n_probes do not apply, got {'probes' if probes is not None else f'n_probes={n_probes}'}")
    if estimator == "forward":
        raise ValueError("measure 'path_length' needs J^T w: estimator='exact' (first order, m tangent streams) or "
                         "'hutchinson' (one VJP, a double backward when differentiated), got estimator='forward'")
    if estimator == "hutchinson":
        return "hutchinson", "requested: J^T w by one VJP through the decoder (StyleGAN2's recipe; a double backward)"
    why = "requested" if estimator == "exact" else "auto"
    return "exact", f"{why}: J^T w = [(J e_i) . w]_i from m tangent streams (first order, no double backward)"


def _fused_refusal(geo: Geometry, measure: str | None, exact: bool) -> str | None:
    """Why the fused MLP path cannot run this call's geometry, or ``None`` when it can."""
    if measure in PATH_MEASURES:
        return f"the fused MLP kernels compute no J^T w for the {measure!r} measure"
    data = geo.data
    if data is not None:
        if data.kind != "diagonal":
            return f"the fused MLP kernels take a diagonal data metric only, got a {data.describe()}"
        if data.weight.requires_grad:  # type: ignore[union-attr]
            return "the data_metric weights require grad, and the fused MLP kernels treat them as constants"
    if geo.latent is not None and geo.latent.kind == "matrix" and not exact:
        return ("a matrix latent metric with a probe estimator needs probes that depend on z, and the fused MLP "
                "kernels treat probes as constants")
    return None


def _geometry_reason(geo: Geometry, path: str) -> str:
    parts = []
    if geo.data is not None:
        how = {"diagonal": "tangent images weighted by sqrt(w)", "matrix": "tangent images multiplied by G's Cholesky factor",
               "product": "Grams a^T G(x) b from the metric-vector product"}[geo.data.kind]
        if path == "fused_mlp":
            how = "in the fused kernels' epilogue (H = J^T diag(w) J)"
        parts.append(f"data metric: {geo.data.describe()}, {how}")
    if geo.latent is not None:
        if path == "fused_mlp":
            how = "H whitened after the fused op" if geo.latent.kind == "matrix" else "traces divided by lambda(z), lambda(z)^2"
        else:
            how = "tangent vectors whitened, S u with S S^T = M^-1 (gradients include M's dependence on z)"
        parts.append(f"{geo.latent.describe()}; {how}")
    return "; ".join(parts)


def plan(
    decoder: object,
    z: Tensor,
    measure: str | None = "scaled_isometry",
    *,
    eta: float | None = 0.2,
    estimator: str = "auto",
    n_probes: int | None = None,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
    sync: bool | object = False,
    data_metric: object = None,
    latent_metric: object = None,
) -> Plan:
    """Validate a call's arguments and say which path, backend, estimator and precision it takes, and why.

    Takes the keywords of :func:`isofast.distortion`; ``measure=None`` plans
    :func:`isofast.pullback_metric` (always exact). ``print(isofast.plan(...))`` explains it.
    """
    _checks.check_z(z)
    if measure is not None:
        _checks.check_choice("measure", measure, [*MEASURES, *PATH_MEASURES])
    _checks.check_choice("estimator", estimator, _checks.ESTIMATORS)
    _checks.check_eta(eta)
    _checks.check_generator(generator, z)
    if n_probes is not None and (isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1):
        raise ValueError(f"n_probes must be an int >= 1, got {n_probes!r}")
    if probes is not None:
        _checks.check_probes(probes, z)
        if n_probes is not None and n_probes != probes.shape[1]:
            raise ValueError(f"n_probes = {n_probes} disagrees with probes of K = {probes.shape[1]}")
    if not isinstance(sync, bool) and not isinstance(sync, torch.distributed.ProcessGroup):
        raise TypeError(f"sync must be a bool or a torch.distributed ProcessGroup, got {type(sync).__name__}")
    if sync is not False and not torch.distributed.is_initialized():
        raise ValueError("sync=True needs an initialised torch.distributed process group")
    m = z[0].numel()
    geo = Geometry(geometry.data_metric(data_metric, z), geometry.latent_metric(latent_metric, z))
    if measure in PATH_MEASURES and geo.data is not None and geo.data.kind == "product":
        raise ValueError("the path_length measure needs G^(1/2): give data_metric as per-output weights or an "
                         "SPD matrix, not a metric-vector product")
    autocast = autocast_dtype(z.device)
    spec, path_why = _path(decoder, z)
    if spec is not None and estimator == "forward":
        spec, path_why = None, f"{path_why}, but the fused MLP path has no estimator='forward'"
    impl, refusal = None, None
    if spec is not None and (geo or measure in PATH_MEASURES):
        dtype = _check_params(spec, z, autocast)
        impl, backend_why = backends.select(z.device, dtype)
        exact = measure is None or estimator == "exact" or (estimator == "auto" and probes is None and m <= EXACT_MAX_LATENT)
        refusal = _fused_refusal(geo, measure, exact)
        if refusal is not None:
            spec, path_why = None, f"{path_why}, but {refusal}"
    if measure is None:
        if estimator in ("hutchinson", "forward") or probes is not None:
            raise ValueError(f"pullback_metric is exact; estimator={estimator!r} and probes do not apply")
        chosen, est_why = "exact", "the pullback metric is computed exactly"
    else:
        # auto tells the stream path from the generic one only above WIDE_LATENT: recognise it only then
        stream = (estimator == "auto" and probes is None and m > WIDE_LATENT and spec is None
                  and extract_sequential(decoder)[0] is not None)
        chosen, est_why = _estimator(estimator, measure, m, probes, n_probes, spec is not None, stream)
    default_k = auto_forward_probes(m) if chosen == "forward" else 1
    k = None if chosen == "exact" else (probes.shape[1] if probes is not None else (n_probes or default_k))
    if chosen == "forward" and k < 2:
        raise ValueError(f"estimator='forward' needs n_probes >= 2 (pairs of probes estimate Tr H^2), got {k}")
    distribution, dist_why = _probe_distribution(chosen, k, m, probes is not None)
    est_why = f"{est_why}; {dist_why}" if dist_why else est_why
    if spec is None:
        p = _generic_plan(decoder, z, chosen, k, measure, path_why, est_why, autocast, distribution, geo)
        if refusal is not None and refusal not in p.reasons["path"]:
            p.reasons["path"] += f"; not the fused MLP path: {refusal}"
        if geo:
            p.reasons["geometry"] = _geometry_reason(geo, p.path)
            return dataclasses.replace(p, geometry=geo)
        return p
    if impl is None:
        dtype = _check_params(spec, z, autocast)
        impl, backend_why = backends.select(z.device, dtype)
    if geo.data is not None and not impl.diagonal_data_metric:
        # the torch twin implements every fused op with the diagonal data metric
        impl, backend_why = backends.get("torch"), f"the {impl.name} backend has no diagonal data metric; its torch twin has"
    compute, precision, prec_why = _fused_precision(impl, z, dtype, autocast)
    fused_op = "mlp_pullback" if chosen == "exact" else "mlp_hutchinson"
    ops = [dispatch.resolve(fused_op, impl, z.device, compute or dtype), *_spectral_ops(measure, chosen, z)]
    reasons = {"path": f"fused_mlp: {path_why}", "backend": f"{impl.name}: {backend_why}", "estimator": est_why,
               "precision": prec_why, "shapes": _shapes(z, chosen, k), "ops": dispatch.describe(ops)}
    if geo:
        reasons["geometry"] = _geometry_reason(geo, "fused_mlp")
    return Plan("fused_mlp", impl.name, chosen, k, measure, reasons, precision, tuple(z.shape[1:]), spec, impl,
                compute, distribution, geo if geo else None)


def _probe_distribution(estimator: str, k: int | None, m: int, given: bool) -> tuple[str | None, str]:
    """How the probes are drawn (or read), and why: the first-order estimator takes orthonormal
    frames where it can (exact at ``K = m`` and at ``H = c I``, less variance than independent
    draws wherever measured; docs/maths.md section 3)."""
    if estimator == "exact":
        return None, ""
    if estimator == "hutchinson":
        return "gaussian", "" if given else "probes drawn N(0, I)"
    if given:
        return "gaussian", "the given probes are read as independent N(0, I) draws (pairs of their images estimate Tr H^2)"
    if k > m:  # type: ignore[operator]
        return "gaussian", (f"K = {k} > m = {m}: independent N(0, I) probes (an orthonormal frame has at most m "
                            f"vectors, and K = m of them would give the exact traces)")
    return "orthonormal", f"probes: sqrt(m) times {k} random orthonormal directions per sample (isofast.probes)"


def _shapes(z: Tensor, estimator: str, k: int | None) -> str:
    bsz, latent, m = z.shape[0], tuple(z.shape[1:]), z[0].numel()
    dims = ", ".join(map(str, latent))
    probes = "" if k is None else f", probes ({bsz}, {k}, {dims})"
    streams = m if estimator == "exact" else 2 * k if estimator == "hutchinson" else k  # type: ignore[operator]
    return f"z ({bsz}, {dims}), m = {m}{probes}, {streams} tangent streams per sample, pullback metric ({bsz}, {m}, {m})"


def _generic_plan(decoder: object, z: Tensor, chosen: str, k: int | None, measure: str | None, path_why: str,
                  est_why: str, autocast: torch.dtype | None, distribution: str | None, geo: Geometry) -> Plan:
    from isofast import forward_ad_fixes, train_mode

    forced = backends.forced()
    if forced not in (None, "torch"):
        raise ValueError(f"backend {forced!r} runs only the fused MLP path, but this decoder is not fusable: {path_why}")
    bsz, m = z.shape[0], z[0].numel()
    if chosen == "exact" and bsz * m * m > MAX_METRIC_ENTRIES:
        gib = bsz * m * m * torch.finfo(z.dtype).bits / 8 / 2**30
        raise ValueError(f"the exact pullback metric for z of shape {tuple(z.shape)} is ({bsz}, {m}, {m}): {gib:.1f} GiB "
                         f"and {m} tangent streams per sample, over the limit of {MAX_METRIC_ENTRIES} entries; "
                         f"use estimator='forward' or fewer latent dimensions")
    if isinstance(decoder, nn.Module):
        params = [p for p in decoder.parameters() if p.is_floating_point()]
        if params and params[0].dtype != z.dtype:
            raise TypeError(f"z must have the decoder's dtype {params[0].dtype}, got {z.dtype}")
    precision, prec_why = _generic_precision(z, autocast)
    seq, path_why = plan_sequential(decoder, z, chosen, path_why, graph_vjp=chosen == "hutchinson" and measure in PATH_MEASURES)
    if seq is not None:
        return Plan("fused_sequential", "torch", chosen, k, measure,
                    {"path": f"fused_sequential: {path_why}",
                     "backend": ("torch: the stream path runs the decoder's own layer ops over B (1 + K) rows"
                                 if chosen != "hutchinson" else
                                 "torch: the stream path keeps one primal pass of the decoder's own layer ops and "
                                 "carries J v and J (J^T J v) through it (B K rows each), with one plain VJP between"),
                     "estimator": est_why, "shapes": _shapes(z, chosen, k), "precision": prec_why,
                     "ops": _generic_ops(z, chosen, measure, geo)},
                    precision, tuple(z.shape[1:]), seq, probe_distribution=distribution)
    reasons = {
        "path": f"generic: {path_why}",
        "backend": ("torch: the generic path uses torch.func.jvp over batched tangents (primal once per sample"
                    + ("; twice for Hutchinson, whose second tangent J (J^T J v) follows a plain VJP" if chosen == "hutchinson"
                       else "") + "); its Gram/trace reductions run as reasons['ops'] says"),
        "estimator": est_why,
        "shapes": _shapes(z, chosen, k),
        "ops": _generic_ops(z, chosen, measure, geo),
        "operators": f"during the tangent pass: {forward_ad_fixes.DESCRIPTION}",
        "precision": f"{prec_why}; tangent images divided by a detached batch scale, then Grams and traces in "
                     f"{torch.finfo(acc_dtype(z.dtype)).dtype} with autocast off",
    }
    caveat = train_mode.describe(decoder)
    if caveat:
        reasons["train_mode"] = caveat
    return Plan("generic", "torch", chosen, k, measure, reasons, precision, tuple(z.shape[1:]),
                probe_distribution=distribution)


def _spectral_ops(measure: str | None, estimator: str, z: Tensor) -> list[dispatch.Choice]:
    """The spectral op a measure runs on ``H``: ``logdet`` for ``volume`` (exact metrics only)."""
    if measure != "volume" or estimator != "exact":
        return []
    return [dispatch.select("logdet", z.device, acc_dtype(z.dtype))]


def _generic_ops(z: Tensor, estimator: str, measure: str | None, geo: Geometry) -> str:
    """``reasons["ops"]`` of the generic and stream paths: their reductions of the tangent images
    (in the accumulation dtype; :mod:`isofast.generic`) and any spectral op."""
    if estimator == "hutchinson":
        names = ["tangent_sqnorm"]  # the norms of J^T J v, and of J v but under a product-form metric
    elif measure in PATH_MEASURES or (geo.data is not None and geo.data.kind == "product"):
        names = []  # a matrix product with the noise, or the Grams a (G a)^T
    else:
        names = ["tangent_gram"]
    acc = acc_dtype(z.dtype)
    ops = [dispatch.select(name, z.device, acc) for name in names] + _spectral_ops(measure, estimator, z)
    return dispatch.describe(ops) if ops else "none of the registered ops"
