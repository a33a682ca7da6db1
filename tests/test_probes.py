"""Orthonormal probe frames and the first-order estimator built on them, against float64 brute force:
the frames' distribution, unbiasedness, exactness at ``K = m`` and at ``H = c I``, lower variance
than independent probes, what ``plan`` says, and the draw under torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import isofast
from isofast.generic import forward_traces
from isofast.probes import draw, orthonormal_probes
from tests.conftest import RTOL, ConvDecoder, rel_err, traces_brute_force

F64 = torch.float64


def _estimates(decoder, z, probes, orthonormal):
    sc = forward_traces(decoder, z, probes, orthonormal=orthonormal)
    return (sc.tr * sc.scale2).detach(), (sc.tr2 * sc.scale2**2).detach()


def test_frames_are_scaled_orthonormal_with_identity_second_moment():
    z = torch.zeros(20000, 2, 3, dtype=F64)
    u = orthonormal_probes(z, 4, torch.Generator().manual_seed(0))
    assert u.shape == (20000, 4, 2, 3) and u.dtype == F64
    flat = u.reshape(20000, 4, 6)
    gram = flat @ flat.transpose(1, 2)
    torch.testing.assert_close(gram, 6 * torch.eye(4, dtype=F64).expand_as(gram), rtol=0, atol=1e-12)
    second = torch.einsum("bki,bkj->ij", flat, flat) / (20000 * 4)
    torch.testing.assert_close(second, torch.eye(6, dtype=F64), rtol=0, atol=0.03)
    # Haar, not the QR routine's sign convention: every coordinate is symmetric about 0.
    assert float(flat.mean((0, 1)).abs().max()) < 0.03


def test_frames_refuse_more_vectors_than_dimensions_and_unknown_distributions():
    with pytest.raises(ValueError, match="1 to m = 3 vectors, got K = 4"):
        orthonormal_probes(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="distribution must be one of"):
        draw("uniform", torch.zeros(2, 3), 2)


def test_frames_follow_the_generator_and_the_codes_dtype():
    z = torch.zeros(3, 5, dtype=torch.bfloat16)
    a = orthonormal_probes(z, 2, torch.Generator().manual_seed(1))
    b = orthonormal_probes(z, 2, torch.Generator().manual_seed(1))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_orthonormal_forward_estimator_is_unbiased():
    # One code repeated over a large batch: every row is an independent draw of the estimator.
    n, k, m = 6000, 2, 3
    dec = ConvDecoder(m)
    z0 = torch.randn(1, m, dtype=F64)
    _, tr, tr2 = traces_brute_force(dec, z0)
    z = z0.expand(n, m)
    est_tr, est_tr2 = _estimates(dec, z, orthonormal_probes(z, k, torch.Generator().manual_seed(0)), True)
    for est, true in ((est_tr, tr), (est_tr2, tr2)):
        assert abs(float(est.mean() - true)) < 4 * float(est.std() / n**0.5)


def test_orthonormal_forward_estimator_is_exact_with_a_full_frame():
    dec, z = ConvDecoder(3), torch.randn(5, 3, dtype=F64)
    _, tr, tr2 = traces_brute_force(dec, z)
    est_tr, est_tr2 = _estimates(dec, z, orthonormal_probes(z, 3, torch.Generator().manual_seed(2)), True)
    assert rel_err(est_tr, tr) < RTOL[F64] and rel_err(est_tr2, tr2) < RTOL[F64]


def test_orthonormal_forward_estimator_is_exact_at_a_scaled_isometry():
    # A linear decoder 3 * Q with orthonormal columns: H = 9 I, exact from 2 of the 6 directions.
    q, _ = torch.linalg.qr(torch.randn(10, 6, dtype=F64, generator=torch.Generator().manual_seed(3)))
    dec = nn.Linear(6, 10, dtype=F64)
    with torch.no_grad():
        dec.weight.copy_(3 * q)
    z = torch.randn(4, 6, dtype=F64)
    gen = torch.Generator().manual_seed(4)
    est_tr, est_tr2 = _estimates(lambda x: dec(x), z, orthonormal_probes(z, 2, gen), True)
    torch.testing.assert_close(est_tr, torch.full((4,), 54.0, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(est_tr2, torch.full((4,), 486.0, dtype=F64), rtol=1e-12, atol=0)
    # independent Gaussian probes are not exact there
    g_tr, g_tr2 = _estimates(lambda x: dec(x), z, torch.randn(4, 2, 6, dtype=F64, generator=gen), False)
    assert rel_err(g_tr2, torch.full((4,), 486.0, dtype=F64)) > 0.05


def test_orthonormal_frames_leave_less_variance_than_independent_probes():
    n, k, m = 3000, 2, 6
    dec = ConvDecoder(m)
    z = torch.randn(1, m, dtype=F64).expand(n, m)
    gen = torch.Generator().manual_seed(5)
    _, orth = _estimates(dec, z, orthonormal_probes(z, k, gen), True)
    _, gauss = _estimates(dec, z, torch.randn(n, k, m, dtype=F64, generator=gen), False)
    assert float(orth.var()) < 0.5 * float(gauss.var())


def test_plan_says_how_the_probes_are_drawn():
    dec, z = ConvDecoder(4), torch.randn(3, 4, dtype=F64)
    p = isofast.plan(dec, z, estimator="forward", n_probes=2)
    assert p.probe_distribution == "orthonormal" and "orthonormal directions" in p.reasons["estimator"]
    p = isofast.plan(dec, z, estimator="forward", probes=torch.randn(3, 2, 4, dtype=F64))
    assert p.probe_distribution == "gaussian" and "read as independent N(0, I)" in p.reasons["estimator"]
    p = isofast.plan(dec, z, estimator="forward", n_probes=6)
    assert p.probe_distribution == "gaussian" and "K = 6 > m = 4" in p.reasons["estimator"]
    assert isofast.plan(dec, z, estimator="hutchinson").probe_distribution == "gaussian"
    assert isofast.plan(dec, z, estimator="exact").probe_distribution is None


def test_the_default_forward_loss_uses_orthonormal_frames():
    dec, z = ConvDecoder(4), torch.randn(6, 4, dtype=F64)
    got = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", n_probes=2,
                                     generator=torch.Generator().manual_seed(7))
    probes = orthonormal_probes(z, 2, torch.Generator().manual_seed(7))
    sc = forward_traces(dec, z, probes, orthonormal=True)
    assert rel_err(got, sc.tr2.mean() / sc.tr.mean() ** 2) < RTOL[F64]


@pytest.mark.slow
def test_the_orthonormal_draw_compiles_with_fullgraph():
    """The QR-based draw traces with fullgraph=True; with eager's random numbers (aot_eager, or
    inductor falling back to them) the compiled loss equals the eager one for the same seed."""
    import torch._inductor.config as inductor_config

    dec = ConvDecoder(4, dtype=torch.float32)
    z = torch.randn(8, 4)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", n_probes=2)

    torch.manual_seed(3)
    want = loss(z)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        with inductor_config.patch(fallback_random=True):
            compiled = torch.compile(loss, fullgraph=True, backend=backend)
            torch.manual_seed(3)
            got = compiled(z)
        assert rel_err(got, want) < RTOL[torch.float32], backend
