"""Every measure, both paths, both estimators: values and gradients against float64 brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ACTIVATIONS,
    GRAD_RTOL,
    RTOL,
    ConvDecoder,
    jacobian_brute_force,
    make_mlp,
    pullback_brute_force,
    rel_err,
)

import isofast
from isofast.baselines import official_relaxed_distortion


def reference_measure(measure: str, h: torch.Tensor) -> torch.Tensor:
    """The definitions of docs/maths.md section 2, written out independently of isofast.measures."""
    m = h.shape[-1]
    eye = torch.eye(m, dtype=h.dtype)
    tr = torch.einsum("bii->b", h)
    tr2 = torch.einsum("bij,bji->b", h, h)
    if measure == "scaled_isometry":
        return tr2.mean() / tr.mean() ** 2
    if measure == "isometry":
        d = h - eye
        return torch.einsum("bij,bji->b", d, d).mean()
    if measure == "conformal":
        return (tr2 / tr**2).mean()
    if measure == "volume":
        ld = torch.logdet(h)
        return ((ld - ld.mean()) ** 2).mean()
    if measure == "jacobian_frobenius":
        return tr.mean()
    raise AssertionError(measure)


def _check(decoder: torch.nn.Module, measure: str, m: int = 3, bsz: int = 6) -> None:
    z = torch.randn(bsz, m, dtype=torch.float64, requires_grad=True)
    value = isofast.distortion(decoder, z, measure, eta=0.2, estimator="exact", generator=torch.Generator().manual_seed(5))
    z_aug = isofast.mixup(z, 0.2, generator=torch.Generator().manual_seed(5))
    ref = reference_measure(measure, pullback_brute_force(decoder, z_aug))
    assert rel_err(value, ref) < RTOL[torch.float64]
    params = [z, *decoder.parameters()]
    grads = [torch.autograd.grad(v, params, allow_unused=True, materialize_grads=True) for v in (value, ref)]
    for g, w in zip(*grads):
        assert rel_err(g, w) < GRAD_RTOL[torch.float64]


@pytest.mark.parametrize("measure", list(isofast.MEASURES))
@pytest.mark.parametrize("act", ["relu", "softplus", "gelu"])
def test_fused_mlp_measures(measure: str, act: str) -> None:
    dec = make_mlp([3, 10, 8, 12], act=act, out_act="sigmoid", seed=7)
    assert isofast.plan(dec, torch.zeros(1, 3, dtype=torch.float64), measure).path == "fused_mlp"
    _check(dec, measure)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_fused_mlp_every_activation(act: str) -> None:
    _check(make_mlp([3, 10, 8, 12], act=act, out_act=act, seed=8), "scaled_isometry")


@pytest.mark.parametrize("measure", list(isofast.MEASURES))
def test_generic_conv_measures(measure: str) -> None:
    dec = ConvDecoder(m=3)
    assert isofast.plan(dec, torch.zeros(1, 3, dtype=torch.float64), measure).path == "generic"
    _check(dec, measure, bsz=4)


@pytest.mark.parametrize("make", [lambda: make_mlp([2, 16, 16, 20], seed=9), lambda: ConvDecoder(m=2, seed=9)])
def test_hutchinson_matches_official_recipe(make) -> None:
    """Same codes and probes: the official autograd.functional recipe and isofast agree (K = 1)."""
    dec = make()
    z = torch.randn(7, 2, dtype=torch.float64)
    v = torch.randn(7, 2, dtype=torch.float64)
    ours = isofast.relaxed_distortion(dec, z, eta=None, probes=v[:, None])
    official = official_relaxed_distortion(dec, z, v)
    assert rel_err(ours, official) < RTOL[torch.float64]
    params = list(dec.parameters())
    for g, w in zip(torch.autograd.grad(ours, params), torch.autograd.grad(official, params)):
        assert rel_err(g, w) < GRAD_RTOL[torch.float64]


@pytest.mark.parametrize("make", [lambda: make_mlp([3, 12, 9], act="tanh", seed=10), lambda: ConvDecoder(m=3, seed=10)])
def test_hutchinson_trace_measures_match_brute_force(make) -> None:
    dec = make()
    z = torch.randn(5, 3, dtype=torch.float64)
    probes = torch.randn(5, 4, 3, dtype=torch.float64)
    j = jacobian_brute_force(dec, z)
    jv = torch.einsum("bdm,bkm->bkd", j, probes)
    tr = jv.square().sum(-1).mean(1)
    tr2 = torch.einsum("bdm,bkd->bkm", j, jv).square().sum(-1).mean(1)
    want = {
        "scaled_isometry": tr2.mean() / tr.mean() ** 2,
        "isometry": (tr2 - 2 * tr + 3).mean(),
        "conformal": (tr2 / tr**2).mean(),
        "jacobian_frobenius": tr.mean(),
    }
    for measure, ref in want.items():
        got = isofast.distortion(dec, z, measure, eta=None, estimator="hutchinson", probes=probes)
        assert rel_err(got, ref) < RTOL[torch.float64], measure


def test_hutchinson_is_unbiased_for_traces() -> None:
    """Averaging many probes recovers the exact Tr H (fails if probe scaling is wrong)."""
    dec = make_mlp([2, 16, 10], seed=11)
    z = torch.randn(4, 2, dtype=torch.float64)
    exact = isofast.distortion(dec, z, "jacobian_frobenius", eta=None, estimator="exact")
    est = isofast.distortion(dec, z, "jacobian_frobenius", eta=None, estimator="hutchinson", n_probes=20000,
                             generator=torch.Generator().manual_seed(0))
    assert abs(float(est / exact) - 1) < 0.03


def test_gradients_reach_an_encoder_through_mixup() -> None:
    enc = torch.nn.Linear(5, 2).double()
    dec = make_mlp([2, 8, 6], seed=12)
    x = torch.randn(10, 5, dtype=torch.float64)
    loss = isofast.relaxed_distortion(dec, enc(x), generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


def test_pullback_metric_both_paths() -> None:
    for dec in (make_mlp([2, 9, 7], seed=13), ConvDecoder(m=2, seed=13)):
        z = torch.randn(4, 2, dtype=torch.float64)
        h = isofast.pullback_metric(dec, z)
        assert h.shape == (4, 2, 2)
        assert rel_err(h, pullback_brute_force(dec, z)) < RTOL[torch.float64]


def test_trailing_unflatten_and_wrapper_hook_take_fused_path() -> None:
    seq = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ELU(), torch.nn.Linear(8, 12), torch.nn.Sigmoid(),
                              torch.nn.Unflatten(1, (3, 4))).double()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = seq

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z)

        def isofast_sequential(self) -> torch.nn.Sequential:
            return self.net

    z = torch.randn(3, 2, dtype=torch.float64)
    for dec in (seq, Wrapper()):
        assert isofast.plan(dec, z).path == "fused_mlp"
        assert rel_err(isofast.pullback_metric(dec, z), pullback_brute_force(dec, z)) < RTOL[torch.float64]


def test_float32_matches_float64() -> None:
    dec64 = make_mlp([2, 32, 32, 50], seed=14)
    dec32 = make_mlp([2, 32, 32, 50], seed=14, dtype=torch.float32)
    z = torch.randn(16, 2, dtype=torch.float64)
    a = isofast.relaxed_distortion(dec64, z, eta=None)
    b = isofast.relaxed_distortion(dec32, z.float(), eta=None)
    assert b.dtype == torch.float32
    assert abs(float(b) / float(a) - 1) < RTOL[torch.float32]


def test_regularizer_module() -> None:
    dec = make_mlp([2, 8, 6], seed=15)
    z = torch.randn(5, 2, dtype=torch.float64)
    reg = isofast.IsometricRegularizer(measure="conformal", weight=3.0, eta=None)
    assert "conformal" in repr(reg)
    assert torch.allclose(reg(dec, z), 3.0 * isofast.distortion(dec, z, "conformal", eta=None))
    assert reg.plan(dec, z).estimator == "exact"


def test_isometric_map_hits_the_minima() -> None:
    """An orthogonal linear decoder is an isometry: each measure returns its documented minimum."""
    q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    dec = torch.nn.Sequential(torch.nn.Linear(3, 6, bias=False)).double()
    dec[0].weight.data = 2.0 * q  # scaled isometry with c = 4
    z = torch.randn(5, 3, dtype=torch.float64)
    got = {mm: float(isofast.distortion(dec, z, mm, eta=None, estimator="exact")) for mm in isofast.MEASURES}
    assert got["scaled_isometry"] == pytest.approx(1 / 3)
    assert got["conformal"] == pytest.approx(1 / 3)
    assert got["volume"] == pytest.approx(0, abs=1e-20)
    assert got["isometry"] == pytest.approx(3 * 9)  # Tr (4I - I)^2
    assert got["jacobian_frobenius"] == pytest.approx(12)


def test_zero_jacobian_gives_documented_zero_not_nan() -> None:
    dec = torch.nn.Sequential(torch.nn.Linear(2, 4)).double()
    torch.nn.init.zeros_(dec[0].weight)
    z = torch.randn(3, 2, dtype=torch.float64)
    for measure in ("scaled_isometry", "conformal"):
        value = isofast.distortion(dec, z, measure, eta=None)
        value.backward()
        assert float(value) == 0.0
        assert torch.isfinite(dec[0].weight.grad).all()
    vol = isofast.distortion(dec, z, "volume", eta=None)
    assert torch.isfinite(vol)
