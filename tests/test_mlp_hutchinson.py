"""``mlp_hutchinson`` (torch twin): ``||Jv||^2`` and ``||J^T J v||^2`` against float64 brute force;
with a diagonal data-space metric ``W = diag(w)`` (``v^T J^T W J v`` and ``||J^T W J v||^2``) on
every backend that has one (torch, cpu)."""

from __future__ import annotations

import pytest
import torch
from conftest import ACTIVATIONS, GRAD_RTOL, RTOL, jacobian_brute_force, make_mlp, positive_weight, rel_err

from isofast.backends.torch_backend import BACKEND
from isofast.mlp import extract_mlp
from isofast.ops import mlp_hutchinson


def _reference(
    dec: torch.nn.Module, z: torch.Tensor, probes: torch.Tensor, data_weight: torch.Tensor | None = None
) -> torch.Tensor:
    j = jacobian_brute_force(dec, z)
    jv = torch.einsum("bdm,bkm->bkd", j, probes)
    wjv = jv if data_weight is None else data_weight * jv
    jtjv = torch.einsum("bdm,bkd->bkm", j, wjv)
    return torch.stack([(jv * wjv).sum(-1), jtjv.square().sum(-1)], dim=-1)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_values_and_grads_match_brute_force(act: str) -> None:
    dec = make_mlp([3, 8, 6, 5], act=act, out_act="softplus", seed=3)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(4, 2, 3, dtype=torch.float64)
    stats = mlp_hutchinson(BACKEND, spec, z, probes)
    ref = _reference(dec, z, probes)
    assert stats.shape == (4, 2, 2)
    assert rel_err(stats, ref) < RTOL[torch.float64]
    weight = torch.randn_like(stats)
    params = [z, *dec.parameters()]
    got = torch.autograd.grad((stats * weight).sum(), params)
    want = torch.autograd.grad((ref * weight).sum(), params)
    for g, w in zip(got, want):
        assert rel_err(g, w) < GRAD_RTOL[torch.float64]


def test_gradcheck() -> None:
    dec = make_mlp([2, 4, 3], act="silu", out_act="sigmoid", seed=4)
    spec, _ = extract_mlp(dec)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(3, 2, 2, dtype=torch.float64)
    params = [p.detach().requires_grad_() for p in spec.params()]
    fn = lambda z, *ps: mlp_hutchinson(  # noqa: E731
        BACKEND, type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations), z, probes
    )
    assert torch.autograd.gradcheck(fn, (z, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- diagonal data-space metric W = diag(w) ---------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus", "sigmoid"])
def test_data_weight_matches_brute_force(data_metric_backend, act: str) -> None:
    dec = make_mlp([3, 8, 6, 5], act=act, out_act="softplus", seed=9)
    dec[2].bias = None  # a hidden layer without bias
    spec, _ = extract_mlp(dec)
    assert spec.biases[1] is None
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(4, 3, 3, dtype=torch.float64)
    w = positive_weight(5, seed=4)
    stats = mlp_hutchinson(data_metric_backend, spec, z, probes, data_weight=w)
    ref = _reference(dec, z, probes, w)
    assert rel_err(stats, ref) < RTOL[torch.float64]
    assert rel_err(stats, _reference(dec, z, probes)) > 1e-2  # the weight matters
    cot = torch.randn_like(stats)
    params = [z, *dec.parameters()]
    got = torch.autograd.grad((stats * cot).sum(), params)
    want = torch.autograd.grad((ref * cot).sum(), params)
    for g, r in zip(got, want):
        assert rel_err(g, r) < GRAD_RTOL[torch.float64]


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_data_weight_gradcheck(data_metric_backend, act: str) -> None:
    dec = make_mlp([2, 4, 3], act=act, out_act="sigmoid", seed=10)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(10)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(3, 2, 2, dtype=torch.float64)
    w = positive_weight(3, seed=5)
    params = [p.detach().clone().requires_grad_() for p in spec.params()]

    def fn(z, *ps):
        s = type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations)
        return mlp_hutchinson(data_metric_backend, s, z, probes, data_weight=w)

    assert torch.autograd.gradcheck(fn, (z, *params), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_unit_data_weight_equals_none(data_metric_backend) -> None:
    dec = make_mlp([3, 8, 6], act="softplus", out_act="tanh", seed=11)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(4, 2, 3, dtype=torch.float64)
    params = [z, *dec.parameters()]
    outs = []
    for w in (None, torch.ones(6, dtype=torch.float64)):
        st = mlp_hutchinson(data_metric_backend, spec, z, probes, data_weight=w)
        outs.append([st, *torch.autograd.grad((st * torch.arange(st.numel()).view_as(st)).sum(), params)])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-13
