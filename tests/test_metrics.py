"""isofast.metrics (MCN, VoR) against brute force, closed forms and the paper's ideals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from isofast import metrics

REPO = Path(__file__).resolve().parents[1]


def random_spd(B: int, m: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, m, m, generator=g, dtype=torch.float64)
    return (A @ A.mT + 0.1 * torch.eye(m, dtype=torch.float64)).to(dtype)


def vor_brute_force(H: np.ndarray) -> float:
    Hbar = H.mean(0)
    S = np.linalg.inv(np.real(scipy.linalg.sqrtm(Hbar)))
    return float(np.mean([np.sum(np.log(np.linalg.eigvalsh(S @ Hb @ S)) ** 2) for Hb in H]))


@pytest.mark.parametrize("m", [2, 3])
def test_mean_condition_number_matches_numpy(m: int) -> None:
    H = random_spd(10, m)
    lam = np.linalg.eigvalsh(H.numpy())
    got = metrics.mean_condition_number(H)
    assert got.ndim == 0 and got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), np.mean(lam[:, -1] / lam[:, 0]), rtol=1e-10)
    np.testing.assert_allclose(metrics.condition_numbers(H).numpy(), lam[:, -1] / lam[:, 0], rtol=1e-10)


@pytest.mark.parametrize("m", [2, 3])
def test_vor_matches_brute_force(m: int) -> None:
    H = random_spd(10, m, seed=1)
    got = metrics.variance_of_riemannian_metric(H)
    assert got.ndim == 0 and got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), vor_brute_force(H.numpy()), rtol=1e-9)


def test_scaled_isometry_is_ideal() -> None:
    H = 2.5 * torch.eye(2, dtype=torch.float64).expand(7, 2, 2)
    assert metrics.mean_condition_number(H).item() == pytest.approx(1.0, abs=1e-14)
    assert metrics.variance_of_riemannian_metric(H).item() == pytest.approx(0.0, abs=1e-20)


def test_conformal_is_isotropic_but_not_homogeneous() -> None:
    c = torch.tensor([1.0, 4.0], dtype=torch.float64)
    H = c[:, None, None] * torch.eye(2, dtype=torch.float64)
    assert metrics.mean_condition_number(H).item() == pytest.approx(1.0, abs=1e-14)
    # Hbar = 2.5 I: each point has two eigenvalues c_b / 2.5.
    expected = float(np.mean([2 * np.log(cb / 2.5) ** 2 for cb in (1.0, 4.0)]))
    assert metrics.variance_of_riemannian_metric(H).item() == pytest.approx(expected, rel=1e-13)


def test_constant_anisotropic_metric_is_homogeneous_but_not_isotropic() -> None:
    H = torch.diag(torch.tensor([9.0, 1.0], dtype=torch.float64)).expand(4, 2, 2)
    assert metrics.mean_condition_number(H).item() == pytest.approx(9.0, rel=1e-14)
    assert metrics.variance_of_riemannian_metric(H).item() == pytest.approx(0.0, abs=1e-20)


def test_diagonal_closed_forms() -> None:
    d = torch.tensor([[1.0, 8.0], [2.0, 2.0], [6.0, 0.5]], dtype=torch.float64)
    H = torch.diag_embed(d)
    mcn = (d.max(1).values / d.min(1).values).mean()
    vor = (torch.log(d / d.mean(0)) ** 2).sum(1).mean()
    torch.testing.assert_close(metrics.mean_condition_number(H), mcn, rtol=1e-14, atol=0)
    torch.testing.assert_close(metrics.variance_of_riemannian_metric(H), vor, rtol=1e-13, atol=0)


def test_vor_uses_symmetric_form() -> None:
    H = torch.tensor([[[4.0, 0.0], [0.0, 1.0]], [[1.0, 0.9], [0.9, 1.0]]], dtype=torch.float64)
    official = (torch.log(torch.linalg.svdvals(torch.linalg.inv(H.mean(0)) @ H)) ** 2).sum(-1).mean().item()
    got = metrics.variance_of_riemannian_metric(H).item()
    assert got == pytest.approx(vor_brute_force(H.numpy()), rel=1e-12)
    assert abs(got - official) > 0.05 * got


def test_metrics_invariant_to_rotation_and_scale_of_latent_space() -> None:
    H = random_spd(8, 3, seed=3)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    moved = 7.0 * Q.T @ H @ Q
    torch.testing.assert_close(metrics.mean_condition_number(moved), metrics.mean_condition_number(H), rtol=1e-9, atol=0)
    torch.testing.assert_close(
        metrics.variance_of_riemannian_metric(moved), metrics.variance_of_riemannian_metric(H), rtol=1e-9, atol=0
    )


def test_singular_metric_gives_inf() -> None:
    H = torch.stack([torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))])
    assert metrics.mean_condition_number(H).item() == np.inf
    assert metrics.variance_of_riemannian_metric(H).item() == np.inf


def test_float32_input_returns_float32() -> None:
    H = random_spd(6, 2, torch.float32)
    assert metrics.mean_condition_number(H).dtype == torch.float32
    vor = metrics.variance_of_riemannian_metric(H)
    assert vor.dtype == torch.float32
    assert vor.item() == pytest.approx(vor_brute_force(H.double().numpy()), rel=1e-6)


def test_bad_input_names_H() -> None:
    with pytest.raises(ValueError, match=r"H must have shape \(B, m, m\)"):
        metrics.mean_condition_number(torch.eye(2))
    with pytest.raises(ValueError, match="H"):
        metrics.variance_of_riemannian_metric(torch.ones(0, 2, 2))
    with pytest.raises(TypeError, match="H"):
        metrics.condition_numbers([[1.0, 0.0], [0.0, 1.0]])


def test_importing_metrics_does_not_import_matplotlib() -> None:
    code = "import sys, isofast.metrics; assert 'matplotlib' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
