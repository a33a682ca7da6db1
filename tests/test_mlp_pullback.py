"""``mlp_pullback`` (torch twin): exact H and its hand-written backward against float64 brute force;
with a diagonal data-space metric ``H = J^T diag(w) J`` on every backend that has one (torch, cpu)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ACTIVATIONS, GRAD_RTOL, RTOL, make_mlp, positive_weight, pullback_brute_force, rel_err

from isofast.backends.torch_backend import BACKEND
from isofast.mlp import extract_mlp
from isofast.ops import mlp_pullback


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_values_and_grads_match_brute_force(act: str) -> None:
    dec = make_mlp([3, 9, 7, 5], act=act, out_act="sigmoid", seed=1)
    spec, _ = extract_mlp(dec)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h = mlp_pullback(BACKEND, spec, z)
    ref = pullback_brute_force(dec, z)
    assert rel_err(h, ref) < RTOL[torch.float64]
    weight = torch.randn_like(h)
    params = [z, *dec.parameters()]
    got = torch.autograd.grad((h * weight).sum(), params)
    want = torch.autograd.grad((ref * weight).sum(), params)
    for g, w in zip(got, want):
        assert rel_err(g, w) < GRAD_RTOL[torch.float64]


@pytest.mark.parametrize("act", ["relu", "softplus", "gelu_tanh"])
def test_gradcheck(act: str) -> None:
    dec = make_mlp([2, 4, 3], act=act, out_act="tanh", seed=2)
    spec, _ = extract_mlp(dec)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    # relu kinks: keep away from a = 0 so finite differences are valid
    params = [p.detach().requires_grad_() for p in spec.params()]
    fn = lambda z, *ps: mlp_pullback(BACKEND, type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations), z)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_no_bias_and_float32() -> None:
    dec = torch.nn.Sequential(torch.nn.Linear(2, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 6))
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 2, requires_grad=True)
    h = mlp_pullback(BACKEND, spec, z)
    ref = pullback_brute_force(copy.deepcopy(dec).double(), z.double())
    assert h.dtype == torch.float32
    assert rel_err(h.double(), ref) < RTOL[torch.float32]
    h.sum().backward()
    assert dec[0].weight.grad is not None and z.grad is not None


# --- diagonal data-space metric: H = J^T diag(w) J ------------------------------------------------


def _drop_first_bias(dec: torch.nn.Sequential) -> torch.nn.Sequential:
    dec[0].bias = None
    return dec


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus", "sigmoid"])
def test_data_weight_matches_brute_force(data_metric_backend, act: str) -> None:
    dec = _drop_first_bias(make_mlp([3, 9, 7, 5], act=act, out_act="sigmoid", seed=5))
    spec, _ = extract_mlp(dec)
    assert spec.biases[0] is None
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = positive_weight(5, seed=1)
    h = mlp_pullback(data_metric_backend, spec, z, data_weight=w)
    ref = pullback_brute_force(dec, z, w)
    assert rel_err(h, ref) < RTOL[torch.float64]
    assert rel_err(h, pullback_brute_force(dec, z)) > 1e-2  # the weight matters
    cot = torch.randn_like(h)
    params = [z, *dec.parameters()]
    got = torch.autograd.grad((h * cot).sum(), params)
    want = torch.autograd.grad((ref * cot).sum(), params)
    for g, r in zip(got, want):
        assert rel_err(g, r) < GRAD_RTOL[torch.float64]


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu_tanh"])
def test_data_weight_gradcheck(data_metric_backend, act: str) -> None:
    dec = make_mlp([2, 4, 3], act=act, out_act="softplus", seed=6)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(6)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = positive_weight(3, seed=2)
    params = [p.detach().clone().requires_grad_() for p in spec.params()]

    def fn(z, *ps):
        s = type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations)
        return mlp_pullback(data_metric_backend, s, z, data_weight=w)

    assert torch.autograd.gradcheck(fn, (z, *params), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_unit_data_weight_equals_none(data_metric_backend) -> None:
    dec = _drop_first_bias(make_mlp([3, 8, 6], act="silu", out_act="tanh", seed=7))
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = [z, *dec.parameters()]
    outs = []
    for w in (None, torch.ones(6, dtype=torch.float64)):
        h = mlp_pullback(data_metric_backend, spec, z, data_weight=w)
        outs.append([h, *torch.autograd.grad((h * torch.arange(h.numel()).view_as(h)).sum(), params)])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-13


def test_data_weight_is_a_constant_and_shape_checked(data_metric_backend) -> None:
    dec = make_mlp([2, 5, 4], act="tanh", out_act=None, seed=8)
    spec, _ = extract_mlp(dec)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = positive_weight(4, seed=3).requires_grad_()
    h = mlp_pullback(data_metric_backend, spec, z, data_weight=w)
    h.sum().backward()
    assert w.grad is None and z.grad is not None
    with pytest.raises(ValueError, match=r"data_weight must have shape \(4,\)"):
        mlp_pullback(data_metric_backend, spec, z, data_weight=torch.ones(5, dtype=torch.float64))


def test_backends_without_the_metric_refuse_a_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend whose ``diagonal_data_metric`` is False takes ``data_weight=None`` only, and says so
    (the cuda backend is one; the base class declares none)."""
    from isofast import backends, dispatch
    from isofast.backends.base import Backend
    from isofast.backends.torch_backend import TorchBackend

    assert Backend.diagonal_data_metric is False and BACKEND.diagonal_data_metric is True
    cuda = backends.get("cuda")
    assert cuda is None or cuda.diagonal_data_metric is False

    class Plain(TorchBackend):
        name = "plain"
        diagonal_data_metric = False

    monkeypatch.setitem(dispatch.TABLE, "plain", dispatch.TABLE["torch"])  # every backend has its entries

    dec = make_mlp([2, 5, 4], act="tanh", seed=12)
    spec, _ = extract_mlp(dec)
    z = torch.randn(3, 2, dtype=torch.float64)
    assert mlp_pullback(Plain(), spec, z).shape == (3, 2, 2)
    with pytest.raises(NotImplementedError, match="'plain' backend has no diagonal data-space metric"):
        mlp_pullback(Plain(), spec, z, data_weight=torch.ones(4, dtype=torch.float64))
