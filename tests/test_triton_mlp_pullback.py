"""``mlp_pullback`` on the ``"triton"`` backend: values and gradients against the torch twin and a
float64 brute force, for every activation.

Runs through Triton's interpreter on CPU (``TRITON_INTERPRET=1 python -m pytest -m interpreter``)
or on a CUDA device; skips cleanly elsewhere.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import (
    ACTIVATIONS, GRAD_RTOL, HAS_CUDA, INTERPRETER, RTOL, make_mlp, positive_weight, pullback_brute_force, rel_err,
)

pytest.importorskip("triton")
if not (INTERPRETER or HAS_CUDA):
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

import isofast  # noqa: E402
from isofast import backends  # noqa: E402
from isofast.backends.torch_backend import BACKEND as TWIN  # noqa: E402
from isofast.mlp import extract_mlp  # noqa: E402
from isofast.ops import mlp_pullback  # noqa: E402

pytestmark = pytest.mark.interpreter
DEVICE = "cpu" if INTERPRETER else "cuda"
TRITON = backends.get("triton")


def _grads(out: torch.Tensor, weight: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * weight).sum(), params)


def _case(act: str, widths: list[int], batch: int, seed: int = 0):
    dec64 = make_mlp(widths, act=act, out_act="sigmoid", seed=seed).to(DEVICE)
    dec32 = copy.deepcopy(dec64).float()
    g = torch.Generator().manual_seed(seed + 100)
    z64 = torch.randn(batch, widths[0], generator=g, dtype=torch.float64).to(DEVICE)
    return dec64, dec32, z64


def test_backend_is_available_here() -> None:
    ok, why = backends.status("triton")
    assert ok, why
    assert TRITON.supports(torch.device(DEVICE))[0]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_values_and_grads_match_twin_and_brute_force(act: str) -> None:
    dec64, dec32, z64 = _case(act, [2, 9, 7, 11], batch=5, seed=1)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    h = mlp_pullback(TRITON, spec32, z32)
    assert h.shape == (5, 2, 2) and h.dtype == torch.float32
    z64 = z64.requires_grad_()
    ref = pullback_brute_force(dec64, z64)
    twin = mlp_pullback(TWIN, spec32, z32)
    assert rel_err(h, ref) < RTOL[torch.float32]
    assert rel_err(h, twin) < RTOL[torch.float32]
    weight = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    got = _grads(h, weight.float(), [z32, *dec32.parameters()])
    want = _grads(ref, weight, [z64, *dec64.parameters()])
    want_twin = _grads(twin, weight.float(), [z32, *dec32.parameters()])
    for g, w, t in zip(got, want, want_twin):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("m,act", [(3, "softplus"), (5, "tanh")])
def test_wider_latent_several_tiles(m: int, act: str) -> None:
    """More streams (NSP padding) and several sample / column tiles (atomics over tiles)."""
    dec64, dec32, z64 = _case(act, [m, 40, 150], batch=70, seed=2)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    h = mlp_pullback(TRITON, spec32, z32)
    twin = mlp_pullback(TWIN, spec32, z32)
    assert rel_err(h, twin) < RTOL[torch.float32]
    weight = torch.randn_like(h)
    for g, t in zip(_grads(h, weight, [z32, *dec32.parameters()]), _grads(twin, weight, [z32, *dec32.parameters()])):
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


def test_single_layer_no_bias() -> None:
    dec = torch.nn.Sequential(torch.nn.Linear(2, 6, bias=False), torch.nn.ELU(0.5)).to(DEVICE)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 2, device=DEVICE, requires_grad=True)
    h, twin = mlp_pullback(TRITON, spec, z), mlp_pullback(TWIN, spec, z)
    assert rel_err(h, twin) < RTOL[torch.float32]
    weight = torch.randn_like(h)
    got, want = _grads(h, weight, [z, dec[0].weight]), _grads(twin, weight, [z, dec[0].weight])
    for g, w in zip(got, want):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]


def test_the_comparison_can_fail() -> None:
    """Negative control: a different activation parameter must be caught by the same checks."""
    dec64, dec32, z64 = _case("leaky_relu", [2, 9, 7], batch=5)
    spec32, _ = extract_mlp(dec32)
    other = copy.deepcopy(dec32)
    other[1].negative_slope = 0.3
    spec_other, _ = extract_mlp(other)
    h = mlp_pullback(TRITON, spec_other, z64.float())
    assert rel_err(h, pullback_brute_force(dec64, z64)) > RTOL[torch.float32]


def test_distortion_api_takes_the_triton_backend() -> None:
    import isofast

    dec64, dec32, z64 = _case("silu", [2, 12, 10], batch=6)
    z32 = z64.float()
    with backends.use("triton"):
        plan = isofast.plan(dec32, z32, "scaled_isometry", eta=None, estimator="exact")
        got = isofast.distortion(dec32, z32, "scaled_isometry", eta=None, estimator="exact")
    assert plan.backend == "triton"
    with backends.use("torch"):
        want = isofast.distortion(dec32, z32, "scaled_isometry", eta=None, estimator="exact")
    assert rel_err(got, want) < RTOL[torch.float32]


@pytest.mark.parametrize(
    "mode,tol,grad_tol",
    [("fp32", RTOL[torch.float32], GRAD_RTOL[torch.float32]), ("tf32", 5e-2, 0.15), ("bf16", 5e-2, 0.15)],
)
def test_precision_modes(mode: str, tol: float, grad_tol: float) -> None:
    dec64, dec32, z64 = _case("gelu", [2, 16, 16, 20], batch=6)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    with backends.precision(mode):
        h = mlp_pullback(TRITON, spec32, z32)
    assert h.dtype == torch.float32
    twin = mlp_pullback(TWIN, spec32, z32)
    assert rel_err(h, twin) < tol
    # The backward runs outside the block and must still reuse the forward's precision (no error,
    # finite, close to the twin's).
    weight = torch.randn_like(h)
    for g, t in zip(_grads(h, weight, [z32, *dec32.parameters()]), _grads(twin, weight, [z32, *dec32.parameters()])):
        assert torch.isfinite(g).all() and rel_err(g, t) < grad_tol


def test_precision_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="precision"):
        with backends.precision("fp8"):
            pass
    assert backends.current_precision() == "fp32"


def test_float64_is_left_to_the_twin_and_plan_says_so() -> None:
    dec64, _, z64 = _case("tanh", [2, 5, 4], batch=3)
    assert not TRITON.supports(z64.device, torch.float64)[0]
    with backends.use("triton"):
        with pytest.raises(ValueError, match="float64"):
            isofast.plan(dec64, z64)
    assert isofast.plan(dec64, z64).backend != "triton"
    assert rel_err(isofast.pullback_metric(dec64, z64), pullback_brute_force(dec64, z64)) < RTOL[torch.float64]


def test_no_host_sync_in_the_backend_sources() -> None:
    """The kernels' host code must not synchronise (CUDA-graph capture of a training step)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "isofast", "backends", "triton_backend.py")]
    files += [os.path.join(root, "kernels", f) for f in ("launch.py", "mlp_stream.py", "mlp_pullback.py", "mlp_hutchinson.py")]
    for path in files:
        text = open(path, encoding="utf-8").read()
        for bad in (".item()", ".tolist()", ".cpu()", "synchronize(", ".numpy()"):
            assert bad not in text, f"{os.path.basename(path)} contains {bad}"


@pytest.mark.parametrize("act,widths,batch", [("softplus", [2, 9, 7, 11], 5), ("relu", [3, 40, 150], 33)])
def test_data_weight_matches_twin_and_brute_force(act: str, widths: list[int], batch: int) -> None:
    """``H = J^T diag(w) J``: values and gradients against the float64 brute force and the twin
    (the second case: several sample and column tiles, a bias-free first layer)."""
    assert TRITON.diagonal_data_metric
    dec64, dec32, z64 = _case(act, widths, batch=batch, seed=5)
    if len(widths) == 3:
        dec64[0].bias, dec32[0].bias = None, None
    spec32, _ = extract_mlp(dec32)
    w64 = positive_weight(widths[-1], seed=6).to(DEVICE)
    z32 = z64.float().requires_grad_()
    h = mlp_pullback(TRITON, spec32, z32, data_weight=w64.float())
    z64 = z64.requires_grad_()
    ref = pullback_brute_force(dec64, z64, w64)
    twin = mlp_pullback(TWIN, spec32, z32, data_weight=w64.float())
    assert rel_err(h, ref) < RTOL[torch.float32] and rel_err(h, twin) < RTOL[torch.float32]
    assert rel_err(h, pullback_brute_force(dec64, z64)) > 1e-2
    weight = torch.randn(h.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    got = _grads(h, weight.float(), [z32, *dec32.parameters()])
    want = _grads(ref, weight, [z64, *dec64.parameters()])
    want_twin = _grads(twin, weight.float(), [z32, *dec32.parameters()])
    for g, w, t in zip(got, want, want_twin):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]
