"""isofast.spectral against float64 numpy / scipy brute force and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import RTOL

from isofast import backends, spectral

OPS = [spectral.eigvalsh, spectral.logdet, spectral.condition_numbers, spectral.airm_sq_to_mean]


def random_spd(B: int, m: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, m, m, generator=g, dtype=torch.float64)
    return (A @ A.mT + 0.1 * torch.eye(m, dtype=torch.float64)).to(dtype)


def with_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``(B, m, m)`` matrices ``Q diag(lam_b) Q^T`` with random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.shape[0], lam.shape[1], lam.shape[1], generator=g, dtype=torch.float64))
    return (Q * lam[:, None, :]) @ Q.mT


def airm_reference(H: np.ndarray) -> np.ndarray:
    """``sum_i log^2 eig(Hbar^{-1/2} H_b Hbar^{-1/2})`` with scipy's matrix square root."""
    Hbar = H.mean(0)
    S = np.linalg.inv(np.real(scipy.linalg.sqrtm(Hbar)))
    return np.array([np.sum(np.log(np.linalg.eigvalsh(S @ Hb @ S)) ** 2) for Hb in H])


# --- eigvalsh ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_eigvalsh_matches_numpy(dtype: torch.dtype, m: int) -> None:
    H = random_spd(7, m, dtype)
    got = spectral.eigvalsh(H)
    assert got.shape == (7, m) and got.dtype == dtype
    ref = np.linalg.eigvalsh(H.double().numpy())
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=RTOL[dtype], atol=RTOL[dtype] * np.abs(ref).max())
    assert torch.all(got[:, 1:] >= got[:, :-1])


def test_eigvalsh_uses_symmetric_part() -> None:
    A = torch.randn(4, 3, 3, dtype=torch.float64)
    ref = np.linalg.eigvalsh(0.5 * (A + A.mT).numpy())
    np.testing.assert_allclose(spectral.eigvalsh(A).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_eigvalsh_half_precision_returns_input_dtype() -> None:
    H = random_spd(3, 2).to(torch.bfloat16)
    got = spectral.eigvalsh(H)
    assert got.dtype == torch.bfloat16
    ref = np.linalg.eigvalsh(H.double().numpy())
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-2)


# --- logdet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logdet_matches_numpy_slogdet(dtype: torch.dtype) -> None:
    H = random_spd(6, 4, dtype)
    got = spectral.logdet(H)
    assert got.shape == (6,) and got.dtype == dtype
    sign, ref = np.linalg.slogdet(H.double().numpy())
    assert np.all(sign > 0)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=RTOL[dtype], atol=10 * RTOL[dtype])


def test_logdet_closed_forms_with_repeated_eigenvalues() -> None:
    c = torch.tensor([0.5, 3.0, 1e-6], dtype=torch.float64)
    H = c[:, None, None] * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(spectral.logdet(H), 3 * torch.log(c), rtol=1e-14, atol=0)
    lam = torch.tensor([[2.0, 2.0, 7.0]], dtype=torch.float64)
    torch.testing.assert_close(spectral.logdet(with_spectrum(lam)), torch.log(lam).sum(-1), rtol=1e-12, atol=0)


def test_logdet_gradcheck_float64() -> None:
    H = random_spd(3, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(spectral.logdet, (H,))


def test_logdet_gradcheck_at_repeated_eigenvalues() -> None:
    lam = torch.tensor([[1.5, 1.5, 1.5], [0.3, 2.0, 2.0]], dtype=torch.float64)
    H = with_spectrum(lam).requires_grad_(True)
    assert torch.autograd.gradcheck(spectral.logdet, (H,))


def test_logdet_gradient_is_inverse() -> None:
    # d logdet(H) / dH = H^{-1} for symmetric H (the symmetrisation splits it evenly).
    H = random_spd(4, 3).requires_grad_(True)
    spectral.logdet(H).sum().backward()
    torch.testing.assert_close(H.grad, torch.linalg.inv(H.detach()), rtol=1e-10, atol=1e-12)


def test_logdet_ill_conditioned_float64() -> None:
    lam = torch.logspace(0, -8, 4, dtype=torch.float64)[None].repeat(3, 1)
    got = spectral.logdet(with_spectrum(lam))
    torch.testing.assert_close(got, torch.log(lam).sum(-1), rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logdet_singular_is_finite_floor_not_nan(dtype: torch.dtype) -> None:
    H = torch.zeros(2, 2, 2, dtype=dtype)
    H[0, 0, 0] = 4.0  # rank 1
    H[1] = torch.tensor([[1.0, 0.0], [0.0, -1e-3]])  # rounding-indefinite
    H.requires_grad_(True)
    out = spectral.logdet(H)
    log_tiny = float(np.log(torch.finfo(dtype).tiny))
    torch.testing.assert_close(out.detach(), torch.tensor([np.log(4.0) + log_tiny, log_tiny], dtype=dtype))
    out.sum().backward()
    assert torch.isfinite(H.grad).all()
    # The floored eigenvalue contributes no gradient; the kept one contributes 1 / lambda.
    torch.testing.assert_close(H.grad[0], torch.tensor([[0.25, 0.0], [0.0, 0.0]], dtype=dtype))


def test_logdet_float32_keeps_dtype_and_graph() -> None:
    H = random_spd(3, 2, torch.float32).requires_grad_(True)
    out = spectral.logdet(H)
    assert out.dtype == torch.float32 and out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(H.grad, torch.linalg.inv(H.detach()), rtol=1e-3, atol=1e-4)


# --- condition numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_condition_numbers_match_numpy(dtype: torch.dtype) -> None:
    H = random_spd(8, 3, dtype)
    lam = np.linalg.eigvalsh(H.double().numpy())
    got = spectral.condition_numbers(H)
    assert got.shape == (8,) and got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), lam[:, -1] / lam[:, 0], rtol=max(RTOL[dtype], 1e-7))


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e5, 1e8])
def test_condition_numbers_ill_conditioned(cond: float) -> None:
    lam = torch.tensor([[1.0, np.sqrt(cond), cond], [2.0, 2.0, 2.0 * cond]], dtype=torch.float64)
    got = spectral.condition_numbers(with_spectrum(lam))
    torch.testing.assert_close(got, torch.tensor([cond, cond], dtype=torch.float64), rtol=1e-6, atol=0)


def test_condition_numbers_multiple_of_identity_is_one() -> None:
    H = torch.tensor([1e-3, 1.0, 1e4], dtype=torch.float64)[:, None, None] * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(spectral.condition_numbers(H), torch.ones(3, dtype=torch.float64))


def test_condition_numbers_computed_in_float64_for_float32_input() -> None:
    # In float32 arithmetic lambda_min = 1e-6 of a rotated matrix is lost to rounding (~1e-7 * lambda_max).
    H32 = with_spectrum(torch.tensor([[1e-6, 1.0]], dtype=torch.float64), seed=3).float()
    lam = np.linalg.eigvalsh(H32.double().numpy())
    got = spectral.condition_numbers(H32)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), lam[:, -1] / lam[:, 0], rtol=1e-6)


def test_condition_numbers_singular_or_indefinite_is_inf() -> None:
    H = torch.stack(
        [
            torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)),
            torch.diag(torch.tensor([1.0, -1e-9], dtype=torch.float64)),
            torch.zeros(2, 2, dtype=torch.float64),
            torch.eye(2, dtype=torch.float64),
        ]
    )
    got = spectral.condition_numbers(H)
    assert torch.equal(got, torch.tensor([torch.inf, torch.inf, torch.inf, 1.0], dtype=torch.float64))


# --- AIRM distance to the mean ----------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 4])
def test_airm_matches_sqrtm_reference(m: int) -> None:
    H = random_spd(9, m)
    got = spectral.airm_sq_to_mean(H)
    assert got.shape == (9,)
    np.testing.assert_allclose(got.numpy(), airm_reference(H.numpy()), rtol=1e-9, atol=1e-12)


def test_airm_matches_generalised_eigenvalues() -> None:
    H = random_spd(5, 3, seed=1).numpy()
    Hbar = H.mean(0)
    ref = [np.sum(np.log(scipy.linalg.eigh(Hb, Hbar, eigvals_only=True)) ** 2) for Hb in H]
    np.testing.assert_allclose(spectral.airm_sq_to_mean(torch.from_numpy(H)).numpy(), ref, rtol=1e-9)


def test_airm_constant_metric_is_zero() -> None:
    for H0 in (3.0 * torch.eye(3, dtype=torch.float64), random_spd(1, 3)[0]):
        got = spectral.airm_sq_to_mean(H0.expand(5, 3, 3))
        torch.testing.assert_close(got, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-20)


def test_airm_diagonal_closed_form() -> None:
    d = torch.tensor([[1.0, 4.0], [3.0, 0.5], [2.0, 0.5]], dtype=torch.float64)
    expected = (torch.log(d / d.mean(0)) ** 2).sum(-1)
    torch.testing.assert_close(spectral.airm_sq_to_mean(torch.diag_embed(d)), expected, rtol=1e-13, atol=1e-15)


def test_airm_is_symmetric_form_not_official_singular_values() -> None:
    # H_1 and H_2 do not commute with their mean, so Hbar^{-1} H_b is not normal and its singular
    # values (the official IRVAE code) differ from its eigenvalues (the affine-invariant form).
    H = torch.tensor([[[4.0, 0.0], [0.0, 1.0]], [[1.0, 0.9], [0.9, 1.0]]], dtype=torch.float64)
    Hbar_inv = torch.linalg.inv(H.mean(0))
    official = (torch.log(torch.linalg.svdvals(Hbar_inv @ H)) ** 2).sum(-1)
    symmetric = torch.from_numpy(airm_reference(H.numpy()))
    got = spectral.airm_sq_to_mean(H)
    torch.testing.assert_close(got, symmetric, rtol=1e-12, atol=0)
    assert torch.all((got - official).abs() > 0.05 * got)


def test_airm_congruence_and_scale_invariant() -> None:
    H = random_spd(6, 3, seed=2)
    A = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 2 * torch.eye(3)
    base = spectral.airm_sq_to_mean(H)
    torch.testing.assert_close(spectral.airm_sq_to_mean(A.T @ H @ A), base, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(spectral.airm_sq_to_mean(1e4 * H), base, rtol=1e-10, atol=1e-12)


def test_airm_ill_conditioned() -> None:
    lam = torch.tensor([[1.0, 1e-8], [1.0, 1e-4], [1e-8, 1e-8]], dtype=torch.float64)
    H = with_spectrum(lam, seed=4)
    got = spectral.airm_sq_to_mean(H)
    Hbar = H.mean(0).numpy()
    ref = [np.sum(np.log(scipy.linalg.eigh(Hb, Hbar, eigvals_only=True)) ** 2) for Hb in H.numpy()]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)


def test_airm_singular_gives_inf_not_nan() -> None:
    H = torch.stack([torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))])
    got = spectral.airm_sq_to_mean(H)
    assert torch.isfinite(got[0]) and got[1] == torch.inf
    shared_null = torch.diag_embed(torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    assert torch.equal(spectral.airm_sq_to_mean(shared_null), torch.full((2,), torch.inf, dtype=torch.float64))


def test_airm_float32_input_returns_float32() -> None:
    H = random_spd(5, 2, torch.float32)
    got = spectral.airm_sq_to_mean(H)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), airm_reference(H.double().numpy()), rtol=1e-6, atol=1e-12)


# --- validation and dispatch ------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_rejects_non_tensor(op) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match="H must be a torch.Tensor"):
        op(np.eye(2)[None])


@pytest.mark.parametrize("op", OPS)
def test_rejects_non_floating(op) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match="floating"):
        op(torch.ones(2, 2, 2, dtype=torch.int64))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 2), (3, 2, 3), (1, 2, 2, 2)])
def test_rejects_bad_shapes(op, shape: tuple[int, ...]) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"H must have shape \(B, m, m\)"):
        op(torch.ones(shape, dtype=torch.float64))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 2, 2), (3, 0, 0)])
def test_rejects_empty(op, shape: tuple[int, ...]) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="H"):
        op(torch.ones(shape, dtype=torch.float64))


@pytest.mark.parametrize("name", ["eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean"])
def test_each_op_dispatches_through_impl_table(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each op runs the implementation isofast.dispatch selects, after validating its input."""
    seen = []

    def fake(H: torch.Tensor) -> torch.Tensor:
        seen.append(H)
        return torch.full((H.shape[0],), 42.0, dtype=H.dtype)

    monkeypatch.setattr(backends.get("torch"), name, fake)
    H = random_spd(2, 2)
    with backends.use("torch"):
        assert torch.equal(getattr(spectral, name)(H), torch.full((2,), 42.0, dtype=torch.float64))
    assert len(seen) == 1 and seen[0] is H
    with pytest.raises(ValueError, match="H"), backends.use("torch"):
        getattr(spectral, name)(torch.ones(2, 2, dtype=torch.float64))
    assert len(seen) == 1, "validation must run before the backend is called"
