"""``mlp_hutchinson`` (torch twin): ``||Jv||^2`` and ``||J^T J v||^2`` against float64 brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import ACTIVATIONS, GRAD_RTOL, RTOL, jacobian_brute_force, make_mlp, rel_err

from isofast.backends.torch_backend import BACKEND
from isofast.mlp import extract_mlp
from isofast.ops import mlp_hutchinson


def _reference(dec: torch.nn.Module, z: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    j = jacobian_brute_force(dec, z)
    jv = torch.einsum("bdm,bkm->bkd", j, probes)
    jtjv = torch.einsum("bdm,bkd->bkm", j, jv)
    return torch.stack([jv.square().sum(-1), jtjv.square().sum(-1)], dim=-1)


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
