"""The estimator moments of docs/maths.md section 3 against float64 Monte Carlo.

Seeded draws, so a test either always passes or always fails; the tolerances are a few standard
errors of the Monte Carlo estimate, far below the factor by which a wrong term would move it."""

from __future__ import annotations

import pytest
import torch

DT = torch.float64


def spd_with_dominant_direction(m: int, seed: int) -> torch.Tensor:
    """A metric whose largest eigenvalue dominates, so that ``Tr H^4`` and ``(Tr H^2)^2`` are of
    one size and a formula that drops either term fails."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m, dtype=DT, generator=g)
    u = torch.randn(m, 1, dtype=DT, generator=g)
    return a @ a.T / m + 0.1 * torch.eye(m, dtype=DT) + 3.0 * (u @ u.T) / (u.T @ u)


def traces(h: torch.Tensor) -> tuple[float, float, float]:
    h2 = h @ h
    return float(h.trace()), float(h2.trace()), float((h2 @ h2).trace())


def rel(a: torch.Tensor, b: float) -> float:
    return abs(float(a) / b - 1.0)


def test_hutchinson_moments() -> None:
    """``E ||Jv||^2 = Tr H`` with variance ``2 Tr H^2``; ``E ||J^T J v||^2 = Tr H^2`` with ``2 Tr H^4``."""
    h = spd_with_dominant_direction(4, seed=0)
    tr, tr2, tr4 = traces(h)
    v = torch.randn(400_000, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    q = ((v @ h) * v).sum(1)  # ||J v||^2 = v^T H v
    r = (v @ h).square().sum(1)  # ||J^T J v||^2 = ||H v||^2
    assert rel(q.mean(), tr) < 0.01 and rel(q.var(), 2 * tr2) < 0.03
    assert rel(r.mean(), tr2) < 0.01 and rel(r.var(), 2 * tr4) < 0.03


@pytest.mark.parametrize("k", [2, 3, 8])
def test_forward_only_pair_estimator_moments(k: int) -> None:
    """The mean of ``(J v_i . J v_j)^2`` over the pairs ``i < j`` of ``K`` probes is unbiased for
    ``Tr H^2`` with variance ``4 ((2K - 1) Tr H^4 + (Tr H^2)^2) / (K (K - 1))``; the same probes'
    ``mean_k ||J v_k||^2`` has variance ``2 Tr H^2 / K``."""
    m = 4
    h = spd_with_dominant_direction(m, seed=2)
    tr, tr2, tr4 = traces(h)
    v = torch.randn(200_000, k, m, dtype=DT, generator=torch.Generator().manual_seed(3 + k))
    jv = v @ torch.linalg.cholesky(h)  # rows c_k with c_i . c_j = v_i^T H v_j
    dots = jv @ jv.transpose(1, 2)
    i, j = torch.triu_indices(k, k, 1)
    pairs = dots[:, i, j].square().mean(1)
    assert rel(pairs.mean(), tr2) < 0.02
    assert rel(pairs.var(), 4 * ((2 * k - 1) * tr4 + tr2**2) / (k * (k - 1))) < 0.08
    diag = dots.diagonal(dim1=1, dim2=2).mean(1)
    assert rel(diag.mean(), tr) < 0.01 and rel(diag.var(), 2 * tr2 / k) < 0.03
