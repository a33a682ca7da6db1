"""``mlp_hutchinson``: ``||Jv||^2`` and ``||J^T J v||^2`` on every backend. The torch twin against
float64 brute force; a diagonal data-space metric ``W = diag(w)`` (``v^T J^T W J v`` and
``||J^T W J v||^2``) on every backend that has one (torch, cpu); the cpu backend (C++ extension)
against the twin, gradcheck, the official IRVAE estimator and its custom ops' opcheck; the triton
backend (``-m interpreter``: Triton's interpreter on CPU, or a CUDA device) against the twin, brute
force and the official estimator.

The cpu backend's tests skip when the extension is not built, unless ``ISOFAST_REQUIRE_EXT`` is set
(CI): then a missing or broken build FAILS them."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ACTIVATIONS, GRAD_RTOL, RTOL, TRITON_DEVICE, assert_fp32_grads_close, assert_run_close, gradcheck_over_params, grads,
    make_mlp, opcheck_mlp, positive_weight, rel_err, stats_brute_force, triton_case, value_and_grads,
)

import isofast
from isofast import _ext, backends
from isofast.backends.torch_backend import BACKEND
from isofast.baselines import official_relaxed_distortion
from isofast.mlp import extract_mlp
from isofast.ops import mlp_hutchinson


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_values_and_grads_match_brute_force(act: str) -> None:
    dec = make_mlp([3, 8, 6, 5], act=act, out_act="softplus", seed=3)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(4, 2, 3, dtype=torch.float64)
    stats = mlp_hutchinson(BACKEND, spec, z, probes)
    ref = stats_brute_force(dec, z, probes)
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
    assert gradcheck_over_params(lambda s, z: mlp_hutchinson(BACKEND, s, z, probes), spec, z,
                                 eps=1e-6, atol=1e-6, rtol=1e-5)


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
    ref = stats_brute_force(dec, z, probes, w)
    assert rel_err(stats, ref) < RTOL[torch.float64]
    assert rel_err(stats, stats_brute_force(dec, z, probes)) > 1e-2  # the weight matters
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
    assert gradcheck_over_params(lambda s, z: mlp_hutchinson(data_metric_backend, s, z, probes, data_weight=w),
                                 spec, z, eps=1e-7, atol=1e-6, rtol=1e-5)


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


# --- cpu backend (the C++ extension) against the twin, gradcheck and the official estimator -------

def _cpu_run(backend, spec, z, probes, data_weight=None):
    """The statistics and their gradients (z and every parameter) for a random output cotangent."""
    return value_and_grads(mlp_hutchinson(backend, spec, z, probes, data_weight=data_weight), [z, *spec.params()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9], [2, 16, 16, 12]])
def test_cpu_matches_torch_twin(cpu_ext, act, dtype, widths):
    dec = make_mlp(widths, act=act, out_act="sigmoid" if act != "identity" else None, dtype=dtype, seed=3)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(0)
    z = torch.randn(5, widths[0], dtype=dtype, requires_grad=True)
    probes = torch.randn(5, 3, widths[0], dtype=dtype)
    assert_run_close(_cpu_run(cpu_ext, spec, z, probes), _cpu_run(BACKEND, spec, z, probes), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "softplus", "gelu", "identity"])
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9], [2, 16, 16, 12]])
def test_cpu_data_weight_matches_torch_twin(cpu_ext, act, dtype, widths):
    """The diagonal data-space metric (values and gradients), a bias-free first layer included."""
    dec = make_mlp(widths, act=act, out_act="sigmoid" if act != "identity" else None, dtype=dtype, seed=4)
    dec[0].bias = None
    spec, _ = extract_mlp(dec)
    torch.manual_seed(1)
    z = torch.randn(5, widths[0], dtype=dtype, requires_grad=True)
    probes = torch.randn(5, 3, widths[0], dtype=dtype)
    w = positive_weight(widths[-1], dtype=dtype, seed=2)
    got = _cpu_run(cpu_ext, spec, z, probes, data_weight=w)
    assert_run_close(got, _cpu_run(BACKEND, spec, z, probes, data_weight=w), dtype)


def test_cpu_data_weight_bad_inputs_raise_from_cpp(cpu_ext):
    w = [torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    acts = ([1, 7], [0.0, 0.0], [0.0, 0.0])
    z = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="data_weight has dtype"):
        _ext.get().mlp_hutchinson_forward(z, torch.randn(5, 1, 2, dtype=torch.float64), w, [None, None], *acts,
                                          torch.ones(3))


def test_cpu_no_bias_and_single_layer(cpu_ext):
    dec = torch.nn.Sequential(torch.nn.Linear(3, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    single = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Softplus()).double()
    for d in (dec, single):
        spec, _ = extract_mlp(d)
        z = torch.randn(4, spec.in_features, dtype=torch.float64, requires_grad=True)
        probes = torch.randn(4, 2, spec.in_features, dtype=torch.float64)
        for a, b in zip(_cpu_run(cpu_ext, spec, z, probes), _cpu_run(BACKEND, spec, z, probes)):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_cpu_gradcheck(cpu_ext, act):
    dec = make_mlp([2, 4, 3], act=act, out_act=act, dtype=torch.float64, seed=1)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(1)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(3, 2, 2, dtype=torch.float64)
    # ReLU-like kinks: keep the finite-difference step small against distances to the kink.
    assert gradcheck_over_params(lambda s, z: mlp_hutchinson(cpu_ext, s, z, probes), spec, z, eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_official_estimator(cpu_ext, dtype):
    dec = make_mlp([2, 32, 32, 20], act="relu", out_act="sigmoid", dtype=dtype, seed=4)
    torch.manual_seed(4)
    z = torch.randn(16, 2, dtype=dtype, requires_grad=True)
    v = torch.randn(16, 2, dtype=dtype)
    ref = official_relaxed_distortion(dec, z, v)
    g_ref = torch.autograd.grad(ref, [z, *dec.parameters()])
    with backends.use("cpu"):
        p = isofast.plan(dec, z, eta=None, probes=v[:, None])
        assert p.backend == "cpu"
        got = isofast.relaxed_distortion(dec, z, eta=None, probes=v[:, None])
    g = torch.autograd.grad(got, [z, *dec.parameters()])
    assert rel_err(got, ref) <= RTOL[dtype] * 10
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= GRAD_RTOL[dtype] * 10


def test_cpu_bad_probes_raise_from_cpp(cpu_ext):
    w = [torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    acts = ([1, 7], [0.0, 0.0], [0.0, 0.0])
    z = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="probes must have shape"):
        _ext.get().mlp_hutchinson_forward(z, torch.randn(5, 2, dtype=torch.float64), w, [None, None], *acts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9]])
def test_cpu_custom_ops_opcheck(cpu_ext, dtype, widths):
    """``isofast::mlp_hutchinson_forward`` and ``_backward`` (what torch.compile traces) pass
    torch.library.opcheck on their CPU kernels: schema, fake (shape-only) implementations, and
    tracing; a bias-free layer included, with and without the diagonal data-space metric."""
    spec, weights, biases, has_bias, acts, gen = opcheck_mlp(widths, dtype)
    z = torch.randn(4, widths[0], generator=gen, dtype=dtype)
    probes = torch.randn(4, 3, widths[0], generator=gen, dtype=dtype)
    ops = torch.ops.isofast
    dw = 0.5 + torch.rand(widths[-1], generator=gen, dtype=dtype)
    grad_st = None
    for extra in ((), (dw,)):
        torch.library.opcheck(ops.mlp_hutchinson_forward, (z, probes, weights, biases, *acts, *extra))
        st, saved = cpu_ext.mlp_hutchinson_forward(z, probes, weights, biases, spec.activations, *extra)
        grad_st = torch.randn(st.shape, generator=gen, dtype=dtype) if grad_st is None else grad_st
        torch.library.opcheck(ops.mlp_hutchinson_backward, (grad_st, weights, has_bias, *acts, list(saved), *extra))


# --- triton backend against the twin, brute force and the official estimator ---------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_triton_stats_and_grads_match_twin_and_brute_force(triton_backend, act: str) -> None:
    dec64, dec32, z64, v64 = triton_case(act, [3, 9, 7, 10], batch=5, k=2, seed=1)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    v32 = v64.float()
    stats = mlp_hutchinson(triton_backend, spec32, z32, v32)
    assert stats.shape == (5, 2, 2) and stats.dtype == torch.float32
    z64 = z64.requires_grad_()
    ref = stats_brute_force(dec64, z64, v64)
    twin = mlp_hutchinson(BACKEND, spec32, z32, v32)
    assert rel_err(stats, ref) < RTOL[torch.float32]
    assert rel_err(stats, twin) < RTOL[torch.float32]
    assert_fp32_grads_close(stats, ref, twin, (z32, dec32), (z64, dec64), seed=3)


@pytest.mark.interpreter
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu_tanh"])
def test_triton_official_estimator(act: str) -> None:
    """The IRVAE ratio through isofast.distortion on the triton backend equals the official
    autograd.functional recipe with the same probe: value within 2e-4, gradients within 2e-3."""
    _, dec, z64, v64 = triton_case(act, [2, 16, 12, 20], batch=8, k=1, seed=4)
    z = z64.float().requires_grad_()
    v = v64.float()
    with backends.use("triton"):
        got = isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", probes=v)
    want = official_relaxed_distortion(dec, z, v[:, 0])
    assert abs(got.item() - want.item()) <= 2e-4 * abs(want.item())
    params = [z, *dec.parameters()]
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]


@pytest.mark.interpreter
def test_triton_many_probes_several_tiles(triton_backend) -> None:
    dec64, dec32, z64, v64 = triton_case("tanh", [12, 40, 130], batch=40, k=5, seed=2, out_act=None)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    stats = mlp_hutchinson(triton_backend, spec32, z32, v64.float())
    twin = mlp_hutchinson(BACKEND, spec32, z32, v64.float())
    assert rel_err(stats, twin) < RTOL[torch.float32]
    weight = torch.randn(stats.shape, device=TRITON_DEVICE)
    params = [z32, *dec32.parameters()]
    for g, t in zip(grads(stats, weight, params), grads(twin, weight, params)):
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


@pytest.mark.interpreter
def test_triton_the_comparison_can_fail(triton_backend) -> None:
    """Negative control: different probes must be caught by the same check."""
    dec64, dec32, z64, v64 = triton_case("softplus", [2, 9, 7], batch=5, k=1)
    spec32, _ = extract_mlp(dec32)
    stats = mlp_hutchinson(triton_backend, spec32, z64.float(), (1.01 * v64).float())
    assert rel_err(stats, stats_brute_force(dec64, z64, v64)) > RTOL[torch.float32]


@pytest.mark.interpreter
def test_triton_bf16_gemms_stay_close_and_finite(triton_backend) -> None:
    dec64, dec32, z64, v64 = triton_case("silu", [4, 32, 32, 24], batch=6, k=2, seed=5)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    with backends.precision("bf16"):
        stats = mlp_hutchinson(triton_backend, spec32, z32, v64.float())
    twin = mlp_hutchinson(BACKEND, spec32, z32, v64.float())
    assert stats.dtype == torch.float32 and rel_err(stats, twin) < 5e-2
    (grad,) = torch.autograd.grad(stats.sum(), [z32])
    assert torch.isfinite(grad).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("act,widths,batch,k", [("tanh", [3, 9, 7, 10], 5, 2), ("relu", [4, 40, 130], 33, 3)])
def test_triton_data_weight_matches_twin_and_brute_force(
    triton_backend, act: str, widths: list[int], batch: int, k: int
) -> None:
    """``v^T J^T W J v`` and ``||J^T W J v||^2``: values and gradients against the float64 brute
    force and the twin (the second case: several sample and column tiles, a bias-free first layer)."""
    assert triton_backend.diagonal_data_metric
    dec64, dec32, z64, v64 = triton_case(act, widths, batch=batch, k=k, seed=6)
    if len(widths) == 3:
        dec64[0].bias, dec32[0].bias = None, None
    spec32, _ = extract_mlp(dec32)
    w64 = positive_weight(widths[-1], seed=7).to(TRITON_DEVICE)
    z32 = z64.float().requires_grad_()
    v32 = v64.float()
    stats = mlp_hutchinson(triton_backend, spec32, z32, v32, data_weight=w64.float())
    z64 = z64.requires_grad_()
    ref = stats_brute_force(dec64, z64, v64, w64)
    twin = mlp_hutchinson(BACKEND, spec32, z32, v32, data_weight=w64.float())
    assert rel_err(stats, ref) < RTOL[torch.float32] and rel_err(stats, twin) < RTOL[torch.float32]
    assert rel_err(stats, stats_brute_force(dec64, z64, v64)) > 1e-2
    assert_fp32_grads_close(stats, ref, twin, (z32, dec32), (z64, dec64), seed=8)
