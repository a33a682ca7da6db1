"""Shared test vocabulary: devices, dtype tolerances, markers and small decoders."""

from __future__ import annotations

import copy
import os

import pytest
import torch

#: Relative tolerances by dtype for comparisons against float64 references.
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
#: Gradient tolerances (looser: gradients accumulate more rounding).
GRAD_RTOL = {torch.float64: 1e-8, torch.float32: 2e-3}

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
#: Where the Triton kernels run in this session: CPU tensors under the interpreter, else CUDA.
TRITON_DEVICE = "cpu" if INTERPRETER else "cuda"

#: Activations the fused MLP path supports, as module factories.
ACTIVATIONS = {
    "relu": torch.nn.ReLU,
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.1),
    "elu": lambda: torch.nn.ELU(0.7),
    "silu": torch.nn.SiLU,
    "softplus": lambda: torch.nn.Softplus(beta=2.0, threshold=3.0),
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "gelu": torch.nn.GELU,
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "identity": torch.nn.Identity,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels through TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def make_mlp(
    widths: list[int],
    act: str = "relu",
    out_act: str | None = "sigmoid",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.nn.Sequential:
    """An MLP decoder ``widths[0] -> ... -> widths[-1]`` with ``act`` between layers."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        last = i == len(widths) - 2
        name = out_act if last else act
        if name is not None:
            layers.append(ACTIVATIONS[name]())
    return torch.nn.Sequential(*layers).to(dtype)


class ConvDecoder(torch.nn.Module):
    """A small transposed-conv decoder ``(B, m) -> (B, 1, 8, 8)``: exercises the generic path."""

    def __init__(self, m: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(m, 8 * 2 * 2)
        self.deconv = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),
            torch.nn.Softplus(),
            torch.nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1),
            torch.nn.Sigmoid(),
        )
        self.to(dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(torch.tanh(self.fc(z)).view(-1, 8, 2, 2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the reference ``b``'s largest entry (compared in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_run_close(got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype, factor: float = 10) -> None:
    """``got[0]`` within ``RTOL[dtype] * factor`` of ``ref[0]`` (an op's value) and the rest (its
    gradients) within ``GRAD_RTOL[dtype] * factor``, by :func:`rel_err`."""
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= (RTOL if i == 0 else GRAD_RTOL)[dtype] * factor


def jacobian_brute_force(decoder: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians ``(B, D, m)`` by ``torch.autograd.functional.jacobian``, sample by sample."""
    rows = []
    for zb in z:
        j = torch.autograd.functional.jacobian(lambda x: decoder(x[None]).reshape(-1), zb, create_graph=True)
        rows.append(j)
    return torch.stack(rows)


def pullback_brute_force(
    decoder: torch.nn.Module, z: torch.Tensor, data_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``H = J^T J`` per sample ``(B, m, m)`` from the brute-force Jacobian (differentiable); with a
    ``data_weight`` ``w (D,)``, ``H = J^T diag(w) J``."""
    j = jacobian_brute_force(decoder, z)
    return j.transpose(1, 2) @ (j if data_weight is None else data_weight[:, None] * j)


def require_backend(name: str):
    """Backend ``name``, or skip the test where it cannot run here (fail instead when
    ``ISOFAST_REQUIRE_EXT`` is set: CI, where a missing or broken build is an error)."""
    from isofast import backends

    ok, why = backends.status(name)
    if not ok:
        if os.environ.get("ISOFAST_REQUIRE_EXT"):
            pytest.fail(f"ISOFAST_REQUIRE_EXT is set but the {name} backend is unavailable: {why}")
        pytest.skip(f"{name} backend unavailable: {why}")
    return backends.get(name)


@pytest.fixture
def cpu_ext():
    """The cpu backend (the C++ extension; see :func:`require_backend`)."""
    return require_backend("cpu")


@pytest.fixture
def triton_backend():
    """The triton backend where its kernels run here: on a CUDA device, or on CPU tensors under
    ``TRITON_INTERPRET=1`` (``python -m pytest -m interpreter``); else the test is skipped."""
    pytest.importorskip("triton")
    if not (INTERPRETER or HAS_CUDA):
        pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
    from isofast import backends

    return backends.get("triton")


def triton_case(act: str, widths: list[int], batch: int, k: int = 0, seed: int = 0, out_act: str | None = "sigmoid"):
    """``(dec64, dec32, z64, v64)`` on :data:`TRITON_DEVICE`: a float64 MLP and its float32 copy,
    codes ``(batch, m)`` and ``k`` probes ``(batch, k, m)`` in float64 (``v64`` is ``None`` for ``k = 0``)."""
    dec64 = make_mlp(widths, act=act, out_act=out_act, seed=seed).to(TRITON_DEVICE)
    dec32 = copy.deepcopy(dec64).float()
    g = torch.Generator().manual_seed(seed + 100)
    z64 = torch.randn(batch, widths[0], generator=g, dtype=torch.float64).to(TRITON_DEVICE)
    v64 = torch.randn(batch, k, widths[0], generator=g, dtype=torch.float64).to(TRITON_DEVICE) if k else None
    return dec64, dec32, z64, v64


def assert_fp32_grads_close(out: torch.Tensor, ref: torch.Tensor, twin: torch.Tensor, at32: tuple, at64: tuple,
                            seed: int) -> None:
    """Gradients of a float32 op's ``out`` (of the decoder ``dec32`` at ``z32``, ``at32 = (z32,
    dec32)``) within ``GRAD_RTOL[float32]`` of the float64 reference ``ref`` (``at64 = (z64, dec64)``)
    and of the float32 torch twin's ``twin``, for one seeded random cotangent."""
    (z32, dec32), (z64, dec64) = at32, at64
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device)
    got = grads(out, weight.float(), [z32, *dec32.parameters()])
    want = grads(ref, weight, [z64, *dec64.parameters()])
    want_twin = grads(twin, weight.float(), [z32, *dec32.parameters()])
    for g, w, t in zip(got, want, want_twin):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]
        assert rel_err(g, t) < GRAD_RTOL[torch.float32]


def value_and_grads(out: torch.Tensor, params: list[torch.Tensor | None], seed: int = 1) -> list[torch.Tensor]:
    """``[out, *gradients of sum(out * c)]`` for a seeded random cotangent ``c``, over the given
    ``params`` (``None`` entries, e.g. absent biases, skipped)."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return [out, *torch.autograd.grad((out * c).sum(), [p for p in params if p is not None])]


def opcheck_mlp(widths: list[int], dtype: torch.dtype):
    """The fused ops' custom-op arguments for a softplus MLP of ``widths`` whose second layer has no
    bias: ``(spec, weights, biases, has_bias, (codes, coefs, thresholds), generator)``."""
    from isofast.library import act_args
    from isofast.mlp import extract_mlp

    spec, _ = extract_mlp(make_mlp(widths, act="softplus", dtype=dtype, seed=3))
    weights = [w.detach() for w in spec.weights]
    biases = [None if i == 1 else (b.detach() if b is not None else None) for i, b in enumerate(spec.biases)]
    return spec, weights, biases, [b is not None for b in biases], act_args(spec.activations), \
        torch.Generator().manual_seed(0)


def grads(out: torch.Tensor, weight: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Gradients of ``sum(out * weight)`` with respect to ``params``."""
    return torch.autograd.grad((out * weight).sum(), params)


def stats_brute_force(
    dec: torch.nn.Module, z: torch.Tensor, probes: torch.Tensor, data_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Hutchinson statistics ``(B, K, 2)``: ``sum_d w_d (J v)_d^2`` and ``||J^T diag(w) J v||^2``
    from the brute-force Jacobian (``w = 1`` for ``data_weight=None``)."""
    j = jacobian_brute_force(dec, z)
    jv = torch.einsum("bdm,bkm->bkd", j, probes)
    wjv = jv if data_weight is None else data_weight * jv
    jtjv = torch.einsum("bdm,bkd->bkm", j, wjv)
    return torch.stack([(jv * wjv).sum(-1), jtjv.square().sum(-1)], dim=-1)


@pytest.fixture(params=["torch", "cpu"])
def data_metric_backend(request: pytest.FixtureRequest):
    """Each backend with a diagonal data-space metric (``data_weight``) that runs CPU float64
    tensors: the torch twin and the cpu extension (see :func:`require_backend`)."""
    backend = require_backend(request.param)
    assert backend.diagonal_data_metric, f"the {request.param} backend lacks the diagonal data-space metric"
    return backend


def positive_weight(d: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """A random ``(d,)`` data-space weight in ``[0.2, 3]`` (far from 1, strictly positive)."""
    gen = torch.Generator().manual_seed(seed)
    return (0.2 + 2.8 * torch.rand(d, generator=gen, dtype=torch.float64)).to(dtype)


def traces_brute_force(decoder: torch.nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached ``(H (B, m, m), Tr H (B,), Tr H^2 (B,))`` from the brute-force pullback metric."""
    h = pullback_brute_force(decoder, z).detach()
    return h, torch.diagonal(h, dim1=1, dim2=2).sum(-1), (h @ h).diagonal(dim1=1, dim2=2).sum(-1)


def gradcheck_over_params(op, spec, z: torch.Tensor, **tolerances) -> bool:
    """``torch.autograd.gradcheck`` of ``op(spec, z)`` over ``z`` and every parameter of the MLP
    ``spec`` (float64): ``op`` receives a copy of ``spec`` built from the checked parameters."""
    params = [p.detach().clone().requires_grad_() for p in spec.params()]

    def run(z: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return op(type(spec)(tuple(ps[0::2]), tuple(ps[1::2]), spec.activations), z)

    return torch.autograd.gradcheck(run, (z, *params), **tolerances)
