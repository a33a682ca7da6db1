"""CUDA sources: compile every .cu for sm_90 with nvcc (no GPU needed), and on a GPU, check the
cuda backend against the torch twin and the CPU kernels."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_mlp

from isofast import _ext, backends
from isofast.backends import cuda_backend, torch_backend
from isofast.mlp import extract_mlp
from isofast.ops import mlp_pullback


def test_compile_check_every_cu_source():
    results = cuda_backend.BACKEND.compile_check()
    names = {r.kernel for r in results}
    assert names == {os.path.basename(s) for s in _ext.CUDA_SOURCES}
    if cuda_backend.find_nvcc() is None:
        assert all(r.ok and r.message.startswith("skipped") for r in results)
        pytest.skip("nvcc not found")
    for r in results:
        assert r.ok, f"{r.kernel}: {r.message}"
        # ptxas -v: every source defines kernels, each with its registers and spill counts
        assert r.stats and all(s["registers"] > 0 and s["spill_stores"] is not None for s in r.stats), r.stats
        assert all(s["backend"] == "cuda" and s["kernel"] == r.kernel for s in r.stats)


def test_compile_check_reports_failures(tmp_path, monkeypatch):
    if cuda_backend.find_nvcc() is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "cuda"
    bad.mkdir()
    for s in _ext.CUDA_SOURCES:
        (tmp_path / s).write_text("this is not C++;\n")
    monkeypatch.setattr(_ext, "CSRC", tmp_path)
    results = cuda_backend.BACKEND.compile_check()
    assert results and not any(r.ok for r in results)


def test_cuda_availability_is_honest():
    ok, why = backends.status("cuda")
    if not torch.cuda.is_available():
        assert not ok and why


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["relu", "tanh", "softplus"])
def test_cuda_backend_matches_twin(act):
    ok, why = backends.status("cuda")
    if not ok:
        if os.environ.get("ISOFAST_REQUIRE_EXT"):
            pytest.fail(f"cuda backend unavailable: {why}")
        pytest.skip(why)
    dec = make_mlp([3, 16, 16, 10], act=act, out_act="sigmoid", dtype=torch.float64).cuda()
    spec, _ = extract_mlp(dec)
    z = torch.randn(7, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    outs = []
    for backend in (torch_backend.BACKEND, cuda_backend.BACKEND):
        h = mlp_pullback(backend, spec, z)
        outs.append([h, *torch.autograd.grad(h.square().sum(), [z, *dec.parameters()])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
def test_cuda_spectral_and_reductions_match_cpu():
    module, why = _ext.load()
    if module is None or not hasattr(module, "cuda_eigvalsh"):
        if os.environ.get("ISOFAST_REQUIRE_EXT"):
            pytest.fail(f"CUDA kernels unavailable: {why or 'built without CUDA'}")
        pytest.skip("extension built without CUDA kernels")
    a = torch.randn(100, 6, 6, dtype=torch.float64)
    H = a @ a.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
    Hc = H.cuda()
    torch.testing.assert_close(module.cuda_eigvalsh(Hc).cpu(), module.eigvalsh(H))
    torch.testing.assert_close(module.cuda_condition_numbers(Hc).cpu(), module.condition_numbers(H))
    torch.testing.assert_close(module.cuda_airm_sq_to_mean(Hc).cpu(), module.airm_sq_to_mean(H))
    ld, g = module.cuda_logdet(Hc, True)
    ld_ref, g_ref = module.logdet(H, True)
    torch.testing.assert_close(ld.cpu(), ld_ref)
    torch.testing.assert_close(g.cpu(), g_ref)
    x = torch.randn(5, 3, 300, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(module.cuda_gram(x), x @ x.transpose(1, 2))
    torch.testing.assert_close(module.cuda_sqnorm(x), x.square().sum(-1))
