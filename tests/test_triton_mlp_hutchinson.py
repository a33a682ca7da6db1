"""``mlp_hutchinson`` on the ``"triton"`` backend: trace statistics and gradients against the torch
twin, a float64 brute force and the official IRVAE estimator, for every activation.

Runs through Triton's interpreter on CPU (``TRITON_INTERPRET=1 python -m pytest -m interpreter``)
or on a CUDA device; skips cleanly elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    ACTIVATIONS, GRAD_RTOL, HAS_CUDA, INTERPRETER, RTOL, jacobian_brute_force, make_mlp, positive_weight, rel_err,
)

pytest.importorskip("triton")
if not (INTERPRETER or HAS_CUDA):
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

import isofast  # noqa: E402
from isofast import backends  # noqa: E402
from isofast.backends.torch_backend import BACKEND as TWIN  # noqa: E402
from isofast.baselines import official_relaxed_distortion  # noqa: E402
from isofast.mlp import extract_mlp  # noqa: E402
from isofast.ops import mlp_hutchinson  # noqa: E402

pytestmark = pytest.mark.interpreter
DEVICE = "cpu" if INTERPRETER else "cuda"
TRITON = backends.get("triton")


def _case(act: str, widths: list[int], batch: int, k: int, seed: int = 0, out_act: str | None = "sigmoid"):
    dec64 = make_mlp(widths, act=act, out_act=out_act, seed=seed).to(DEVICE)
    dec32 = copy.deepcopy(dec64).float()
    g = torch.Generator().manual_seed(seed + 100)
    z64 = torch.randn(batch, widths[0], generator=g, dtype=torch.float64).to(DEVICE)
    v64 = torch.randn(batch, k, widths[0], generator=g, dtype=torch.float64).to(DEVICE)
    return dec64, dec32, z64, v64


def _brute_stats(dec: torch.nn.Module, z: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    j = jacobian_brute_force(dec, z)
    jv = torch.einsum("bdm,bkm->bkd", j, v)
    wjv = jv if w is None else w * jv
    jtjv = torch.einsum("bdm,bkd->bkm", j, wjv)
    return torch.stack([(jv * wjv).sum(-1), jtjv.square().sum(-1)], dim=-1)


def _grads(out, weight, params):
    return torch.autograd.grad((out * weight).sum(), params)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_stats_and_grads_match_twin_and_brute_force(act: str) -> None:
    dec64, dec32, z64, v64 = _case(act, [3, 9, 7, 10], batch=5, k=2, seed=1)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    v32 = v64.float()
    stats = mlp_hutchinson(TRITON, spec32, z32, v32)
    assert stats.shape == (5, 2, 2) and stats.dtype == torch.float32
    z64 = z64.requires_grad_()
    ref = _brute_stats(dec64, z64, v64)
    twin = mlp_hutchinson(TWIN, spec32, z32, v32)
    assert rel_err(stats, ref) < RTOL[torch.float32]
    assert rel_err(stats, twin) < RTOL[torch.float32]
    weight = torch.randn(stats.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    got = _grads(stats, weight.float(), [z32, *dec32.parameters()])
    want = _grads(ref, weight, [z64, *dec64.parameters()])
    want_twin = _grads(twin, weight.float(), [z32, *dec32.parameters()])
    for g, w, t in zip(got, want, want_twin):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu_tanh"])
def test_official_estimator(act: str) -> None:
    """The IRVAE ratio through isofast.distortion on the triton backend equals the official
    autograd.functional recipe with the same probe: value within 2e-4, gradients within 2e-3."""
    _, dec, z64, v64 = _case(act, [2, 16, 12, 20], batch=8, k=1, seed=4)
    z = z64.float().requires_grad_()
    v = v64.float()
    with backends.use("triton"):
        got = isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", probes=v)
    want = official_relaxed_distortion(dec, z, v[:, 0])
    assert abs(got.item() - want.item()) <= 2e-4 * abs(want.item())
    params = [z, *dec.parameters()]
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]


def test_many_probes_several_tiles() -> None:
    dec64, dec32, z64, v64 = _case("tanh", [12, 40, 130], batch=40, k=5, seed=2, out_act=None)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    stats = mlp_hutchinson(TRITON, spec32, z32, v64.float())
    twin = mlp_hutchinson(TWIN, spec32, z32, v64.float())
    assert rel_err(stats, twin) < RTOL[torch.float32]
    weight = torch.randn(stats.shape, device=DEVICE)
    params = [z32, *dec32.parameters()]
    for g, t in zip(_grads(stats, weight, params), _grads(twin, weight, params)):
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


def test_the_comparison_can_fail() -> None:
    """Negative control: different probes must be caught by the same check."""
    dec64, dec32, z64, v64 = _case("softplus", [2, 9, 7], batch=5, k=1)
    spec32, _ = extract_mlp(dec32)
    stats = mlp_hutchinson(TRITON, spec32, z64.float(), (1.01 * v64).float())
    assert rel_err(stats, _brute_stats(dec64, z64, v64)) > RTOL[torch.float32]


def test_bf16_gemms_stay_close_and_finite() -> None:
    dec64, dec32, z64, v64 = _case("silu", [4, 32, 32, 24], batch=6, k=2, seed=5)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    with backends.precision("bf16"):
        stats = mlp_hutchinson(TRITON, spec32, z32, v64.float())
    twin = mlp_hutchinson(TWIN, spec32, z32, v64.float())
    assert stats.dtype == torch.float32 and rel_err(stats, twin) < 5e-2
    (grad,) = torch.autograd.grad(stats.sum(), [z32])
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("act,widths,batch,k", [("tanh", [3, 9, 7, 10], 5, 2), ("relu", [4, 40, 130], 33, 3)])
def test_data_weight_matches_twin_and_brute_force(act: str, widths: list[int], batch: int, k: int) -> None:
    """``v^T J^T W J v`` and ``||J^T W J v||^2``: values and gradients against the float64 brute
    force and the twin (the second case: several sample and column tiles, a bias-free first layer)."""
    assert TRITON.diagonal_data_metric
    dec64, dec32, z64, v64 = _case(act, widths, batch=batch, k=k, seed=6)
    if len(widths) == 3:
        dec64[0].bias, dec32[0].bias = None, None
    spec32, _ = extract_mlp(dec32)
    w64 = positive_weight(widths[-1], seed=7).to(DEVICE)
    z32 = z64.float().requires_grad_()
    v32 = v64.float()
    stats = mlp_hutchinson(TRITON, spec32, z32, v32, data_weight=w64.float())
    z64 = z64.requires_grad_()
    ref = _brute_stats(dec64, z64, v64, w64)
    twin = mlp_hutchinson(TWIN, spec32, z32, v32, data_weight=w64.float())
    assert rel_err(stats, ref) < RTOL[torch.float32] and rel_err(stats, twin) < RTOL[torch.float32]
    assert rel_err(stats, _brute_stats(dec64, z64, v64)) > 1e-2
    weight = torch.randn(stats.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    got = _grads(stats, weight.float(), [z32, *dec32.parameters()])
    want = _grads(ref, weight, [z64, *dec64.parameters()])
    want_twin = _grads(twin, weight.float(), [z32, *dec32.parameters()])
    for g, w, t in zip(got, want, want_twin):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]
