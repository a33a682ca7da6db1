"""The generic path's first-order ``forward`` estimator against float64 brute force: exact per-probe
statistics, unbiasedness and the variance formula over many probes, every trace measure, routing."""

from __future__ import annotations

import pytest
import torch

import isofast
from isofast.generic import forward_traces
from tests.conftest import RTOL, ConvDecoder, jacobian_brute_force, rel_err, traces_brute_force


def test_forward_statistics_equal_the_gram_of_brute_force_images():
    dec, z = ConvDecoder(3), torch.randn(4, 3, dtype=torch.float64)
    probes = torch.randn(4, 5, 3, dtype=torch.float64)
    a = torch.einsum("bdm,bkm->bkd", jacobian_brute_force(dec, z).detach(), probes)
    g = a @ a.transpose(1, 2)
    i, j = torch.triu_indices(5, 5, 1)
    sc = forward_traces(dec, z, probes)
    assert rel_err(sc.tr * sc.scale2, torch.diagonal(g, dim1=1, dim2=2).mean(-1)) < RTOL[torch.float64]
    assert rel_err(sc.tr2 * sc.scale2**2, g[:, i, j].square().mean(-1)) < RTOL[torch.float64]


def test_forward_estimator_is_unbiased_with_the_derived_variance():
    # One code repeated over a large batch: every row is an independent draw of the estimator.
    n, k = 4000, 3
    dec = ConvDecoder(3)
    z0 = torch.randn(1, 3, dtype=torch.float64)
    h, tr, tr2 = traces_brute_force(dec, z0)
    tr4 = torch.linalg.matrix_power(h, 4).diagonal(dim1=1, dim2=2).sum()
    gen = torch.Generator().manual_seed(0)
    probes = torch.randn(n, k, 3, generator=gen, dtype=torch.float64)
    sc = forward_traces(dec, z0.expand(n, 3), probes)
    est_tr, est_tr2 = sc.tr * sc.scale2, sc.tr2 * sc.scale2**2
    pairs = k * (k - 1) / 2
    var_tr2 = (2 * tr2**2 + (4 * k - 2) * tr4) / pairs
    var_tr = 2 * tr2 / k
    assert abs(float(est_tr.mean() - tr)) < 4 * float((var_tr / n).sqrt())
    assert abs(float(est_tr2.mean() - tr2)) < 4 * float((var_tr2 / n).sqrt())
    # the sample variance matches the formula (its own relative error is ~sqrt(kurtosis / n))
    assert abs(float(est_tr2.var() / var_tr2) - 1) < 0.25
    assert abs(float(est_tr.var() / var_tr) - 1) < 0.15


@pytest.mark.parametrize("measure", ["scaled_isometry", "isometry", "conformal", "jacobian_frobenius"])
def test_every_trace_measure_takes_the_forward_estimator(measure):
    dec, z = ConvDecoder(3), torch.randn(5, 3, dtype=torch.float64)
    probes = torch.randn(5, 4, 3, dtype=torch.float64)
    j = jacobian_brute_force(dec, z)  # differentiable in the parameters
    a = torch.einsum("bdm,bkm->bkd", j, probes)
    g = a @ a.transpose(1, 2)
    i, jj = torch.triu_indices(4, 4, 1)
    tr, tr2 = torch.diagonal(g, dim1=1, dim2=2).mean(-1), g[:, i, jj].square().mean(-1)
    want = {"scaled_isometry": tr2.mean() / tr.mean() ** 2, "isometry": (tr2 - 2 * tr + 3).mean(),
            "conformal": (tr2 / tr**2).mean(), "jacobian_frobenius": tr.mean()}[measure]
    got = isofast.distortion(dec, z, measure, eta=None, estimator="forward", probes=probes)
    assert rel_err(got, want) < RTOL[torch.float64]
    params = list(dec.parameters())
    for gg, gw in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert rel_err(gg, gw) < 1e-8


def test_forward_loss_converges_to_the_exact_loss():
    dec, z = ConvDecoder(4), torch.randn(8, 4, dtype=torch.float64)
    exact = isofast.relaxed_distortion(dec, z, eta=None, estimator="exact")
    gen = torch.Generator().manual_seed(1)
    est = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", n_probes=400, generator=gen)
    assert rel_err(est, exact) < 0.05


def test_forward_needs_two_probes_and_not_det():
    dec, z = ConvDecoder(3), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_probes >= 2"):
        isofast.relaxed_distortion(dec, z, estimator="forward", n_probes=1)
    with pytest.raises(ValueError, match="needs estimator='exact'"):
        isofast.distortion(dec, z, "volume", estimator="forward")


def test_auto_on_the_generic_path_and_forward_on_an_mlp():
    edge = isofast.planning.GENERIC_EXACT_MAX_LATENT
    small, large = ConvDecoder(edge), ConvDecoder(edge + 1)
    p = isofast.plan(small, torch.randn(4, edge, dtype=torch.float64))
    assert p.estimator == "exact"
    p = isofast.plan(large, torch.randn(4, edge + 1, dtype=torch.float64))
    assert (p.estimator, p.n_probes) == ("forward", isofast.planning.FORWARD_PROBES)
    wide = isofast.planning.WIDE_LATENT
    p = isofast.plan(ConvDecoder(wide), torch.randn(4, wide, dtype=torch.float64))
    assert p.n_probes == isofast.planning.FORWARD_PROBES
    p = isofast.plan(ConvDecoder(wide + 1), torch.randn(4, wide + 1, dtype=torch.float64))
    assert (p.estimator, p.n_probes) == ("forward", isofast.planning.FORWARD_PROBES_WIDE)
    hutch = isofast.planning.GENERIC_HUTCHINSON_LATENT
    p = isofast.plan(ConvDecoder(hutch + 1), torch.randn(4, hutch + 1, dtype=torch.float64))
    assert (p.path, p.estimator, p.n_probes) == ("generic", "hutchinson", 1) and "first order" in p.reasons["estimator"]
    # The stream path keeps its primal pass for Hutchinson's two tangent images: Hutchinson above WIDE_LATENT.
    seq = torch.nn.Sequential(torch.nn.Unflatten(1, (wide + 1, 1, 1)), torch.nn.ConvTranspose2d(wide + 1, 2, 3),
                              torch.nn.ReLU(), torch.nn.Conv2d(2, 1, 2)).double()
    z = torch.randn(4, wide + 1, dtype=torch.float64)
    p = isofast.plan(seq, z)
    assert (p.path, p.estimator, p.n_probes) == ("fused_sequential", "hutchinson", 1)
    seq_narrow = torch.nn.Sequential(torch.nn.Unflatten(1, (wide, 1, 1)), torch.nn.ConvTranspose2d(wide, 2, 3)).double()
    p = isofast.plan(seq_narrow, torch.randn(4, wide, dtype=torch.float64))
    assert (p.estimator, p.n_probes) == ("forward", isofast.planning.FORWARD_PROBES)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()
    p = isofast.plan(mlp, torch.randn(4, 3, dtype=torch.float64), estimator="forward", n_probes=3)
    # The stream path carries an MLP's tangent images too, and has the forward estimator.
    assert p.path == "fused_sequential" and p.estimator == "forward"
    p = isofast.plan(lambda x: mlp(x), torch.randn(4, 3, dtype=torch.float64), estimator="forward", n_probes=3)
    assert p.path == "generic" and p.estimator == "forward"


def test_auto_with_given_probes_stays_first_order_off_the_fused_path():
    dec, z = ConvDecoder(3), torch.randn(4, 3, dtype=torch.float64)
    p = isofast.plan(dec, z, probes=torch.randn(4, 2, 3, dtype=torch.float64))
    assert (p.estimator, p.probe_distribution) == ("forward", "gaussian")
    p = isofast.plan(dec, z, probes=torch.randn(4, 1, 3, dtype=torch.float64))
    assert p.estimator == "hutchinson" and "double backward" in p.reasons["estimator"]


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated: a double backward through it fails."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.no_grad():
            return g * (1 - y.detach() ** 2)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y**2)


class _OnceDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(8, 6)

    def forward(self, z):
        return self.b(_OnceDifferentiableTanh.apply(self.a(z)))


def _grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def test_forward_and_hutchinson_need_no_double_backward():
    dec = _OnceDecoder().double()
    plain = torch.nn.Sequential(dec.a, torch.nn.Tanh(), dec.b)
    z = torch.randn(4, 3, dtype=torch.float64)
    probes = torch.randn(4, 3, 3, dtype=torch.float64)
    params = list(dec.parameters())

    def loss(decoder, estimator):
        # behind a lambda both take the generic path
        return isofast.relaxed_distortion(lambda x: decoder(x), z, eta=None, estimator=estimator, probes=probes)

    for g, r in zip(_grads(loss(dec, "forward"), params), _grads(loss(plain, "forward"), params)):
        assert rel_err(g, r) < 1e-10
    # Hutchinson's VJP is a constant (no graph): a once-differentiable decoder gets its exact gradient
    # (isofast 0.1 differentiated the VJP again and missed the path through the backward formula).
    hutch, ref = _grads(loss(dec, "hutchinson"), params), _grads(loss(plain, "hutchinson"), params)
    for g, r in zip(hutch, ref):
        assert rel_err(g, r) < 1e-10
