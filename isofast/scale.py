"""Scale: keep the measures representable in fp32 and bf16 over Jacobian scales 1e-15 to 1e15.

For a Jacobian of scale ``s``, ``H = J^T J`` and ``||J v||^2`` are of order ``s^2`` (representable
in fp32 for ``s`` up to about ``1e19``), but ``Tr H^2`` and ``||J^T J v||^2`` are of order ``s^4``
and under/overflow fp32 beyond ``s`` of about ``1e-9`` to ``1e9``. The ratio measures
(:data:`SCALE_INVARIANT`) do not change when ``H`` is multiplied by a constant, so:

- exact metrics: :func:`normalise_metric` divides ``H (B, m, m)`` by a detached positive scale
  before anything is squared; a detached constant leaves the value and its gradient exact;
- Hutchinson statistics: both are quadratic in the probe, so probes ``a v`` give ``a^2 ||J v||^2``
  (order ``a^2 s^2``) and ``a^2 ||J^T J v||^2`` (order ``a^2 s^4``). A probe scale cannot close
  their ``s^2`` gap, but ``a^2 = s^-3`` centres them (orders ``1/s`` and ``s``), and the ratio
  measures are then ``a^2 E||J^T J v||^2 / (E||J v||^2)^2`` of the rescaled statistics, evaluated
  as ``(a m2 / m1) (a / m1)`` so no intermediate leaves the range. :func:`probe_rescale` reads the
  first statistics and returns the detached ``a`` to recompute them with, when they are out of the
  safe range (eager mode only: it reads a value back to the host);
- :func:`check_representable` raises where a measure's value still is not finite (eager mode),
  e.g. the non-invariant ``isometry`` of order ``s^4``.

Both paths (fused and generic) use these functions; with ``sync`` the scales are the same on
every rank (a MAX all-reduce), so the global-batch ratio stays exact.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

#: Measures whose value is unchanged when ``H`` is multiplied by a positive constant.
SCALE_INVARIANT = ("scaled_isometry", "conformal")

#: Batch mean of ``||J v||^2`` inside which the first Hutchinson statistics are kept: their
#: squares (``~ ||J^T J v||^2``) stay within ``1e-16 .. 1e16``, far from fp32's limits.
PROBE_SAFE_RANGE = (1e-8, 1e8)


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, defined as 0 (with zero gradient) where ``den == 0``."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _all_max(x: Tensor, group: object | None) -> Tensor:
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def metric_scale(h: Tensor, per_sample: bool = False, group: object | None = None) -> Tensor:
    """Detached positive scale of exact metrics ``h (B, m, m)``: ``max_b Tr H_b`` (a 0-d tensor,
    the maximum over ``group``'s ranks too) or, with ``per_sample``, ``Tr H_b`` shaped
    ``(B, 1, 1)``. Zero traces (a vanishing Jacobian, where ``H = 0``) get the smallest normal
    number, which leaves ``H / c = 0``."""
    tr = torch.diagonal(h.detach(), dim1=1, dim2=2).sum(-1)
    c = tr.view(-1, 1, 1) if per_sample else _all_max(tr.amax(), group)
    return c.clamp_min(torch.finfo(c.dtype).tiny)


def normalise_metric(h: Tensor, per_sample: bool = False, group: object | None = None) -> Tensor:
    """``h / metric_scale(h)``: traces of order 1, so ``Tr (H / c)^2`` neither under- nor overflows."""
    return h / metric_scale(h, per_sample, group)


def probe_rescale(stats: Tensor, group: object | None = None) -> float | None:
    """The factor ``a`` to multiply the probes by so Hutchinson ``stats (B, K, 2)`` (``||J v||^2``,
    ``||J^T J v||^2``) are representable, or ``None`` when they already are. Recompute the
    statistics with probes ``a v`` and combine them with :func:`rescaled_ratio`.

    Reads two numbers back to the host (call it only where :func:`isofast._checks.can_read_values`).
    Raises ``ValueError`` when ``||J v||^2`` itself is not finite (a Jacobian scale beyond ~1e19 in
    fp32), which no probe scale repairs.
    """
    # Statistics are squared norms (>= 0): a NaN or Inf anywhere makes its column's sum non-finite.
    sums = _all_max(stats.detach().sum((0, 1)), group)
    tr_sum, tr2_sum = sums.tolist()
    mean_tr = tr_sum / (stats.shape[0] * stats.shape[1])
    bad = not math.isfinite(tr2_sum)
    if not math.isfinite(mean_tr):
        raise ValueError(
            f"Hutchinson statistic ||J v||^2 is not finite in {stats.dtype}: the decoder's Jacobian is too "
            "large to represent (scale beyond ~1e19); rescale the decoder's output or use float64"
        )
    lo, hi = PROBE_SAFE_RANGE
    if mean_tr == 0 or (lo <= mean_tr <= hi and not bad):
        return None
    return mean_tr**-0.75  # a^2 = s^-3 with s^2 ~ mean ||J v||^2


def rescaled_ratio(num: Tensor, den: Tensor, factor: float | None) -> Tensor:
    """``factor^2 num / den^2`` (0 where ``den == 0``), without forming ``den^2``: the ratio
    measures' ``Tr H^2 / (Tr H)^2`` from statistics of probes scaled by ``factor`` (``None``: 1)."""
    if factor is None:
        return safe_ratio(num, den * den)
    return safe_ratio(factor * num, den) * safe_ratio(torch.full_like(den, factor), den)


def check_representable(value: Tensor, measure: str) -> None:
    """Raise ``ValueError`` if the measure's value is NaN or infinite (call only where host reads
    are allowed). The ratio measures are kept finite by the scale handling above; the others are
    of order ``s^2`` or ``s^4`` and overflow for large enough Jacobians."""
    if math.isfinite(value.detach().item()):
        return
    hint = ("it is not scale invariant; rescale the decoder's output or use float64"
            if measure not in SCALE_INVARIANT else
            "the Jacobian is beyond the representable scale (~1e-19 to 1e19 in fp32); rescale the decoder's output or use float64")
    raise ValueError(f"measure {measure!r} is not representable in {value.dtype} for this decoder: {hint}")
