"""The dispatch table (isofast/dispatch.py): one entry per backend and op, explicit fallbacks and
no inherited implementations, the custom ops isofast::<op>, and what plan reports."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp
from torch import nn

import isofast
from isofast import backends, dispatch, library
from isofast.backends.base import Backend


def _methods(op: str) -> tuple[str, ...]:
    return (f"{op}_forward", f"{op}_backward") if op in dispatch.MLP_OPS else (op,)


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_every_op_has_an_entry_and_natives_are_own_methods(name: str) -> None:
    """A Native entry is a method the backend's class defines itself; a Fallback's backend has no
    such method of its own, and every fallback chain reaches a native implementation, torch last."""
    assert set(dispatch.TABLE[name]) == set(dispatch.OPS)
    backend = backends.get(name)
    assert backend is not None
    own = type(backend).__dict__
    assert type(backend).__bases__ == (Backend,), "backends do not inherit one another's ops"
    for op, entry in dispatch.TABLE[name].items():
        if isinstance(entry, dispatch.Native):
            assert all(m in own for m in _methods(op)), f"{name} declares {op} native but lacks its method"
        else:
            assert not any(m in own for m in _methods(op)), f"{name} implements {op} but declares a fallback"
            assert entry.to[-1] == "torch" and name not in entry.to
            assert all(isinstance(dispatch.TABLE[t][op], dispatch.Native) for t in entry.to)


def test_cuda_hutchinson_is_the_declared_torch_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda backend has no Hutchinson kernels: resolving its mlp_hutchinson gives the torch
    twin and says so; its mlp_pullback is its own."""
    cuda = backends.get("cuda")
    device = torch.device("cuda")
    choice = dispatch.resolve("mlp_hutchinson", cuda, device, torch.float32)
    assert choice.impl is backends.get("torch")
    assert str(choice) == ("mlp_hutchinson: torch (PyTorch twin, declared fallback of cuda: no CUDA Hutchinson "
                           "kernels: the torch twin on CUDA tensors)")
    assert dispatch.resolve("mlp_pullback", cuda, device, torch.float32).impl is cuda


def test_custom_ops_have_cpu_and_cuda_kernels_under_one_name() -> None:
    """Every compiled op is one isofast::<op> with a kernel per device it runs on and a fake."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for name, kernels in library._KERNELS.items():
        qualname = f"isofast::{name}"
        assert getattr(torch.ops.isofast, name) is not None
        for key in ("CPU", "CUDA"):
            assert has_kernel(qualname, key) == (key.lower() in kernels), (qualname, key)
        assert has_kernel(qualname, "Meta"), f"{qualname} has no fake implementation"
    assert set(library._KERNELS) == {
        "mlp_pullback_forward", "mlp_pullback_backward", "mlp_hutchinson_forward", "mlp_hutchinson_backward",
        "tangent_gram", "tangent_sqnorm", "eigvalsh", "logdet", "condition_numbers", "airm_sq_to_mean",
    }


def test_tangent_fakes_give_the_shapes() -> None:
    """The CUDA-only reductions' fake implementations (what torch.compile traces), on meta tensors."""
    x = torch.empty(4, 3, 7, device="meta")
    assert torch.ops.isofast.tangent_gram(x).shape == (4, 3, 3)
    assert torch.ops.isofast.tangent_sqnorm(x).shape == (4, 3)


def _ops(decoder: object, z: torch.Tensor, **kw: object) -> str:
    with backends.use("torch"):
        return isofast.plan(decoder, z, **kw).reasons["ops"]


def test_plan_reports_every_op_it_runs() -> None:
    dec = make_mlp([2, 6, 5], act="tanh", seed=1)
    z = torch.randn(4, 2, dtype=torch.float64)
    assert _ops(dec, z) == "mlp_pullback: torch (PyTorch twin)"
    assert _ops(dec, z, estimator="hutchinson") == "mlp_hutchinson: torch (PyTorch twin)"
    assert _ops(dec, z, measure="volume") == "mlp_pullback: torch (PyTorch twin); logdet: torch (torch.linalg)"
    plain = lambda v: torch.tanh(v @ torch.ones(2, 5, dtype=v.dtype))  # noqa: E731 - a plain callable: generic path
    assert _ops(plain, z) == "tangent_gram: torch (PyTorch)"
    assert _ops(plain, z, estimator="hutchinson", n_probes=1) == "tangent_sqnorm: torch (PyTorch)"
    assert _ops(plain, z, data_metric=lambda x, w: 2 * w) == "none of the registered ops"  # Grams a (G a)^T
    assert _ops(plain, z, measure="path_length") == "none of the registered ops"
    assert _ops(plain, z, measure="path_length", estimator="hutchinson") == "tangent_sqnorm: torch (PyTorch)"
    conv = nn.Sequential(nn.Linear(2, 12), nn.Unflatten(1, (3, 4)), nn.Conv1d(3, 2, 3)).double()
    p = isofast.plan(conv, z)
    assert p.path == "fused_sequential" and p.reasons["ops"].startswith("tangent_gram: ")


def test_plan_reports_the_cpu_backend(cpu_ext) -> None:  # noqa: ANN001
    dec = make_mlp([2, 6, 5], act="tanh", seed=1)
    z = torch.randn(4, 2, dtype=torch.float64)
    assert isofast.plan(dec, z, measure="volume").reasons["ops"] == (
        "mlp_pullback: cpu (C++ extension); logdet: cpu (C++ extension; torch.linalg for m > 32 or a gradient)")
    plain = lambda v: torch.tanh(v @ torch.ones(2, 5, dtype=v.dtype))  # noqa: E731
    assert isofast.plan(plain, z).reasons["ops"] == (
        "tangent_gram: torch (PyTorch, declared fallback of cpu: no CPU reduction kernel: one batched GEMM is the "
        "reduction)")


def test_auto_selects_cpu_backend(cpu_ext) -> None:  # noqa: ANN001
    dec = make_mlp([2, 4, 3], dtype=torch.float32)
    p = isofast.plan(dec, torch.randn(3, 2))
    assert p.backend == "cpu", str(p)


def test_cpu_backend_supports_cpu_tensors_only(cpu_ext) -> None:  # noqa: ANN001
    assert cpu_ext.supports(torch.device("cpu"))[0]
    ok, why = cpu_ext.supports(torch.device("cuda"))
    assert not ok and "CPU tensors only" in why
