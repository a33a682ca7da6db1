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

Against a latent metric ``M`` (the target of an isometry is then ``H = M``, e.g. a sphere's metric
in stereographic coordinates), every metric takes ``latent_metric``: ``M`` at the same points as
``(B,)`` conformal factors, ``(B, m, m)`` or one ``(m, m)`` matrix. The metrics then see
``M^{-1/2} H M^{-1/2}`` (symmetric square root), whose eigenvalues are those of ``M^{-1} H``: MCN
is the mean condition number of ``M^{-1} H`` and VoR measures how far that relative metric varies.
"""

from __future__ import annotations

import torch

from isofast import spectral


def relative_metric(H: torch.Tensor, latent_metric: torch.Tensor | None) -> torch.Tensor:
    """``M^{-1/2} H M^{-1/2}`` in float64 for ``H (B, m, m)`` and ``latent_metric`` ``(B,)``,
    ``(B, m, m)`` or ``(m, m)`` (``None``: ``H`` itself). ``ValueError`` if ``M`` is not positive definite."""
    if latent_metric is None:
        return H
    bsz, m = H.shape[0], H.shape[-1]
    mm = latent_metric.detach().to(torch.float64)
    if tuple(mm.shape) in ((bsz,), (bsz, 1)):
        lam = mm.reshape(bsz)
        if not bool((lam > 0).all()):
            raise ValueError(f"latent_metric conformal factors must be > 0, got minimum {float(lam.min()):.3g}")
        return (H.to(torch.float64) / lam.view(-1, 1, 1)).to(H.dtype)
    if tuple(mm.shape) == (m, m):
        mm = mm.expand(bsz, m, m)
    if tuple(mm.shape) != (bsz, m, m):
        raise ValueError(f"latent_metric must be (B,) conformal factors, (B, m, m) or (m, m) = ({bsz},), "
                         f"({bsz}, {m}, {m}) or ({m}, {m}); got {tuple(latent_metric.shape)}")
    evals, evecs = torch.linalg.eigh(mm)
    if not bool((evals > 0).all()):
        raise ValueError(f"latent_metric must be positive definite, got an eigenvalue {float(evals.min()):.3g}")
    inv_sqrt = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(1, 2)
    return (inv_sqrt @ H.to(torch.float64) @ inv_sqrt).to(H.dtype)

__all__ = ["condition_numbers", "mean_condition_number", "relative_metric", "variance_of_riemannian_metric"]


def condition_numbers(H: torch.Tensor, latent_metric: torch.Tensor | None = None) -> torch.Tensor:
    """Per-point condition numbers ``lambda_max(H_b) / lambda_min(H_b)`` (of ``M_b^{-1} H_b`` with a latent metric).

    Args:
        H: ``(B, m, m)`` pullback metrics.
        latent_metric: ``M`` at the same points, see :func:`relative_metric`.

    Returns:
        ``(B,)`` values ``>= 1``; ``inf`` where ``lambda_min(H_b) <= 0``.
    """
    return spectral.condition_numbers(relative_metric(H, latent_metric))


def mean_condition_number(H: torch.Tensor, latent_metric: torch.Tensor | None = None) -> torch.Tensor:
    """Mean condition number ``MCN = mean_b lambda_max(H_b) / lambda_min(H_b)`` (ideal 1).

    Args:
        H: ``(B, m, m)`` pullback metrics.
        latent_metric: ``M`` at the same points, see :func:`relative_metric`.

    Returns:
        0-d tensor; ``inf`` if any ``H_b`` is singular.
    """
    return spectral.condition_numbers(relative_metric(H, latent_metric)).mean()


def variance_of_riemannian_metric(H: torch.Tensor, latent_metric: torch.Tensor | None = None) -> torch.Tensor:
    """Variance of the Riemannian metric (ideal 0).

    ``VoR = mean_b sum_i log^2 lambda_i(Hbar^{-1/2} H_b Hbar^{-1/2})``, ``Hbar = mean_b H_b``, of the
    relative metrics ``M_b^{-1/2} H_b M_b^{-1/2}`` with a latent metric.

    Args:
        H: ``(B, m, m)`` pullback metrics.
        latent_metric: ``M`` at the same points, see :func:`relative_metric`.

    Returns:
        0-d tensor; ``inf`` if any ``H_b`` (or ``Hbar``) is singular.
    """
    return spectral.airm_sq_to_mean(relative_metric(H, latent_metric)).mean()
