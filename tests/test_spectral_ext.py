"""The extension's batched small-SPD kernels (csrc/spectral_math.h) against torch.linalg.

Skipped when the extension is not built, unless ``ISOFAST_REQUIRE_EXT`` is set (CI).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_backend

from isofast import _ext, backends, dispatch, spectral


@pytest.fixture(autouse=True)
def ext():
    require_backend("cpu")  # the compiled extension, loaded
    return _ext.get()


def spd(b: int, m: int, cond: float = 10.0, dtype=torch.float64, seed: int = 0, repeated: bool = False):
    """Random SPD matrices with eigenvalues log-spaced in [1/cond, 1] (or repeated in pairs)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, m, m, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, -math.log10(cond), m, dtype=torch.float64).expand(b, m).clone()
    if repeated:
        lam = lam[:, [i // 2 * 2 for i in range(m)]]
    lam = lam * torch.rand(b, 1, generator=gen, dtype=torch.float64).add(0.5)
    H = (q * lam[:, None, :]) @ q.transpose(1, 2)
    return (0.5 * (H + H.transpose(1, 2))).to(dtype), lam.sort(-1).values


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 32])
@pytest.mark.parametrize("cond", [10.0, 1e4, 1e8])
def test_eigvalsh_matches_linalg(ext, m, cond):
    H, lam = spd(64, m, cond, seed=m)
    got = ext.eigvalsh(H)
    ref = torch.linalg.eigvalsh(H)
    scale = ref.abs().amax(-1, keepdim=True)
    assert ((got - ref).abs() / scale).max() < 1e-13
    # Jacobi keeps small eigenvalues to high relative accuracy (the exact ones are known).
    assert ((got - lam).abs() / lam).max() < 1e-6 * max(1.0, cond / 1e8) + 1e-9 * math.sqrt(cond)


@pytest.mark.parametrize("m", [2, 4, 7, 16])
def test_repeated_eigenvalues(ext, m):
    H, lam = spd(32, m, 100.0, seed=1, repeated=True)
    torch.testing.assert_close(ext.eigvalsh(H), lam, rtol=1e-12, atol=1e-14)
    eye = torch.eye(m, dtype=torch.float64).expand(3, m, m) * 2.5
    torch.testing.assert_close(ext.eigvalsh(eye.contiguous()), torch.full((3, m), 2.5, dtype=torch.float64))


def test_float32_and_noncontiguous(ext):
    H, _ = spd(16, 6, 1e3, dtype=torch.float32)
    torch.testing.assert_close(ext.eigvalsh(H), torch.linalg.eigvalsh(H.double()).float(), rtol=1e-5, atol=1e-6)
    Ht = H.transpose(1, 2)  # non-contiguous view of the same symmetric matrices
    torch.testing.assert_close(ext.eigvalsh(Ht), ext.eigvalsh(H))


@pytest.mark.parametrize("cond", [10.0, 1e8])
def test_logdet_and_gradient(ext, cond):
    H, lam = spd(20, 5, cond, seed=3)
    out, grad = ext.logdet(H, True)
    torch.testing.assert_close(out, lam.log().sum(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, torch.linalg.inv(H), rtol=1e-6, atol=1e-8 * cond)


def test_logdet_gradcheck_through_spectral():
    H, _ = spd(4, 3, 10.0, seed=5)
    H.requires_grad_()
    assert torch.autograd.gradcheck(spectral.logdet, (H,))
    assert dispatch.select("logdet", H.device, H.dtype).impl.name == "cpu"


def test_public_ops_use_extension_and_match_reference():
    H, _ = spd(50, 4, 1e6, seed=7)
    for name in ("eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean"):
        got = getattr(spectral, name)(H)
        assert dispatch.select(name, H.device, H.dtype).impl.name == "cpu"
        with backends.use("torch"):
            torch.testing.assert_close(got, getattr(spectral, name)(H), rtol=1e-8, atol=1e-10)


def test_condition_numbers_edge_cases(ext):
    H, lam = spd(10, 4, 1e8, seed=2)
    torch.testing.assert_close(ext.condition_numbers(H), lam[:, -1] / lam[:, 0], rtol=1e-6, atol=0)
    sing = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))[None]
    assert torch.isinf(ext.condition_numbers(sing)).all()
    assert torch.isinf(spectral.condition_numbers(sing)).all()


def test_airm_matches_reference_and_edges(ext):
    H, _ = spd(30, 5, 1e3, seed=4)
    ref = spectral._airm_sq_to_mean_torch(H)
    torch.testing.assert_close(ext.airm_sq_to_mean(H), ref, rtol=1e-8, atol=1e-10)
    # Invariant to a congruence H -> A^T H A.
    A = torch.randn(5, 5, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(ext.airm_sq_to_mean(A.t() @ H @ A), ref, rtol=1e-6, atol=1e-8)
    # A singular member is infinitely far (inf, or huge where rounding leaves a tiny positive
    # eigenvalue); a negative definite member is inf; a singular mean makes every distance inf.
    Hs = H.clone()
    Hs[0] = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    Hs[1] = -torch.eye(5, dtype=torch.float64)
    out = ext.airm_sq_to_mean(Hs)
    assert out[0] > 100 and torch.isinf(out[1]) and torch.isfinite(out[2:]).all()
    zero_mean = torch.zeros(3, 2, 2, dtype=torch.float64)
    assert torch.isinf(ext.airm_sq_to_mean(zero_mean)).all()


def test_large_m_falls_back():
    H, _ = spd(3, 40, 10.0, seed=6)
    torch.testing.assert_close(spectral.eigvalsh(H), torch.linalg.eigvalsh(H))


def test_bad_input_errors_from_cpp(ext):
    with pytest.raises(RuntimeError, match="H must have shape"):
        ext.eigvalsh(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="1 <= m <= 32"):
        ext.eigvalsh(torch.randn(2, 33, 33, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.logdet(torch.ones(2, 3, 3, dtype=torch.int64), False)
    with pytest.raises(RuntimeError, match="H must have shape"):
        ext.airm_sq_to_mean(torch.randn(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_custom_ops_opcheck(dtype):
    """The spectral ops ``isofast::eigvalsh``, ``logdet``, ``condition_numbers`` and
    ``airm_sq_to_mean`` pass torch.library.opcheck on their CPU kernels."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, 4, generator=gen, dtype=dtype)
    H = a @ a.transpose(1, 2) + torch.eye(4, dtype=dtype)
    ops = torch.ops.isofast
    for op in (ops.eigvalsh, ops.condition_numbers, ops.airm_sq_to_mean):
        torch.library.opcheck(op, (H,))
    for with_grad in (True, False):
        torch.library.opcheck(ops.logdet, (H, with_grad))
