"""The ``"cpu"`` backend (C++ extension) against the torch twin, brute force, gradcheck and the
official IRVAE estimator.

Skipped when the extension is not built, unless ``ISOFAST_REQUIRE_EXT`` is set (CI): then a
missing or broken build FAILS these tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ACTIVATIONS, GRAD_RTOL, RTOL, make_mlp, positive_weight, pullback_brute_force, require_backend,
)

import isofast
from isofast import _ext, backends
from isofast.backends import torch_backend
from isofast.baselines import official_relaxed_distortion
from isofast.mlp import extract_mlp
from isofast.ops import mlp_hutchinson, mlp_pullback


@pytest.fixture(autouse=True)
def cpu_ext():
    return require_backend("cpu")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = b.abs().max().clamp_min(1e-30)
    err = ((a - b).abs().max() / scale).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def _run(backend, spec, z, probes, seed=1, data_weight=None):
    """Values and gradients (z and every parameter) of both ops for random output cotangents."""
    gen = torch.Generator().manual_seed(seed)
    params = [z] + [p for p in spec.params() if p is not None]
    h = mlp_pullback(backend, spec, z, data_weight=data_weight)
    gh = torch.randn(h.shape, generator=gen, dtype=h.dtype)
    st = mlp_hutchinson(backend, spec, z, probes, data_weight=data_weight)
    gs = torch.randn(st.shape, generator=gen, dtype=st.dtype)
    return [h, *torch.autograd.grad((h * gh).sum(), params), st, *torch.autograd.grad((st * gs).sum(), params)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9], [2, 16, 16, 12]])
def test_matches_torch_twin(cpu_ext, act, dtype, widths):
    dec = make_mlp(widths, act=act, out_act="sigmoid" if act != "identity" else None, dtype=dtype, seed=3)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(0)
    z = torch.randn(5, widths[0], dtype=dtype, requires_grad=True)
    probes = torch.randn(5, 3, widths[0], dtype=dtype)
    ref = _run(torch_backend.BACKEND, spec, z, probes)
    got = _run(cpu_ext, spec, z, probes)
    n = len(ref) // 2
    for i, (a, b) in enumerate(zip(got, ref)):
        _close(a, b, (RTOL if i in (0, n) else GRAD_RTOL)[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "softplus", "gelu", "identity"])
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9], [2, 16, 16, 12]])
def test_data_weight_matches_torch_twin(cpu_ext, act, dtype, widths):
    """The diagonal data-space metric ``J^T diag(w) J`` (both ops, values and gradients), a
    bias-free first layer included."""
    dec = make_mlp(widths, act=act, out_act="sigmoid" if act != "identity" else None, dtype=dtype, seed=4)
    dec[0].bias = None
    spec, _ = extract_mlp(dec)
    torch.manual_seed(1)
    z = torch.randn(5, widths[0], dtype=dtype, requires_grad=True)
    probes = torch.randn(5, 3, widths[0], dtype=dtype)
    w = positive_weight(widths[-1], dtype=dtype, seed=2)
    ref = _run(torch_backend.BACKEND, spec, z, probes, data_weight=w)
    got = _run(cpu_ext, spec, z, probes, data_weight=w)
    n = len(ref) // 2
    for i, (a, b) in enumerate(zip(got, ref)):
        _close(a, b, (RTOL if i in (0, n) else GRAD_RTOL)[dtype] * 10)
    unweighted = _run(cpu_ext, spec, z, probes)
    assert (got[0] - unweighted[0]).abs().max() > 1e-3 * unweighted[0].abs().max()


def test_data_weight_bad_inputs_raise_from_cpp(cpu_ext):
    ext = _ext.get()
    w = [torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    acts = ([1, 7], [0.0, 0.0], [0.0, 0.0])
    z = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"data_weight must have shape \(3,\)"):
        ext.mlp_pullback_forward(z, w, [None, None], *acts, torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="data_weight has dtype"):
        ext.mlp_hutchinson_forward(z, torch.randn(5, 1, 2, dtype=torch.float64), w, [None, None], *acts,
                                   torch.ones(3))


def test_no_bias_and_single_layer(cpu_ext):
    dec = torch.nn.Sequential(torch.nn.Linear(3, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    single = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Softplus()).double()
    for d in (dec, single):
        spec, _ = extract_mlp(d)
        z = torch.randn(4, spec.in_features, dtype=torch.float64, requires_grad=True)
        probes = torch.randn(4, 2, spec.in_features, dtype=torch.float64)
        for a, b in zip(_run(cpu_ext, spec, z, probes), _run(torch_backend.BACKEND, spec, z, probes)):
            _close(a, b, 1e-10)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gradcheck(cpu_ext, act):
    dec = make_mlp([2, 4, 3], act=act, out_act=act, dtype=torch.float64, seed=1)
    spec, _ = extract_mlp(dec)
    torch.manual_seed(1)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(3, 2, 2, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in spec.params()]

    def pull(z, *ps):
        s = type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations)
        return mlp_pullback(cpu_ext, s, z)

    def hutch(z, *ps):
        s = type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations)
        return mlp_hutchinson(cpu_ext, s, z, probes)

    # ReLU-like kinks: keep the finite-difference step small against distances to the kink.
    assert torch.autograd.gradcheck(pull, (z, *params), eps=1e-7, atol=1e-6)
    assert torch.autograd.gradcheck(hutch, (z, *params), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_brute_force(cpu_ext, act):
    dec = make_mlp([2, 8, 8, 5], act=act, out_act="sigmoid", dtype=torch.float64, seed=2)
    spec, _ = extract_mlp(dec)
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    h_ref = pullback_brute_force(dec, z)
    h = mlp_pullback(cpu_ext, spec, z)
    _close(h, h_ref, 1e-10)
    w = torch.randn_like(h)
    params = [z, *dec.parameters()]
    for a, b in zip(torch.autograd.grad((h * w).sum(), params), torch.autograd.grad((h_ref * w).sum(), params)):
        _close(a, b, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_official_estimator(cpu_ext, dtype):
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
    _close(got, ref, RTOL[dtype] * 10)
    for a, b in zip(g, g_ref):
        _close(a, b, GRAD_RTOL[dtype] * 10)


@pytest.mark.parametrize("measure", list(isofast.MEASURES))
def test_measures_match_twin(cpu_ext, measure):
    dec = make_mlp([3, 10, 10, 8], act="silu", out_act=None, dtype=torch.float64, seed=5)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    vals = []
    for name in ("torch", "cpu"):
        with backends.use(name):
            val = isofast.distortion(dec, z, measure, eta=None, estimator="exact")
        vals.append([val, *torch.autograd.grad(val, [z, *dec.parameters()])])
    for a, b in zip(*vals):
        _close(a, b, 1e-8)


def test_auto_selects_cpu_backend(cpu_ext):
    dec = make_mlp([2, 4, 3], dtype=torch.float32)
    p = isofast.plan(dec, torch.randn(3, 2))
    assert p.backend == "cpu", str(p)


def test_bad_inputs_raise_from_cpp(cpu_ext):
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
    with pytest.raises(RuntimeError, match="probes must have shape"):
        ext.mlp_hutchinson_forward(z, torch.randn(5, 2, dtype=torch.float64), w, b, *acts)
    with pytest.raises(RuntimeError, match="grad_h must have shape"):
        _, saved = ext.mlp_pullback_forward(z, w, b, *acts)
        ext.mlp_pullback_backward(torch.ones(5, 3, 3, dtype=torch.float64), w, [False, False], *acts, saved)
    # Non-contiguous inputs are handled (made contiguous), not rejected.
    zt = torch.randn(2, 5, dtype=torch.float64).t()
    h1, _ = ext.mlp_pullback_forward(zt, [w[0].t().contiguous().t(), w[1]], b, *acts)
    h2, _ = ext.mlp_pullback_forward(zt.contiguous(), w, b, *acts)
    torch.testing.assert_close(h1, h2)


def test_supports_cpu_only(cpu_ext):
    assert cpu_ext.supports(torch.device("cpu"))[0]
    ok, why = cpu_ext.supports(torch.device("cuda"))
    assert not ok and "CPU tensors only" in why


def test_mismatched_build_is_refused(cpu_ext, monkeypatch):
    module, _ = _ext.load()
    info = dict(module.build_info())
    msg = _ext.check_build_info(info, {"torch_version": "9.9.9", "cuda_version": "none"})
    assert "9.9.9" in msg and info["torch_version"] in msg
    assert _ext.check_build_info({**info, "abi_version": -1})
    cuda_info = {**info, "cuda": True, "cuda_version": "12.1"}
    msg = _ext.check_build_info(cuda_info, {"torch_version": info["torch_version"], "cuda_version": "12.8"})
    assert "12.1" in msg and "12.8" in msg
    # availability() refuses it with that message.
    monkeypatch.setattr(_ext, "expected_info", lambda: {"torch_version": "9.9.9", "cuda_version": "none"})
    _ext.reset()
    backends.refresh()
    try:
        ok, why = backends.status("cpu")
        assert not ok and "9.9.9" in why and info["torch_version"] in why
    finally:
        monkeypatch.undo()
        _ext.reset()
        backends.refresh()
    assert backends.status("cpu")[0]


def test_no_ext_env_disables(cpu_ext, monkeypatch):
    monkeypatch.setenv("ISOFAST_NO_EXT", "1")
    _ext.reset()
    backends.refresh()
    try:
        ok, why = backends.status("cpu")
        assert not ok and "ISOFAST_NO_EXT" in why
    finally:
        monkeypatch.delenv("ISOFAST_NO_EXT")
        _ext.reset()
        backends.refresh()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("widths", [[3, 7, 5, 6], [2, 9]])
def test_custom_ops_opcheck(cpu_ext, dtype, widths):
    """The ``isofast::mlp_*`` custom ops' CPU kernels (what torch.compile traces) pass
    torch.library.opcheck: schema, fake (shape-only) implementations, and tracing; a bias-free
    layer included."""
    from isofast.library import act_args

    dec = make_mlp(widths, act="softplus", dtype=dtype, seed=3)
    spec, _ = extract_mlp(dec)
    gen = torch.Generator().manual_seed(0)
    weights = [w.detach() for w in spec.weights]
    biases = [None if i == 1 else (b.detach() if b is not None else None) for i, b in enumerate(spec.biases)]
    has_bias = [b is not None for b in biases]
    acts = act_args(spec.activations)
    z = torch.randn(4, widths[0], generator=gen, dtype=dtype)
    probes = torch.randn(4, 3, widths[0], generator=gen, dtype=dtype)
    ops = torch.ops.isofast

    torch.library.opcheck(ops.mlp_pullback_forward, (z, weights, biases, *acts))
    h, saved = cpu_ext.mlp_pullback_forward(z, weights, biases, spec.activations)
    grad_h = torch.randn(h.shape, generator=gen, dtype=dtype)
    torch.library.opcheck(ops.mlp_pullback_backward, (grad_h, weights, has_bias, *acts, list(saved)))

    torch.library.opcheck(ops.mlp_hutchinson_forward, (z, probes, weights, biases, *acts))
    st, saved = cpu_ext.mlp_hutchinson_forward(z, probes, weights, biases, spec.activations)
    grad_st = torch.randn(st.shape, generator=gen, dtype=dtype)
    torch.library.opcheck(ops.mlp_hutchinson_backward, (grad_st, weights, has_bias, *acts, list(saved)))

    # With the diagonal data-space metric (an optional last input of all four ops).
    dw = 0.5 + torch.rand(widths[-1], generator=gen, dtype=dtype)
    torch.library.opcheck(ops.mlp_pullback_forward, (z, weights, biases, *acts, dw))
    h, saved = cpu_ext.mlp_pullback_forward(z, weights, biases, spec.activations, dw)
    torch.library.opcheck(ops.mlp_pullback_backward, (grad_h, weights, has_bias, *acts, list(saved), dw))
    torch.library.opcheck(ops.mlp_hutchinson_forward, (z, probes, weights, biases, *acts, dw))
    st, saved = cpu_ext.mlp_hutchinson_forward(z, probes, weights, biases, spec.activations, dw)
    torch.library.opcheck(ops.mlp_hutchinson_backward, (grad_st, weights, has_bias, *acts, list(saved), dw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_custom_ops_opcheck(cpu_ext, dtype):
    """The spectral ops ``isofast::eigvalsh``, ``logdet``, ``condition_numbers`` and
    ``airm_sq_to_mean`` pass torch.library.opcheck on their CPU kernels."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, 4, generator=gen, dtype=dtype)
    H = a @ a.transpose(1, 2) + torch.eye(4, dtype=dtype)
    ops = torch.ops.isofast
    for op in (ops.eigvalsh, ops.condition_numbers, ops.airm_sq_to_mean):
        torch.library.opcheck(op, (H,))
    for with_grad in (True, False):
        torch.library.opcheck(ops.logdet, (H, with_grad))
