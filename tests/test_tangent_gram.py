"""``tangent_gram`` / ``tangent_sqnorm``: the torch path against brute force on CPU, and on a GPU
the cuda backend's kernels against the torch path (values, gradients, the generic path, the plan)."""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL, ConvDecoder, require_backend
from torch.autograd import gradcheck, gradgradcheck

import isofast
from isofast import backends, dispatch
from isofast.ops import tangent_gram, tangent_sqnorm


def _images(*shape: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)


# --- CPU: the torch path -----------------------------------------------------------------------

def test_values_match_brute_force() -> None:
    x = _images(4, 3, 11)
    xs = x.detach().tolist()  # (B, K, D) nested lists: plain Python sums, no torch kernels
    gram = [[[sum(u * v for u, v in zip(row_k, row_l)) for row_l in sample] for row_k in sample] for sample in xs]
    sqnorm = [[sum(v * v for v in row) for row in sample] for sample in xs]
    gram, sqnorm = torch.tensor(gram, dtype=torch.float64), torch.tensor(sqnorm, dtype=torch.float64)
    torch.testing.assert_close(tangent_gram(x), gram, rtol=RTOL[torch.float64], atol=0)
    torch.testing.assert_close(tangent_sqnorm(x), sqnorm, rtol=RTOL[torch.float64], atol=0)


def test_torch_path_is_the_plain_expression() -> None:
    """The generic path's CPU results are unchanged: the op computes exactly the old expression."""
    x = _images(5, 4, 7, dtype=torch.float32)
    assert torch.equal(tangent_gram(x), x @ x.transpose(1, 2))
    assert torch.equal(tangent_sqnorm(x), x.square().sum(-1))


@pytest.mark.parametrize("op", [tangent_gram, tangent_sqnorm])
def test_gradcheck(op) -> None:
    x = _images(3, 4, 6)
    assert gradcheck(op, (x,))
    assert gradgradcheck(op, (x,))


def _reducer(op: str, device: str) -> str:
    return dispatch.select(op, torch.device(device), torch.float64).impl.name


@pytest.mark.parametrize("op", ["tangent_gram", "tangent_sqnorm"])
def test_reductions_dispatch(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors reduce in torch; CUDA tensors on the cuda backend's kernels when it is available
    (the triton backend declares them as its fallback), in torch under use("torch") or without it."""
    assert _reducer(op, "cpu") == "torch"
    monkeypatch.setitem(backends._status, "cuda", (True, ""))
    assert _reducer(op, "cuda") == "cuda"
    with backends.use("torch"):
        assert _reducer(op, "cuda") == "torch"
    monkeypatch.setitem(backends._status, "triton", (True, ""))
    monkeypatch.setattr(backends.get("triton"), "supports", lambda device, dtype=None: (True, ""))
    choice = dispatch.select(op, torch.device("cuda"), torch.float32)
    assert (choice.backend, choice.impl.name) == ("triton", "cuda")
    monkeypatch.setitem(backends._status, "cuda", (False, "no CUDA device"))
    assert dispatch.select(op, torch.device("cuda"), torch.float32).impl.name == "torch"


def test_plan_reports_torch_reductions_on_cpu() -> None:
    reasons = isofast.plan(ConvDecoder(), torch.randn(3, 2, dtype=torch.float64)).reasons
    assert reasons["backend"].startswith("torch:")
    assert reasons["ops"].startswith("tangent_gram: torch (PyTorch")


# --- GPU: the cuda backend's kernels against the torch path -------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [tangent_gram, tangent_sqnorm])
def test_cuda_kernels_match_torch_path(op, dtype: torch.dtype) -> None:
    require_backend("cuda")
    assert _reducer(op.__name__, "cuda") == "cuda"
    # D = 1000 spans several blocks of the reduction; a transposed view exercises non-contiguous input.
    for x in (_images(6, 5, 1000, dtype=dtype, device="cuda"),
              _images(6, 1000, 5, dtype=dtype, device="cuda").transpose(1, 2)):
        out = op(x)
        weight = torch.randn_like(out)
        (grad,) = torch.autograd.grad((out * weight).sum(), x)
        with backends.use("torch"):
            ref = op(x)
            (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x)
        tol = {"rtol": RTOL[dtype], "atol": RTOL[dtype] * float(ref.abs().max())}
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(grad, grad_ref, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_generic_path_on_cuda_matches_torch_path(estimator: str) -> None:
    require_backend("cuda")
    dec = ConvDecoder().cuda()
    z = torch.randn(6, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    probes = torch.randn(6, 3, 2, dtype=torch.float64, device="cuda") if estimator == "hutchinson" else None
    params = [z, *dec.parameters()]

    def run() -> list[torch.Tensor]:
        loss = isofast.distortion(dec, z, eta=None, estimator=estimator, probes=probes)
        return [loss, *torch.autograd.grad(loss, params)]

    ops = isofast.plan(dec, z, eta=None, estimator=estimator, probes=probes).reasons["ops"]
    assert ": cuda (CUDA kernel" in ops
    got = run()
    with backends.use("torch"):
        assert ": torch (PyTorch" in isofast.plan(dec, z, eta=None, estimator=estimator, probes=probes).reasons["ops"]
        want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
