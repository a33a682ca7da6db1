"""Batched spectral operations on symmetric positive (semi)definite matrices.

Every public op takes a batch ``H`` of shape ``(B, m, m)`` (for example pullback metrics
``H(z) = J(z)^T J(z)``), validates it, and then runs the implementation :mod:`isofast.dispatch`
selects for the op (the torch references below are the torch backend's). Only the lower triangle
of the symmetric part ``(H + H^T) / 2`` matters; the reference implementations symmetrise
explicitly so that gradients are symmetric and rounding asymmetry in ``J^T J`` is harmless.

Precision:

- :func:`eigvalsh` and :func:`logdet` compute in the input dtype (so ``logdet`` is differentiable
  in the caller's precision); float16 / bfloat16 are computed in float32 because the linear
  algebra kernels have no half-precision versions, and cast back.
- :func:`condition_numbers` and :func:`airm_sq_to_mean` are evaluation metrics: they compute in
  float64, because a condition number of 1e8 in float32 is pure rounding, and return the input
  dtype.
"""

from __future__ import annotations

import torch

from isofast import dispatch

__all__ = ["eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean"]


def _check(H: object) -> None:
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"H must be a torch.Tensor of shape (B, m, m), got {type(H).__name__}")
    if not H.is_floating_point():
        raise TypeError(f"H must have a real floating dtype, got {H.dtype}")
    if H.ndim != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must have shape (B, m, m) (a batch of square matrices), got {tuple(H.shape)}")
    if H.shape[0] == 0 or H.shape[1] == 0:
        raise ValueError(f"H must have shape (B, m, m) with B >= 1 and m >= 1, got {tuple(H.shape)}")


def _sym(H: torch.Tensor) -> torch.Tensor:
    return 0.5 * (H + H.transpose(-1, -2))


def _linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _eigvalsh_torch(H: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(_sym(H.to(_linalg_dtype(H.dtype)))).to(H.dtype)


def _logdet_torch(H: torch.Tensor) -> torch.Tensor:
    work = _linalg_dtype(H.dtype)
    lam = torch.linalg.eigvalsh(_sym(H.to(work)))
    # The floor turns a singular (or rounding-negative) H into a large finite negative logdet
    # instead of -inf / NaN; a floored eigenvalue gets zero gradient.
    return torch.log(lam.clamp_min(torch.finfo(work).tiny)).sum(-1).to(H.dtype)


def _condition_numbers_torch(H: torch.Tensor) -> torch.Tensor:
    lam = torch.linalg.eigvalsh(_sym(H.to(torch.float64)))
    lam_min, lam_max = lam[:, 0], lam[:, -1]
    # Division is only evaluated where it is meaningful, so the inf branch stays NaN-free.
    safe_min = torch.where(lam_min > 0, lam_min, torch.ones_like(lam_min))
    cond = torch.where(lam_min > 0, lam_max / safe_min, torch.full_like(lam_min, torch.inf))
    return cond.to(H.dtype)


def _airm_sq_to_mean_torch(H: torch.Tensor) -> torch.Tensor:
    H64 = _sym(H.to(torch.float64))
    mu, U = torch.linalg.eigh(H64.mean(0))
    mean_ok = mu.min() > 0
    # A singular mean has no inverse square root; substitute 1 so the arithmetic stays finite and
    # report inf for the whole batch below, without a host synchronisation.
    mu_safe = torch.where(mu > 0, mu, torch.ones_like(mu))
    S = (U * mu_safe.rsqrt()) @ U.T
    lam = torch.linalg.eigvalsh(_sym(S @ H64 @ S))
    log_sq = torch.log(lam.clamp_min(torch.finfo(torch.float64).tiny)) ** 2
    per_point = torch.where(lam > 0, log_sq, torch.full_like(lam, torch.inf)).sum(-1)
    per_point = torch.where(mean_ok, per_point, torch.full_like(per_point, torch.inf))
    return per_point.to(H.dtype)


def _run(op: str, H: torch.Tensor) -> torch.Tensor:
    """Op ``op`` on a validated ``H``, on the implementation :mod:`isofast.dispatch` selects for its
    device and working dtype (the extension's kernels on the cpu and cuda backends, else these
    torch references)."""
    choice = dispatch.select(op, H.device, _linalg_dtype(H.dtype))
    return getattr(choice.impl, op)(H)


def eigvalsh(H: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of each symmetric matrix, in ascending order.

    Args:
        H: ``(B, m, m)`` real symmetric matrices (the symmetric part is used).

    Returns:
        ``(B, m)`` eigenvalues ``lambda_1 <= ... <= lambda_m``, in ``H``'s dtype.
    """
    _check(H)
    return _run("eigvalsh", H)


def logdet(H: torch.Tensor) -> torch.Tensor:
    """Differentiable log-determinant ``log det H_b = sum_i log max(lambda_i, tiny)``.

    The eigenvalues are floored at ``torch.finfo(dtype).tiny`` (about 1e-308 in float64, 1e-38
    in float32) before the log, so a singular or rounding-indefinite ``H_b`` gives a large finite
    negative value (about -708 / -87 per floored eigenvalue) rather than ``-inf`` or NaN; floored
    eigenvalues contribute zero gradient. This keeps the ``volume`` distortion measure NaN-free.
    Computed in ``H``'s dtype (float32 for half precisions) so gradients flow in the caller's
    precision.

    Args:
        H: ``(B, m, m)`` symmetric positive (semi)definite matrices.

    Returns:
        ``(B,)`` log-determinants, in ``H``'s dtype.
    """
    _check(H)
    return _run("logdet", H)


def condition_numbers(H: torch.Tensor) -> torch.Tensor:
    """Spectral condition number ``lambda_max(H_b) / lambda_min(H_b)`` of each matrix.

    Computed in float64. A matrix with ``lambda_min <= 0`` (singular, or indefinite through
    rounding) has condition number ``inf``.

    Args:
        H: ``(B, m, m)`` symmetric positive (semi)definite matrices.

    Returns:
        ``(B,)`` condition numbers ``>= 1`` (or ``inf``), in ``H``'s dtype.
    """
    _check(H)
    return _run("condition_numbers", H)


def airm_sq_to_mean(H: torch.Tensor) -> torch.Tensor:
    """Squared affine-invariant (AIRM) distance of each matrix to the batch mean.

    ``d_b = sum_i log^2 lambda_i(Hbar^{-1/2} H_b Hbar^{-1/2})`` with ``Hbar = mean_b H_b``
    (arithmetic mean). The ``lambda_i`` are the generalised eigenvalues of ``(H_b, Hbar)``; the
    symmetric form is used because the singular values of ``Hbar^{-1} H_b`` (the official IRVAE
    code) differ from them whenever ``H_b`` and ``Hbar`` do not commute. ``d_b`` is invariant to
    congruence ``H_b -> A^T H_b A`` (a linear change of latent coordinates) and to scaling all
    ``H_b`` by one constant. Computed in float64.

    ``d_b = inf`` where ``H_b`` is singular (a generalised eigenvalue ``<= 0``), and for every
    ``b`` when ``Hbar`` itself is singular.

    Args:
        H: ``(B, m, m)`` symmetric positive (semi)definite matrices.

    Returns:
        ``(B,)`` non-negative squared distances, in ``H``'s dtype.
    """
    _check(H)
    return _run("airm_sq_to_mean", H)
