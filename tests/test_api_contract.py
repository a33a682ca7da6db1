"""The public contract: mixup, plan, backends, bad input, and torch.compile of a training step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import ConvDecoder, make_mlp

import isofast
from isofast import backends

Z = torch.randn(6, 2, dtype=torch.float64)


# --- mixup ---------------------------------------------------------------------------------------
def test_mixup_coefficients_stay_in_range_and_pair_codes() -> None:
    z = torch.randn(512, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(512, generator=gen)
    alpha = torch.rand(512, 1, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    out = isofast.mixup(z, 0.2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, alpha * z + (1 - alpha) * z[perm])
    assert alpha.min() >= -0.2 and alpha.max() <= 1.2
    assert alpha.min() < 0 and alpha.max() > 1  # eta really extends past the segment


def test_mixup_is_reproducible_and_optional() -> None:
    a = isofast.mixup(Z, generator=torch.Generator().manual_seed(1))
    b = isofast.mixup(Z, generator=torch.Generator().manual_seed(1))
    c = isofast.mixup(Z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert isofast.mixup(Z, None) is Z


def test_distortion_is_reproducible_with_a_generator() -> None:
    dec = make_mlp([2, 8, 5])
    vals = [
        isofast.relaxed_distortion(dec, Z, estimator="hutchinson", generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert torch.equal(vals[0], vals[1])


# --- plan ------------------------------------------------------------------------------------------
def test_plan_explains_path_backend_and_estimator() -> None:
    p = isofast.plan(make_mlp([2, 8, 5]), Z)
    expected_backend = "cpu" if backends.available()["cpu"] else "torch"
    assert (p.path, p.backend, p.estimator, p.n_probes) == ("fused_mlp", expected_backend, "exact", None)
    text = str(p)
    assert "fused_mlp" in text and "estimator" in text and "backend" in text


def test_plan_names_the_module_that_blocks_fusion() -> None:
    dec = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)).double()
    p = isofast.plan(dec, Z)
    assert p.path == "generic" and "LayerNorm" in p.reasons["path"]
    assert isofast.plan(ConvDecoder(), Z).path == "generic"


def test_plan_estimator_choice() -> None:
    dec = make_mlp([20, 8, 5])
    z = torch.randn(3, 20, dtype=torch.float64)
    assert isofast.plan(dec, z).estimator == "hutchinson"
    assert isofast.plan(make_mlp([3, 8, 5]), torch.randn(3, 3, dtype=torch.float64)).estimator == "hutchinson"
    assert isofast.plan(dec, z, n_probes=3).n_probes == 3
    assert isofast.plan(dec, z, "volume").estimator == "exact"
    assert isofast.plan(make_mlp([2, 8, 5]), Z, probes=torch.randn(6, 2, 2, dtype=torch.float64)).n_probes == 2


def test_backends_available_and_use() -> None:
    avail = backends.available()
    assert avail["torch"] is True and set(avail) >= {"torch", "cpu", "cuda", "triton"}
    with backends.use("torch"):
        assert isofast.plan(make_mlp([2, 8, 5]), Z).reasons["backend"].startswith("torch: forced")
    with pytest.raises(ValueError, match="backend"):
        with backends.use("nope"):
            pass
    missing = [n for n, ok in avail.items() if not ok]
    for name in missing:
        with pytest.raises(ValueError, match=name):
            with backends.use(name):
                pass


# --- bad input -------------------------------------------------------------------------------------
DEC = make_mlp([2, 8, 5])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(z=torch.randn(6, dtype=torch.float64)), ValueError, r"z must have shape \(B, m\)"),
        (dict(z=torch.zeros(0, 2, dtype=torch.float64)), ValueError, "empty batch"),
        (dict(z=torch.ones(3, 2, dtype=torch.long)), TypeError, "z must have a floating dtype"),
        (dict(z=torch.tensor([[0.0, float("nan")]], dtype=torch.float64)), ValueError, "z must be finite"),
        (dict(z=torch.tensor([[0.0, float("inf")]], dtype=torch.float64)), ValueError, "z must be finite"),
        (dict(z=[[0.0, 1.0]]), TypeError, "z must be a torch.Tensor"),
        (dict(z=torch.randn(3, 4, dtype=torch.float64)), ValueError, "latent width"),
        (dict(z=torch.randn(3, 2)), TypeError, "dtype"),
        (dict(measure="isometric"), ValueError, "measure must be one of"),
        (dict(estimator="exactly"), ValueError, "estimator must be one of"),
        (dict(eta=-0.1), ValueError, "eta"),
        (dict(n_probes=0), ValueError, "n_probes"),
        (dict(probes=torch.randn(6, 2, dtype=torch.float64)), ValueError, r"probes must have shape \(B, K, m\)"),
        (dict(probes=torch.randn(5, 1, 2, dtype=torch.float64)), ValueError, "probes must have shape"),
        (dict(probes=torch.randn(6, 1, 2)), TypeError, "probes must match"),
        (dict(probes=torch.randn(6, 1, 2, dtype=torch.float64), estimator="exact"), ValueError, "probes"),
        (dict(measure="volume", estimator="hutchinson"), ValueError, "volume"),
        (dict(generator=123), TypeError, "generator"),
        (dict(sync=True), ValueError, "sync"),
        (dict(decoder=42), TypeError, "decoder must be a callable"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, exc: type, match: str) -> None:
    args = dict(decoder=DEC, z=Z, measure="scaled_isometry")
    args.update(kwargs)
    decoder, z, measure = args.pop("decoder"), args.pop("z"), args.pop("measure")
    with pytest.raises(exc, match=match):
        isofast.distortion(decoder, z, measure, **args)


def test_generic_decoder_with_wrong_batch_size() -> None:
    def collapsing(z: torch.Tensor) -> torch.Tensor:
        return z[:1].repeat(1, 2)

    with pytest.raises(ValueError, match="one output per code"):
        isofast.relaxed_distortion(collapsing, Z)


# --- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compiled_training_step_matches_eager(backend: str) -> None:
    """The fused path is a first-order graph, so torch.compile traces the whole step into one
    graph (``fullgraph=True``): with the torch twin, and with whatever ``"auto"`` picks (the C++
    extension's ops are ``torch.library`` custom ops with fake implementations)."""
    torch._dynamo.reset()
    enc = torch.nn.Linear(6, 2)
    dec = make_mlp([2, 16, 16, 6], act="softplus", dtype=torch.float32, seed=3)
    x = torch.randn(32, 6)

    def step(x: torch.Tensor) -> torch.Tensor:
        z = enc(x)
        recon = (dec(z) - x).square().mean()
        return recon + isofast.relaxed_distortion(dec, z, eta=None)

    def grads(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in [*enc.parameters(), *dec.parameters()]:
            p.grad = None
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in [*enc.parameters(), *dec.parameters()]]

    forced = backends.use("torch") if backend == "torch" else contextlib.nullcontext()
    with forced:
        eager_loss, eager_grads = grads(step)
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        compiled_loss, compiled_grads = grads(compiled)
    assert torch.allclose(eager_loss, compiled_loss, rtol=1e-5)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_decoder_accumulates_in_float32() -> None:
    dec = make_mlp([2, 16, 12], dtype=torch.bfloat16, seed=5)
    ref = make_mlp([2, 16, 12], dtype=torch.float64, seed=5)
    z = torch.randn(8, 2, dtype=torch.float64)
    h = isofast.pullback_metric(dec, z.bfloat16())
    loss = isofast.relaxed_distortion(dec, z.bfloat16(), eta=None)
    assert h.dtype == torch.float32 and loss.dtype == torch.float32
    assert abs(float(loss) / float(isofast.relaxed_distortion(ref, z, eta=None)) - 1) < 0.05
    loss.backward()
    assert dec[0].weight.grad.dtype == torch.bfloat16
