"""The distortion measures of the geometry-preserving hierarchy (docs/maths.md section 2).

Each measure is a function of per-sample statistics of the pullback metric ``H_b``: the traces
``Tr H_b`` and ``Tr H_b^2`` (all that Hutchinson probes can estimate) or ``H_b`` itself (exact).
Batch means go through a :class:`BatchMean`, which can all-reduce them across processes so a
data-parallel loss equals the single-process loss on the global batch.

Scale: the ratio measures are computed from ``H`` normalised by a detached scale (see
:mod:`isofast.scale`), so they are right in fp32 over Jacobian scales 1e-15 to 1e15.

Degenerate decoders: where a ratio's denominator is zero (a Jacobian that vanishes on the whole
batch, or at one sample for ``conformal``) the ratio is defined as ``0`` with zero gradient, and
``volume`` floors eigenvalues at the smallest normal number, so no measure returns NaN.
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor

from isofast import spectral
from isofast.scale import SCALE_INVARIANT, normalise_metric, rescaled_ratio

#: Measure name -> the map class it asks for (also the order docs list them in).
MEASURES: dict[str, str] = {
    "scaled_isometry": "H = c I for one global c (IRVAE's relaxed distortion)",
    "isometry": "H = I",
    "conformal": "H = c(z) I (local scale)",
    "volume": "det H = const (scaled volume preserving)",
    "jacobian_frobenius": "small Tr H (contractive; not geometry preserving)",
}

#: Measures of the decoder's gradient rather than of ``H``: name -> what they ask for.
PATH_MEASURES: dict[str, str] = {
    "path_length": "||J^T w|| = a for Gaussian data-space w (StyleGAN2's path length regulariser)",
}

#: Measures that need the exact metric ``H`` rather than trace statistics.
EXACT_ONLY = ("volume",)


class BatchMean:
    """``mean_b x_b`` over the local batch, or over the global batch of all processes.

    ``sync``: ``False`` (local), ``True`` (the default process group) or a process group. The
    all-reduce is differentiable, so after DDP's gradient averaging every rank holds the gradient
    of the global-batch loss.
    """

    def __init__(self, sync: bool | object = False) -> None:
        self.group = None if sync is False else (dist.group.WORLD if sync is True else sync)

    def __call__(self, *columns: Tensor) -> list[Tensor]:
        """Means of several ``(B,)`` columns with one collective: returns a list of 0-d tensors."""
        stacked = torch.stack(columns, dim=1)
        if self.group is None:
            return list(stacked.mean(0))
        from torch.distributed.nn.functional import all_reduce

        count = torch.full((1,), stacked.shape[0], dtype=stacked.dtype, device=stacked.device)
        total = all_reduce(torch.cat([stacked.sum(0), count]), group=self.group)
        return list(total[:-1] / total[-1])


def from_traces(
    measure: str, tr: Tensor, tr2: Tensor, m: int, mean: BatchMean, probe_scale: float | None = None
) -> Tensor:
    """The measure from ``Tr H_b`` and ``Tr H_b^2`` (both ``(B,)``, estimated or exact).

    ``probe_scale``: the statistics came from probes scaled by this factor (a ratio measure whose
    statistics were out of range, see :func:`isofast.scale.probe_rescale`); ``None`` for unit probes.
    """
    if probe_scale is not None and measure not in SCALE_INVARIANT:
        raise ValueError(f"probe_scale applies to the ratio measures {SCALE_INVARIANT}, got measure {measure!r}")
    if measure == "scaled_isometry":
        mean_tr2, mean_tr = mean(tr2, tr)
        return rescaled_ratio(mean_tr2, mean_tr, probe_scale)
    if measure == "isometry":
        # Tr (H - I)^2 = Tr H^2 - 2 Tr H + m
        (value,) = mean(tr2 - 2 * tr + m)
        return value
    if measure == "conformal":
        (value,) = mean(rescaled_ratio(tr2, tr, probe_scale))
        return value
    if measure == "jacobian_frobenius":
        (value,) = mean(tr)
        return value
    raise ValueError(f"measure {measure!r} needs the exact metric H, not trace statistics")


def from_metric(measure: str, h: Tensor, mean: BatchMean) -> Tensor:
    """The measure from exact metrics ``H (B, m, m)``. Ratio measures see ``H`` divided by a
    detached scale first (:mod:`isofast.scale`), so ``Tr H^2`` is representable at any Jacobian
    scale whose ``H`` is."""
    if measure in SCALE_INVARIANT:
        h = normalise_metric(h, per_sample=measure == "conformal", group=mean.group)
    if measure == "volume":
        logdet = spectral.logdet(h)
        (centre,) = mean(logdet)
        (value,) = mean((logdet - centre) ** 2)
        return value
    tr = torch.diagonal(h, dim1=1, dim2=2).sum(-1)
    tr2 = (h * h).sum((1, 2))  # Tr H^2 = ||H||_F^2 for symmetric H
    return from_traces(measure, tr, tr2, h.shape[-1], mean)




def from_path_lengths(lengths: Tensor, target: Tensor | float | None, mean: BatchMean) -> Tensor:
    """StyleGAN2's path-length penalty ``mean_b (L_b - a)^2`` from ``lengths (B,)``. ``target`` is
    ``a`` (a number or 0-d tensor, e.g. a running mean, used detached); ``None`` takes the detached
    batch mean of the lengths (the global batch's with ``sync``)."""
    if target is None:
        (centre,) = mean(lengths.detach())
    else:
        centre = torch.as_tensor(target, dtype=lengths.dtype, device=lengths.device).detach()
    (value,) = mean((lengths - centre).square())
    return value
