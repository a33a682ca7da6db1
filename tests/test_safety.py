"""Never silently wrong: what the fused path refuses to fuse, autocast, Jacobian scale, argument
validation, per-thread backend forcing and clear errors (issue 10, items 1 to 6)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import INTERPRETER, RTOL, make_mlp, rel_err
from torch import nn
from torch.nn.modules import module as nn_module
from torch.nn.utils import parametrize

import isofast
from isofast import backends

Z = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def small_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    return make_mlp([2, 32, 10], act="tanh", out_act=None, dtype=dtype, seed=seed)


def as_generic(decoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same decoder behind a lambda: the generic path, which calls the module itself."""
    return lambda z: decoder(z)


def loss_and_grads(decoder: Callable, params: list[torch.Tensor], z: torch.Tensor, **kw) -> tuple[torch.Tensor, ...]:
    loss = isofast.relaxed_distortion(decoder, z, eta=None, **kw)
    return (loss, *torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def assert_matches_generic(decoder: nn.Module, z: torch.Tensor = Z) -> None:
    """Whatever path ``decoder`` takes, its loss and gradients equal the module called as-is."""
    params = list(decoder.parameters())
    for got, want in zip(loss_and_grads(decoder, params, z), loss_and_grads(as_generic(decoder), params, z)):
        assert rel_err(got, want) < RTOL[torch.float64]


# --- 1. the fused path fuses only the plain computation --------------------------------------------
class ScaledInput(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, 3 * x)


class EqualisedLinear(nn.Linear):
    """An equalised-learning-rate layer: the weight is scaled at call time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, 0.5 * self.weight, self.bias)


class SteepTanh(nn.Tanh):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2 * x)


def _seq_subclass() -> nn.Module:
    return ScaledInput(*small_mlp())


def _linear_subclass() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(EqualisedLinear(2, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def _activation_subclass() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), SteepTanh(), nn.Linear(32, 10)).double()


def _forward_hook() -> nn.Module:
    dec = small_mlp()
    dec[1].register_forward_hook(lambda mod, args, out: 2 * out)
    return dec


def _forward_pre_hook() -> nn.Module:
    dec = small_mlp()
    dec[0].register_forward_pre_hook(lambda mod, args: (0.5 * args[0],))
    return dec


def _outer_hook() -> nn.Module:
    dec = small_mlp()
    dec.register_forward_hook(lambda mod, args, out: out.square())
    return dec


def _instance_forward() -> nn.Module:
    dec = small_mlp()
    lin = dec[2]
    lin.forward = lambda x: nn.functional.linear(x, 2 * lin.weight, lin.bias)
    return dec


def _spectral_norm() -> nn.Module:
    dec = small_mlp()
    dec[0] = nn.utils.spectral_norm(dec[0])
    return dec.eval()  # eval: the generic path's calls do not advance the power iteration


@pytest.mark.parametrize(
    "build, why",
    [
        (_seq_subclass, "subclass of nn.Sequential"),
        (_linear_subclass, "EqualisedLinear"),
        (_activation_subclass, "SteepTanh"),
        (_forward_hook, "forward hook"),
        (_forward_pre_hook, "forward pre-hook"),
        (_outer_hook, "forward hook"),
        (_instance_forward, "instance-level forward"),
        (_spectral_norm, "spectral_norm"),
    ],
    ids=["sequential-subclass", "linear-subclass", "activation-subclass", "forward-hook", "pre-hook",
         "hook-on-the-sequential", "instance-forward", "hook-spectral-norm"],
)
def test_decoders_with_code_the_fused_path_would_skip_go_generic(build: Callable[[], nn.Module], why: str) -> None:
    dec = build()
    p = isofast.plan(dec, Z)
    assert p.path == "generic" and why in p.reasons["path"]
    assert_matches_generic(dec)


def test_issue_one_liner_sequential_subclass_equals_lambda() -> None:
    class D(nn.Sequential):
        forward = lambda s, x: nn.Sequential.forward(s, 3 * x)  # noqa: E731

    torch.manual_seed(0)
    dec = D(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    fused = isofast.relaxed_distortion(dec, Z, eta=None).item()
    assert fused == pytest.approx(isofast.relaxed_distortion(lambda z: dec(z), Z, eta=None).item(), rel=1e-12)


@contextmanager
def global_hook(kind: str) -> Iterator[None]:
    register = {"forward": nn_module.register_module_forward_hook,
                "pre": nn_module.register_module_forward_pre_hook}[kind]
    hook = (lambda mod, args, out: out) if kind == "forward" else (lambda mod, args: None)
    handle = register(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_global_module_hooks_block_fusion(kind: str) -> None:
    dec = small_mlp()
    with global_hook(kind):
        p = isofast.plan(dec, Z)
        assert p.path == "generic" and "global module" in p.reasons["path"]
        assert_matches_generic(dec)
    assert isofast.plan(dec, Z).path == "fused_mlp"


class Triple(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 3 * w


def test_parametrized_linear_is_fused_and_evaluated_as_the_module_would() -> None:
    """A guard for exact-type matching: parametrize's derived class still fuses, and reading the
    weight runs the parametrization (so the loss and the gradient into ``original`` are right)."""
    dec = make_mlp([2, 32, 16, 10], act="tanh", out_act=None)
    parametrize.register_parametrization(dec[0], "weight", Triple())
    nn.utils.parametrizations.weight_norm(dec[2])
    nn.utils.parametrizations.spectral_norm(dec[4])
    dec.eval()  # eval: reading the spectral-normed weight does not advance its power iteration
    p = isofast.plan(dec, Z)
    assert p.path == "fused_mlp"
    assert_matches_generic(dec)


def test_isofast_sequential_opt_in_still_fuses_unless_hooked() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_mlp()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z)

        def isofast_sequential(self) -> nn.Sequential:
            return self.net

    dec = Wrapper()
    assert isofast.plan(dec, Z).path == "fused_mlp"
    assert_matches_generic(dec)
    dec.register_forward_hook(lambda mod, args, out: 2 * out)
    assert isofast.plan(dec, Z).path == "generic"
    assert_matches_generic(dec)


def test_trailing_reshape_of_the_batch_dimension_is_not_fused() -> None:
    dec = nn.Sequential(*small_mlp(), nn.Flatten(0))
    p = isofast.plan(dec, Z)
    assert p.path == "generic" and "batch dimension" in p.reasons["path"]


# --- 2. autocast -----------------------------------------------------------------------------------
def test_autocast_cpu_bf16_runs_the_default_backend_in_fp32_and_says_so() -> None:
    dec = small_mlp(torch.float32)
    z = Z.float()
    want = isofast.relaxed_distortion(dec, z, eta=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = isofast.plan(dec, z)
        loss = isofast.relaxed_distortion(dec, z, eta=None)
        hutch = isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", generator=torch.Generator().manual_seed(1))
        (loss + hutch).backward()  # backward inside the autocast block too
    assert p.path == "fused_mlp" and loss.dtype == torch.float32 and hutch.dtype == torch.float32
    if p.backend == "cpu":
        assert p.precision == "float32 GEMMs, float32 accumulation"
        assert "autocast asks for bfloat16" in p.reasons["precision"]
    assert rel_err(loss, want) < 0.02
    assert dec[0].weight.grad.dtype == torch.float32 and torch.isfinite(dec[0].weight.grad).all()


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_autocast_bf16_gemms_on_the_torch_twin_accumulate_in_fp32(estimator: str) -> None:
    ref = small_mlp()
    dec = small_mlp(torch.float32)
    probes = torch.randn(6, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = {} if estimator == "exact" else {"probes": probes}
    want = isofast.relaxed_distortion(ref, Z, eta=None, **kw)
    kw = {} if estimator == "exact" else {"probes": probes.float()}
    with backends.use("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        p = isofast.plan(dec, Z.float(), **kw)
        loss = isofast.relaxed_distortion(dec, Z.float(), eta=None, **kw)
        h = isofast.pullback_metric(dec, Z.float())
    assert p.precision == "bfloat16 GEMMs (autocast), float32 accumulation"
    assert loss.dtype == torch.float32 and h.dtype == torch.float32
    assert rel_err(loss, want) < 0.05
    loss.backward()
    assert dec[0].weight.grad.dtype == torch.float32


def test_compiled_step_under_autocast_traces_and_matches_eager() -> None:
    torch._dynamo.reset()
    dec = make_mlp([2, 16, 6], act="softplus", out_act=None, dtype=torch.float32, seed=3)

    def step(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return isofast.relaxed_distortion(dec, z, eta=None)

    z = Z.float()
    eager = step(z)  # one eager call picks the backend first (README: torch.compile)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(z)
    assert compiled.dtype == torch.float32 and rel_err(compiled, eager) < 1e-5
    compiled.backward()


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 (Triton kernels on CPU tensors)")
def test_autocast_bf16_gemms_on_the_triton_kernels() -> None:
    ref, dec = small_mlp(), small_mlp(torch.float32)
    probes = torch.randn(6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = [isofast.relaxed_distortion(ref, Z, eta=None, **kw) for kw in ({}, {"probes": probes})]
    with backends.use("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert isofast.plan(dec, Z.float()).precision == "bfloat16 GEMMs (autocast), float32 accumulation"
        got = [isofast.relaxed_distortion(dec, Z.float(), eta=None, **kw) for kw in ({}, {"probes": probes.float()})]
        sum(got).backward()
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) < 0.05
    assert dec[0].weight.grad.dtype == torch.float32


def test_plan_reports_precision_on_both_paths() -> None:
    assert isofast.plan(small_mlp(), Z).precision == "float64 GEMMs, float64 accumulation"
    z = Z.float()
    assert isofast.plan(lambda x: x.repeat(1, 2), z).precision == "float32 GEMMs, float32 accumulation"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = isofast.plan(lambda x: x.repeat(1, 2), z)
    assert p.precision == "autocast bfloat16 GEMMs, float32 accumulation" and "precision=" in str(p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_autocast_cuda_runs_the_fused_path_with_fp32_loss(dtype: torch.dtype, estimator: str) -> None:
    ref = small_mlp()
    dec = small_mlp(torch.float32).cuda()
    z = Z.float().cuda()
    probes = torch.randn(6, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = isofast.relaxed_distortion(ref, Z, eta=None, **({} if estimator == "exact" else {"probes": probes}))
    kw = {} if estimator == "exact" else {"probes": probes.float().cuda()}
    with torch.autocast("cuda", dtype=dtype):
        p = isofast.plan(dec, z, **kw)
        loss = isofast.relaxed_distortion(dec, z, eta=None, **kw)
    assert p.path == "fused_mlp" and loss.dtype == torch.float32
    assert p.precision in (f"{str(dtype)[6:]} GEMMs (autocast), float32 accumulation", "float32 GEMMs, float32 accumulation")
    assert rel_err(loss.cpu(), want) < 0.05
    loss.backward()
    assert torch.isfinite(dec[0].weight.grad).all()


# --- 3. scale --------------------------------------------------------------------------------------
def scaled_mlp(s: float, dtype: torch.dtype) -> nn.Sequential:
    """``small_mlp`` with its output (and so its Jacobian) multiplied by ``s``."""
    dec = small_mlp(torch.float64, seed=3)
    with torch.no_grad():
        dec[2].weight.mul_(s)
        dec[2].bias.mul_(s)
    return dec.to(dtype)


SCALE_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.08}


@pytest.mark.parametrize("s", [1e-15, 1e-11, 1e10, 1e15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("measure", ["scaled_isometry", "conformal"])
def test_ratio_measures_are_right_at_any_jacobian_scale(s: float, dtype: torch.dtype, estimator: str, measure: str) -> None:
    ref, dec = scaled_mlp(s, torch.float64), scaled_mlp(s, dtype)
    probes = torch.randn(6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for d, z, pr in ((ref, Z, probes), (dec, Z.to(dtype), probes.to(dtype))):
        kw = {"estimator": "exact"} if estimator == "exact" else {"probes": pr}
        value = isofast.distortion(d, z, measure, eta=None, **kw)
        grads = torch.autograd.grad(value, [d[0].weight, d[2].weight])
        results.append((value, *grads))
    for got, want in zip(*reversed(results)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < SCALE_TOL[dtype]


@pytest.mark.parametrize("measure, s", [("isometry", 1e10), ("jacobian_frobenius", 1e20), ("scaled_isometry", 1e20)])
def test_measures_raise_where_not_representable(measure: str, s: float) -> None:
    with pytest.raises(ValueError, match=f"measure '{measure}' is not representable in torch.float32"):
        isofast.distortion(scaled_mlp(s, torch.float32), Z.float(), measure, eta=None, estimator="exact")


def test_hutchinson_raises_where_jacobian_overflows() -> None:
    with pytest.raises(ValueError, match="not finite"):
        isofast.relaxed_distortion(scaled_mlp(1e25, torch.float32), Z.float(), eta=None, estimator="hutchinson")


# --- 4. arguments ----------------------------------------------------------------------------------
DEC = small_mlp()


@pytest.mark.parametrize("eta", [float("inf"), 1e308, float("nan"), 1000.5, -1.0])
def test_eta_must_be_finite_and_bounded(eta: float) -> None:
    with pytest.raises(ValueError, match=r"eta must be None or a real number in \[0, 1000\]"):
        isofast.relaxed_distortion(DEC, Z, eta=eta)
    with pytest.raises(ValueError, match="eta"):
        isofast.mixup(Z, eta)


def test_eta_accepts_every_real_number_type_alike() -> None:
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    for eta in (np.float32(0.25), np.float64(0.25), np.float16(0.25), np.int64(0), np.int32(1), 0.25, 1):
        want = isofast.relaxed_distortion(DEC, Z, eta=float(eta), generator=gen())
        assert torch.equal(isofast.relaxed_distortion(DEC, Z, eta=eta, generator=gen()), want)  # type: ignore[arg-type]
        assert torch.equal(isofast.mixup(Z, eta, generator=gen()), isofast.mixup(Z, float(eta), generator=gen()))  # type: ignore[arg-type]
        assert isofast.IsometricRegularizer(eta=eta).eta == float(eta)  # type: ignore[arg-type]


def test_eta_of_a_non_number_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="eta must be None or a real number"):
        isofast.relaxed_distortion(DEC, Z, eta="0.2")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_probes_must_be_finite(bad: float) -> None:
    probes = torch.randn(6, 2, 2, dtype=torch.float64)
    probes[3, 1, 0] = bad
    with pytest.raises(ValueError, match="probes must be finite"):
        isofast.relaxed_distortion(DEC, Z, probes=probes)


def test_n_probes_with_the_exact_estimator_is_refused_and_auto_says_it_is_unused() -> None:
    with pytest.raises(ValueError, match="n_probes is only used by estimator='forward' or 'hutchinson'"):
        isofast.relaxed_distortion(DEC, Z, estimator="exact", n_probes=4)
    p = isofast.plan(DEC, Z, n_probes=4)
    assert p.estimator == "exact" and "n_probes=4 is unused" in p.reasons["estimator"]


# --- 5. backends.use and precision are per thread --------------------------------------------------
def test_use_and_precision_blocks_in_two_threads_do_not_interfere() -> None:
    entered, other_done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def forcing() -> None:
        with backends.use("torch"), backends.precision("bf16"):
            entered.set()
            other_done.wait(10)
            seen["forcing"] = (backends.forced(), backends.current_precision())

    def plain() -> None:
        entered.wait(10)
        seen["plain"] = (backends.forced(), backends.current_precision(), isofast.plan(DEC, Z).reasons["backend"])
        with backends.use("torch"):
            pass  # leaving this block must not pop the other thread's setting
        other_done.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["forcing"] == ("torch", "bf16")
    forced, prec, why = seen["plain"]  # type: ignore[misc]
    assert forced is None and prec == "fp32" and "forced" not in why
    assert backends.forced() is None and backends.current_precision() == "fp32"


def test_compiled_step_traces_with_a_use_block_held_by_another_thread() -> None:
    torch._dynamo.reset()
    dec = small_mlp(torch.float32)
    z = Z.float()
    step = torch.compile(lambda x: isofast.relaxed_distortion(dec, x, eta=None), backend="eager", fullgraph=True)
    want = isofast.relaxed_distortion(dec, z, eta=None).item()
    entered, release = threading.Event(), threading.Event()
    out: list[float] = []

    def forcing() -> None:
        with backends.use("torch"):
            entered.set()
            release.wait(60)
            out.append(step(z).item())  # retraced for this thread's setting

    t = threading.Thread(target=forcing)
    t.start()
    entered.wait(60)
    try:
        assert backends.forced() is None
        out.append(step(z).item())
    finally:
        release.set()
        t.join(60)
    assert out == pytest.approx([want, want], rel=1e-5)


# --- 6. clear errors -------------------------------------------------------------------------------
def test_z_on_the_meta_device_is_refused() -> None:
    with pytest.raises(ValueError, match="meta device"):
        isofast.relaxed_distortion(DEC, torch.empty(4, 2, dtype=torch.float64, device="meta"))


@pytest.mark.parametrize("layer, what", [(0, "weight"), (2, "weight"), (2, "bias")])
def test_fused_decoder_of_mixed_dtype_names_the_layer(layer: int, what: str) -> None:
    dec = small_mlp()
    getattr(dec[layer], what).data = getattr(dec[layer], what).data.float()
    with pytest.raises(TypeError, match=f"layer {layer // 2} {what} is torch.float32"):
        isofast.relaxed_distortion(dec, Z)


def test_fused_decoder_of_another_dtype_than_z_under_autocast() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="autocast mixes only"):
        isofast.relaxed_distortion(small_mlp(), Z.float())
