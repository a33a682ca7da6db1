"""``mlp_pullback``: exact H and its hand-written backward on every backend. The torch twin against
float64 brute force; the diagonal data-space metric ``H = J^T diag(w) J`` on every backend that has
one (torch, cpu); the cpu backend (C++ extension) against the twin, brute force, gradcheck and its
custom ops' opcheck; the triton backend (``-m interpreter``: Triton's interpreter on CPU, or a CUDA
device) against the twin and brute force.

The cpu backend's tests skip when the extension is not built, unless ``ISOFAST_REQUIRE_EXT`` is set
(CI): then a missing or broken build FAILS them."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import (
    ACTIVATIONS, GRAD_RTOL, RTOL, TRITON_DEVICE, assert_fp32_grads_close, assert_run_close, gradcheck_over_params, grads,
    make_mlp, opcheck_mlp, positive_weight, pullback_brute_force, rel_err, triton_case, value_and_grads,
)

import isofast
from isofast import _ext, backends
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
    assert gradcheck_over_params(lambda s, z: mlp_pullback(BACKEND, s, z), spec, z, eps=1e-6, atol=1e-6, rtol=1e-5)


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
    assert gradcheck_over_params(lambda s, z: mlp_pullback(data_metric_backend, s, z, data_weight=w), spec, z,
                                 eps=1e-7, atol=1e-6, rtol=1e-5)


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


# --- cpu backend (the C++ extension) against the twin, brute force and gradcheck -----------------

def _cpu_run(backend, spec, z, data_weight=None):
    """``H`` and its gradients (z and every parameter) for a random output cotangent."""
    return value_and_grads(mlp_pullback(backend, spec, z, data_weight=data_weight), [z, *spec.params()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9], [2, 16, 16, 12]])
def test_cpu_matches_torch_twin(cpu_ext, act, dtype, widths):
    dec = make_mlp(widths, act=act, out_act="sigmoid" if act != "identity" else None, dtype=dtype, seed=3)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(0)
    z = torch.randn(5, widths[0], dtype=dtype, requires_grad=True)
    assert_run_close(_cpu_run(cpu_ext, spec, z), _cpu_run(BACKEND, spec, z), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "softplus", "gelu", "identity"])
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9], [2, 16, 16, 12]])
def test_cpu_data_weight_matches_torch_twin(cpu_ext, act, dtype, widths):
    """The diagonal data-space metric ``J^T diag(w) J`` (values and gradients), a bias-free first
    layer included."""
    dec = make_mlp(widths, act=act, out_act="sigmoid" if act != "identity" else None, dtype=dtype, seed=4)
    dec[0].bias = None
    spec, _ = extract_mlp(dec)
    torch.manual_seed(1)
    z = torch.randn(5, widths[0], dtype=dtype, requires_grad=True)
    w = positive_weight(widths[-1], dtype=dtype, seed=2)
    got = _cpu_run(cpu_ext, spec, z, data_weight=w)
    assert_run_close(got, _cpu_run(BACKEND, spec, z, data_weight=w), dtype)
    unweighted = _cpu_run(cpu_ext, spec, z)
    assert (got[0] - unweighted[0]).abs().max() > 1e-3 * unweighted[0].abs().max()


def test_cpu_data_weight_bad_inputs_raise_from_cpp(cpu_ext):
    w = [torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    acts = ([1, 7], [0.0, 0.0], [0.0, 0.0])
    z = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"data_weight must have shape \(3,\)"):
        _ext.get().mlp_pullback_forward(z, w, [None, None], *acts, torch.ones(4, dtype=torch.float64))


def test_cpu_no_bias_and_single_layer(cpu_ext):
    dec = torch.nn.Sequential(torch.nn.Linear(3, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    single = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Softplus()).double()
    for d in (dec, single):
        spec, _ = extract_mlp(d)
        z = torch.randn(4, spec.in_features, dtype=torch.float64, requires_grad=True)
        for a, b in zip(_cpu_run(cpu_ext, spec, z), _cpu_run(BACKEND, spec, z)):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_cpu_gradcheck(cpu_ext, act):
    dec = make_mlp([2, 4, 3], act=act, out_act=act, dtype=torch.float64, seed=1)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(1)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    # ReLU-like kinks: keep the finite-difference step small against distances to the kink.
    assert gradcheck_over_params(lambda s, z: mlp_pullback(cpu_ext, s, z), spec, z, eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_cpu_brute_force(cpu_ext, act):
    dec = make_mlp([2, 8, 8, 5], act=act, out_act="sigmoid", dtype=torch.float64, seed=2)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    h_ref = pullback_brute_force(dec, z)
    h = mlp_pullback(cpu_ext, spec, z)
    assert rel_err(h, h_ref) <= 1e-10
    w = torch.randn_like(h)
    params = [z, *dec.parameters()]
    for a, b in zip(torch.autograd.grad((h * w).sum(), params), torch.autograd.grad((h_ref * w).sum(), params)):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("measure", list(isofast.MEASURES))
def test_cpu_measures_match_twin(cpu_ext, measure):
    dec = make_mlp([3, 10, 10, 8], act="silu", out_act=None, dtype=torch.float64, seed=5)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    vals = []
    for name in ("torch", "cpu"):
        with backends.use(name):
            val = isofast.distortion(dec, z, measure, eta=None, estimator="exact")
        vals.append([val, *torch.autograd.grad(val, [z, *dec.parameters()])])
    for a, b in zip(*vals):
        assert rel_err(a, b) <= 1e-8


def test_cpu_bad_inputs_raise_from_cpp(cpu_ext):
    ext = _ext.get()
    w = [torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    b = [None, None]
    acts = ([1, 7], [0.0, 0.0], [0.0, 0.0])
    z = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="z must have shape"):
        ext.mlp_pullback_forward(z[0], w, b, *acts)
    with pytest.raises(RuntimeError, match="z must be float32 or float64"):
        ext.mlp_pullback_forward(z.half(), w, b, *acts)
    with pytest.raises(RuntimeError, match=r"weights\[1\] has 4 input features|weights\[1\]"):
        ext.mlp_pullback_forward(z, [w[0], torch.randn(3, 5, dtype=torch.float64)], b, *acts)
    with pytest.raises(RuntimeError, match=r"weights\[0\] has dtype"):
        ext.mlp_pullback_forward(z, [w[0].float(), w[1]], b, *acts)
    with pytest.raises(RuntimeError, match=r"biases\[0\] must have shape"):
        ext.mlp_pullback_forward(z, w, [torch.randn(5, dtype=torch.float64), None], *acts)
    with pytest.raises(RuntimeError, match=r"codes\[1\]"):
        ext.mlp_pullback_forward(z, w, b, [1, 42], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="grad_h must have shape"):
        _, saved = ext.mlp_pullback_forward(z, w, b, *acts)
        ext.mlp_pullback_backward(torch.ones(5, 3, 3, dtype=torch.float64), w, [False, False], *acts, saved)
    # Non-contiguous inputs are handled (made contiguous), not rejected.
    zt = torch.randn(2, 5, dtype=torch.float64).t()
    h1, _ = ext.mlp_pullback_forward(zt, [w[0].t().contiguous().t(), w[1]], b, *acts)
    h2, _ = ext.mlp_pullback_forward(zt.contiguous(), w, b, *acts)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9]])
def test_cpu_custom_ops_opcheck(cpu_ext, dtype, widths):
    """``isofast::mlp_pullback_forward`` and ``_backward`` (what torch.compile traces) pass
    torch.library.opcheck on their CPU kernels: schema, fake (shape-only) implementations, and
    tracing; a bias-free layer included, with and without the diagonal data-space metric."""
    spec, weights, biases, has_bias, acts, gen = opcheck_mlp(widths, dtype)
    z = torch.randn(4, widths[0], generator=gen, dtype=dtype)
    ops = torch.ops.isofast
    dw = 0.5 + torch.rand(widths[-1], generator=gen, dtype=dtype)
    grad_h = None
    for extra in ((), (dw,)):
        torch.library.opcheck(ops.mlp_pullback_forward, (z, weights, biases, *acts, *extra))
        h, saved = cpu_ext.mlp_pullback_forward(z, weights, biases, spec.activations, *extra)
        grad_h = torch.randn(h.shape, generator=gen, dtype=dtype) if grad_h is None else grad_h
        torch.library.opcheck(ops.mlp_pullback_backward, (grad_h, weights, has_bias, *acts, list(saved), *extra))


# --- triton backend against the twin and brute force ---------------------------------------------

@pytest.mark.interpreter
def test_triton_backend_is_available_here(triton_backend) -> None:
    ok, why = backends.status("triton")
    assert ok, why
    assert triton_backend.supports(torch.device(TRITON_DEVICE))[0]


@pytest.mark.interpreter
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_triton_values_and_grads_match_twin_and_brute_force(triton_backend, act: str) -> None:
    dec64, dec32, z64, _ = triton_case(act, [2, 9, 7, 11], batch=5, seed=1)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    h = mlp_pullback(triton_backend, spec32, z32)
    assert h.shape == (5, 2, 2) and h.dtype == torch.float32
    z64 = z64.requires_grad_()
    ref = pullback_brute_force(dec64, z64)
    twin = mlp_pullback(BACKEND, spec32, z32)
    assert rel_err(h, ref) < RTOL[torch.float32]
    assert rel_err(h, twin) < RTOL[torch.float32]
    assert_fp32_grads_close(h, ref, twin, (z32, dec32), (z64, dec64), seed=3)


@pytest.mark.interpreter
@pytest.mark.parametrize("m,act", [(3, "softplus"), (5, "tanh")])
def test_triton_wider_latent_several_tiles(triton_backend, m: int, act: str) -> None:
    """More streams (NSP padding) and several sample / column tiles (atomics over tiles)."""
    dec64, dec32, z64, _ = triton_case(act, [m, 40, 150], batch=70, seed=2)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    h = mlp_pullback(triton_backend, spec32, z32)
    twin = mlp_pullback(BACKEND, spec32, z32)
    assert rel_err(h, twin) < RTOL[torch.float32]
    weight = torch.randn_like(h)
    for g, t in zip(grads(h, weight, [z32, *dec32.parameters()]), grads(twin, weight, [z32, *dec32.parameters()])):
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


@pytest.mark.interpreter
def test_triton_single_layer_no_bias(triton_backend) -> None:
    dec = torch.nn.Sequential(torch.nn.Linear(2, 6, bias=False), torch.nn.ELU(0.5)).to(TRITON_DEVICE)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 2, device=TRITON_DEVICE, requires_grad=True)
    h, twin = mlp_pullback(triton_backend, spec, z), mlp_pullback(BACKEND, spec, z)
    assert rel_err(h, twin) < RTOL[torch.float32]
    weight = torch.randn_like(h)
    got, want = grads(h, weight, [z, dec[0].weight]), grads(twin, weight, [z, dec[0].weight])
    for g, w in zip(got, want):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]


@pytest.mark.interpreter
def test_triton_the_comparison_can_fail(triton_backend) -> None:
    """Negative control: a different activation parameter must be caught by the same checks."""
    dec64, dec32, z64, _ = triton_case("leaky_relu", [2, 9, 7], batch=5)
    spec32, _ = extract_mlp(dec32)
    other = copy.deepcopy(dec32)
    other[1].negative_slope = 0.3
    spec_other, _ = extract_mlp(other)
    h = mlp_pullback(triton_backend, spec_other, z64.float())
    assert rel_err(h, pullback_brute_force(dec64, z64)) > RTOL[torch.float32]


@pytest.mark.interpreter
@pytest.mark.usefixtures("triton_backend")
def test_triton_distortion_api_takes_the_triton_backend() -> None:
    import isofast

    dec64, dec32, z64, _ = triton_case("silu", [2, 12, 10], batch=6)
    z32 = z64.float()
    with backends.use("triton"):
        plan = isofast.plan(dec32, z32, "scaled_isometry", eta=None, estimator="exact")
        got = isofast.distortion(dec32, z32, "scaled_isometry", eta=None, estimator="exact")
    assert plan.backend == "triton"
    with backends.use("torch"):
        want = isofast.distortion(dec32, z32, "scaled_isometry", eta=None, estimator="exact")
    assert rel_err(got, want) < RTOL[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "mode,tol,grad_tol",
    [("fp32", RTOL[torch.float32], GRAD_RTOL[torch.float32]), ("tf32", 5e-2, 0.15), ("bf16", 5e-2, 0.15)],
)
def test_triton_precision_modes(triton_backend, mode: str, tol: float, grad_tol: float) -> None:
    dec64, dec32, z64, _ = triton_case("gelu", [2, 16, 16, 20], batch=6)
    spec32, _ = extract_mlp(dec32)
    z32 = z64.float().requires_grad_()
    with backends.precision(mode):
        h = mlp_pullback(triton_backend, spec32, z32)
    assert h.dtype == torch.float32
    twin = mlp_pullback(BACKEND, spec32, z32)
    assert rel_err(h, twin) < tol
    # The backward runs outside the block and must still reuse the forward's precision (no error,
    # finite, close to the twin's).
    weight = torch.randn_like(h)
    for g, t in zip(grads(h, weight, [z32, *dec32.parameters()]), grads(twin, weight, [z32, *dec32.parameters()])):
        assert torch.isfinite(g).all() and rel_err(g, t) < grad_tol


@pytest.mark.interpreter
def test_triton_precision_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="precision"):
        with backends.precision("fp8"):
            pass
    assert backends.current_precision() == "fp32"


@pytest.mark.interpreter
def test_triton_float64_is_left_to_the_twin_and_plan_says_so(triton_backend) -> None:
    dec64, _, z64, _ = triton_case("tanh", [2, 5, 4], batch=3)
    assert not triton_backend.supports(z64.device, torch.float64)[0]
    with backends.use("triton"):
        with pytest.raises(ValueError, match="float64"):
            isofast.plan(dec64, z64)
    assert isofast.plan(dec64, z64).backend != "triton"
    assert rel_err(isofast.pullback_metric(dec64, z64), pullback_brute_force(dec64, z64)) < RTOL[torch.float64]


@pytest.mark.interpreter
def test_triton_no_host_sync_in_the_backend_sources() -> None:
    """The kernels' host code must not synchronise (CUDA-graph capture of a training step)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "isofast", "backends", "triton_backend.py")]
    files += [os.path.join(root, "kernels", f) for f in ("launch.py", "mlp_stream.py", "mlp_pullback.py", "mlp_hutchinson.py")]
    for path in files:
        text = open(path, encoding="utf-8").read()
        for bad in (".item()", ".tolist()", ".cpu()", "synchronize(", ".numpy()"):
            assert bad not in text, f"{os.path.basename(path)} contains {bad}"


@pytest.mark.interpreter
@pytest.mark.parametrize("act,widths,batch", [("softplus", [2, 9, 7, 11], 5), ("relu", [3, 40, 150], 33)])
def test_triton_data_weight_matches_twin_and_brute_force(
    triton_backend, act: str, widths: list[int], batch: int
) -> None:
    """``H = J^T diag(w) J``: values and gradients against the float64 brute force and the twin
    (the second case: several sample and column tiles, a bias-free first layer)."""
    assert triton_backend.diagonal_data_metric
    dec64, dec32, z64, _ = triton_case(act, widths, batch=batch, seed=5)
    if len(widths) == 3:
        dec64[0].bias, dec32[0].bias = None, None
    spec32, _ = extract_mlp(dec32)
    w64 = positive_weight(widths[-1], seed=6).to(TRITON_DEVICE)
    z32 = z64.float().requires_grad_()
    h = mlp_pullback(triton_backend, spec32, z32, data_weight=w64.float())
    z64 = z64.requires_grad_()
    ref = pullback_brute_force(dec64, z64, w64)
    twin = mlp_pullback(BACKEND, spec32, z32, data_weight=w64.float())
    assert rel_err(h, ref) < RTOL[torch.float32] and rel_err(h, twin) < RTOL[torch.float32]
    assert rel_err(h, pullback_brute_force(dec64, z64)) > 1e-2
    assert_fp32_grads_close(h, ref, twin, (z32, dec32), (z64, dec64), seed=7)
