"""``mlp_pullback`` (torch twin): exact H and its hand-written backward against float64 brute force."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ACTIVATIONS, GRAD_RTOL, RTOL, make_mlp, pullback_brute_force, rel_err

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
