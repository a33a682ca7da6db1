"""Geometry-preservation metrics of a decoder, from its pullback metrics ``H(z) = J(z)^T J(z)``.

Evaluate them on ``H`` at the encoder means of held-out data (IRVAE, Lee et al. 2022):

- **Mean condition number (MCN)**: the mean over points of ``lambda_max(H) / lambda_min(H)``.
  Ideal value 1, reached iff every ``H(z)`` is a multiple of the identity (isotropy: the decoder
  stretches all latent directions equally at each point). It says nothing about whether the
  stretch is the same from point to point.
- **Variance of the Riemannian metric (VoR)**: the mean over points of the squared
  affine-invariant distance ``sum_i log^2 lambda_i(Hbar^{-1/2} H(z) Hbar^{-1/2})`` from ``H(z)`` to
  the mean metric ``Hbar``. Ideal value 0, reached iff ``H(z)`` is the same matrix everywhere
  (homogeneity). Together, MCN = 1 and VoR = 0 characterise a scaled isometry ``H = cI``.

The official IRVAE code computes VoR from the singular values of ``Hbar^{-1} H(z)``. Those equal
the eigenvalues above only when ``H(z)`` and ``Hbar`` commute; the symmetric form
``Hbar^{-1/2} H Hbar^{-1/2}`` gives the true generalised eigenvalues (the affine-invariant
distance), which is invariant to linear changes of latent coordinates. isofast uses the symmetric
form, so its VoR can differ from numbers reported with the official code when metrics are
anisotropic.

All metrics are computed in float64 and returned in ``H``'s dtype; a singular ``H`` gives ``inf``
(see :mod:`isofast.spectral`).
"""

from __future__ import annotations

import torch

from isofast import spectral

__all__ = ["condition_numbers", "mean_condition_number", "variance_of_riemannian_metric"]


def condition_numbers(H: torch.Tensor) -> torch.Tensor:
    """Per-point condition numbers ``lambda_max(H_b) / lambda_min(H_b)``.

    Args:
        H: ``(B, m, m)`` pullback metrics.

    Returns:
        ``(B,)`` values ``>= 1``; ``inf`` where ``lambda_min(H_b) <= 0``.
    """
    return spectral.condition_numbers(H)


def mean_condition_number(H: torch.Tensor) -> torch.Tensor:
    """Mean condition number ``MCN = mean_b lambda_max(H_b) / lambda_min(H_b)`` (ideal 1).

    Args:
        H: ``(B, m, m)`` pullback metrics.

    Returns:
        0-d tensor; ``inf`` if any ``H_b`` is singular.
    """
    return spectral.condition_numbers(H).mean()


def variance_of_riemannian_metric(H: torch.Tensor) -> torch.Tensor:
    """Variance of the Riemannian metric (ideal 0).

    ``VoR = mean_b sum_i log^2 lambda_i(Hbar^{-1/2} H_b Hbar^{-1/2})``, ``Hbar = mean_b H_b``.

    Args:
        H: ``(B, m, m)`` pullback metrics.

    Returns:
        0-d tensor; ``inf`` if any ``H_b`` (or ``Hbar``) is singular.
    """
    return spectral.airm_sq_to_mean(H).mean()
