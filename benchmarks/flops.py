"""FLOP model of the regulariser for an MLP decoder (docs/maths.md section 5).

``F`` is one forward pass: ``2 * sum_l d_{l-1} d_l`` FLOPs per sample (GEMMs only; elementwise
work is not counted). The first-order multi-stream recursion costs, per sample,

- exact metric, ``m`` tangent streams: ``(1 + m) F`` forward, ``3 (1 + m) F`` forward + backward;
- Hutchinson, ``K`` probes (JVP then VJP chain): ``(1 + 2K) F`` forward, ``3 (1 + 2K) F`` with backward.

This is the floor every recipe is credited with when achieved FLOP/s are reported, so recipes
that do more work (the official double-backward recipe: about 13 F) are not rewarded for it.
"""

from __future__ import annotations

from collections.abc import Sequence


def forward_flops(widths: Sequence[int]) -> int:
    """FLOPs of one forward pass of one sample through an MLP with layer widths
    ``(d_0, d_1, ..., d_L)`` (``d_0`` = latent width ``m``, ``d_L`` = output width ``D``)."""
    return 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def regulariser_flops(widths: Sequence[int], estimator: str, n_probes: int = 1, backward: bool = True) -> int:
    """Floor FLOPs per sample of the regulariser (``estimator`` ``"exact"`` or ``"hutchinson"``).

    >>> round(forward_flops([2, 256, 256, 256, 256, 784]) / 1e6, 2)
    0.8
    >>> regulariser_flops([2, 256, 256, 256, 256, 784], "exact") == 9 * forward_flops([2, 256, 256, 256, 256, 784])
    True
    """
    f = forward_flops(widths)
    if estimator == "exact":
        passes = 1 + widths[0]
    elif estimator == "hutchinson":
        passes = 1 + 2 * n_probes
    else:
        raise ValueError(f"estimator must be 'exact' or 'hutchinson', got {estimator!r}")
    return (3 if backward else 1) * passes * f
