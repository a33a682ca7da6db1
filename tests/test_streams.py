"""The fused Sequential path (isofast.streams): every carried layer type against float64 brute
force (metric values, z and parameter gradients), gradcheck, and the planner's reasons."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import GRAD_RTOL, RTOL, pullback_brute_force, rel_err
from torch import nn

import isofast
from isofast import baselines
from isofast.activations import Activation
from isofast.streams import _affine, _channels_last, _gate, _Gate, _pixel_expansion, extract_sequential, tangent_images

M = 3
F64 = torch.float64


def _seq(*mods: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    dec = nn.Sequential(*mods).to(F64)
    with torch.no_grad():
        for p in dec.parameters():  # non-zero biases, so a bias leaking into a tangent row shows
            p.add_(0.1 * torch.randn_like(p))
    return dec


#: One small decoder ``(B, 3) -> (B, ...)`` per carried layer type.
DECODERS: dict[str, Callable[[], nn.Sequential]] = {
    # A Linear after a reshape (over the last dim of (B, 2, 7)): not an MLP the fused MLP path takes.
    "linear": lambda: _seq(nn.Linear(M, 14), nn.Softplus(), nn.Unflatten(1, (2, 7)), nn.Linear(7, 5), nn.Sigmoid()),
    "conv1d": lambda: _seq(nn.Linear(M, 12), nn.Tanh(), nn.Unflatten(1, (2, 6)),
                           nn.Conv1d(2, 3, 3, padding=1), nn.GELU(), nn.Conv1d(3, 2, 2, stride=2)),
    "conv2d": lambda: _seq(nn.Linear(M, 32), nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 4, 3, padding=1),
                           nn.SiLU(), nn.Conv2d(4, 2, 2, dilation=1, groups=2, bias=False), nn.Sigmoid()),
    "conv3d": lambda: _seq(nn.Linear(M, 54), nn.Unflatten(1, (2, 3, 3, 3)), nn.Conv3d(2, 2, 2), nn.ELU(0.7)),
    "conv_transpose1d": lambda: _seq(nn.Unflatten(1, (M, 1)), nn.ConvTranspose1d(M, 4, 3), nn.LeakyReLU(0.1),
                                     nn.ConvTranspose1d(4, 2, 3, stride=2, padding=1, output_padding=1)),
    "conv_transpose2d": lambda: _seq(nn.Unflatten(1, (M, 1, 1)), nn.ConvTranspose2d(M, 4, 2), nn.Softplus(),
                                     nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1, groups=2), nn.Tanh(),
                                     nn.ConvTranspose2d(2, 1, 3, dilation=2), nn.Sigmoid()),
    "conv_transpose3d": lambda: _seq(nn.Unflatten(1, (M, 1, 1, 1)), nn.ConvTranspose3d(M, 2, 2), nn.Softplus(),
                                     nn.ConvTranspose3d(2, 1, 2, stride=2)),
    "upsample_nearest": lambda: _seq(nn.Linear(M, 18), nn.Unflatten(1, (2, 3, 3)), nn.Upsample(scale_factor=2),
                                     nn.Conv2d(2, 1, 3), nn.Softplus()),
    "upsample_bilinear": lambda: _seq(nn.Linear(M, 18), nn.Tanh(), nn.Unflatten(1, (2, 3, 3)),
                                      nn.Upsample(size=(5, 4), mode="bilinear", align_corners=False), nn.Conv2d(2, 2, 2)),
    "upsampling_bilinear2d": lambda: _seq(nn.Linear(M, 8), nn.Unflatten(1, (2, 2, 2)), nn.UpsamplingBilinear2d(scale_factor=2),
                                          nn.Sigmoid()),
    "flatten_linear": lambda: _seq(nn.Unflatten(1, (M, 1, 1)), nn.ConvTranspose2d(M, 3, 3), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(27, 6), nn.Dropout(0.0), nn.Identity(), nn.Sigmoid()),
    # ReLU-like gates work in place: after a 1x1 transposed conv (channels-last rows), on a view
    # (Unflatten), twice in a row, and after a bias with no activation before a map.
    "piecewise_linear": lambda: _seq(nn.Unflatten(1, (M, 1, 1)), nn.ConvTranspose2d(M, 4, 2), nn.ReLU(),
                                     nn.LeakyReLU(0.2), nn.ConvTranspose2d(4, 3, 2, stride=2), nn.Upsample(scale_factor=2),
                                     nn.Flatten(), nn.Linear(192, 10), nn.Unflatten(1, (2, 5)), nn.LeakyReLU(-0.3),
                                     nn.ReLU(), nn.Linear(5, 4)),
    "nested_act_first": lambda: _seq(nn.Tanh(), nn.Sequential(nn.Linear(M, 8), nn.Softplus(), nn.Unflatten(1, (2, 4))),
                                     nn.Conv1d(2, 2, 3), nn.GELU(approximate="tanh"), nn.Softplus()),
}


def _codes(bsz: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(bsz, M, dtype=F64, generator=torch.Generator().manual_seed(seed), requires_grad=True)


@pytest.mark.parametrize("name", list(DECODERS))
def test_metric_matches_brute_force(name: str) -> None:
    dec = DECODERS[name]()
    z = _codes()
    p = isofast.plan(dec, z, measure=None)
    assert p.path == "fused_sequential", p
    h = isofast.pullback_metric(dec, z)
    ref = pullback_brute_force(dec, z)
    assert rel_err(h, ref) < RTOL[F64]
    # A loss that weighs every entry differently, so each gradient term is exercised.
    w = torch.randn(h.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    params = [z, *dec.parameters()]
    # The last layer's bias does not move the Jacobian: its gradient is zero on both sides.
    got = torch.autograd.grad((w * h).sum(), params, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad((w * ref).sum(), params, allow_unused=True, materialize_grads=True)
    for g, r in zip(got, want):
        assert rel_err(g, r) < GRAD_RTOL[F64]


@pytest.mark.parametrize("make", [
    lambda: _seq(nn.Unflatten(1, (M, 1, 1)), nn.ConvTranspose2d(M, 2, 2), nn.Softplus(),
                 nn.ConvTranspose2d(2, 1, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid()),
    DECODERS["upsample_bilinear"],
    DECODERS["piecewise_linear"],
])
def test_gradcheck(make: Callable[[], nn.Sequential]) -> None:
    dec = make()
    spec, _ = extract_sequential(dec)
    assert spec is not None
    # gradcheck perturbs its inputs in place, so passing the parameters checks their gradients.
    z = _codes(bsz=2)
    assert torch.autograd.gradcheck(lambda z, *ps: isofast.pullback_metric(dec, z), (z, *dec.parameters()))


@pytest.mark.parametrize("act", [Activation("relu"), Activation("leaky_relu", (0.1,))])
def test_piecewise_linear_gate_is_in_place(act: Activation) -> None:
    """ReLU-like gates reuse the previous layer's rows (no buffer per layer) and equal the general gate."""
    rows = torch.randn(6, 3, 4, 4, dtype=F64).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(3, 1, 1, dtype=F64)
    want = _Gate.apply(rows.clone(), bias, act, 2)
    got = _gate(rows, bias, act, 2)
    assert got.data_ptr() == rows.data_ptr() and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)


def test_one_pixel_rows_get_channels_last_strides() -> None:
    """A 1x1 image is contiguous in both formats; its strides are made channels-last so oneDNN
    returns the layer's output channels-last (no conversion before the next layer)."""
    rows = _channels_last(torch.randn(5, 7, 1, 1))
    assert rows.stride() == (7, 1, 7, 7)
    out = nn.functional.conv_transpose2d(rows, torch.randn(7, 3, 4, 4))
    assert out.stride(1) == 1


def test_primal_and_tangents_of_an_image_shaped_latent() -> None:
    """``z (B, 2, 3, 3)`` into a conv first layer: the primal is ``f(z)`` and ``J V`` matches
    the brute-force Jacobian applied to the seeds."""
    dec = _seq(nn.Conv2d(2, 3, 2), nn.Softplus(), nn.ConvTranspose2d(3, 1, 3, stride=2), nn.Sigmoid())
    spec, _ = extract_sequential(dec)
    assert spec is not None
    z = torch.randn(3, 2, 3, 3, dtype=F64)
    seeds = torch.randn(3, 4, 2, 3, 3, dtype=F64)
    primal, jv = tangent_images(spec, z, seeds)
    assert rel_err(primal, dec(z).flatten(1)) < RTOL[F64]
    jac = torch.stack([torch.autograd.functional.jacobian(lambda x: dec(x[None]).flatten(), zb) for zb in z])
    ref = torch.einsum("bd...,bk...->bkd", jac, seeds)
    assert jv.shape == (3, 4, primal.shape[1]) and rel_err(jv, ref) < RTOL[F64]


@pytest.mark.parametrize("measure", ["scaled_isometry", "volume"])
def test_distortion_takes_the_stream_path(measure: str) -> None:
    dec = DECODERS["conv_transpose2d"]()
    z = _codes(bsz=5)
    p = isofast.plan(dec, z, measure, estimator="exact")
    assert p.path == "fused_sequential" and p.backend == "torch"
    gen = torch.Generator().manual_seed(3)
    value = isofast.distortion(dec, z, measure, estimator="exact", generator=gen)
    h = pullback_brute_force(dec, isofast.mixup(z, 0.2, torch.Generator().manual_seed(3)))
    ref = isofast.measures.from_metric(measure, h, isofast.measures.BatchMean())
    assert rel_err(value, ref) < RTOL[F64]


def _hooked() -> nn.Sequential:
    dec = DECODERS["conv2d"]()
    dec[2].register_forward_hook(lambda mod, inp, out: out * 2)
    return dec


class _MyConv(nn.Conv2d):
    pass


class _MySequential(nn.Sequential):
    pass


REFUSED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "subclass of Sequential": (lambda: _MySequential(nn.Linear(M, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 2)).to(F64),
                               "a subclass of nn.Sequential"),
    "forward hook": (_hooked, "module 2 (Conv2d) has a module forward hook"),
    "subclass of Conv2d": (lambda: _seq(nn.Linear(M, 16), nn.Unflatten(1, (1, 4, 4)), _MyConv(1, 1, 2)),
                           "module 2 (_MyConv) is not one of"),
    "reflect padding": (lambda: _seq(nn.Linear(M, 16), nn.Unflatten(1, (1, 4, 4)),
                                     nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
    "batch norm": (lambda: _seq(nn.Linear(M, 16), nn.Unflatten(1, (1, 4, 4)), nn.BatchNorm2d(1)),
                   "module 2 (BatchNorm2d) is not one of"),
    "dropout in training": (lambda: _seq(nn.Linear(M, 16), nn.Dropout(0.5), nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 1, 2)),
                            "module 1 (Dropout) is Dropout in training mode"),
    "flatten the batch": (lambda: _seq(nn.Linear(M, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 2), nn.Flatten(0)),
                          "start_dim=0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_plan_says_why_the_stream_path_is_not_taken(case: str) -> None:
    make, reason = REFUSED[case]
    dec = make()
    assert extract_sequential(dec)[0] is None
    p = isofast.plan(dec, _codes(), estimator="exact")
    assert p.path == "generic" and reason in p.reasons["path"], p.reasons["path"]


def test_plan_reasons_of_the_stream_path() -> None:
    dec = DECODERS["conv2d"]()
    p = isofast.plan(dec, _codes(), estimator="exact")
    assert p.reasons["path"].startswith("fused_sequential: Sequential is an nn.Sequential of 6 stream-carried layers")
    assert "Conv2d" in p.reasons["path"] and "B (1 + K) rows" in p.reasons["backend"]
    # Hutchinson's Tr H^2 takes a plain VJP through the streams: the stream path runs it. The path
    # length's Hutchinson recipe differentiates its VJP again, which needs the decoder itself.
    assert isofast.plan(dec, _codes(), estimator="hutchinson").path == "fused_sequential"
    p = isofast.plan(dec, _codes(), "path_length", estimator="hutchinson")
    assert p.path == "generic" and "differentiates a VJP" in p.reasons["path"]
    # MLPs keep the fused MLP path; a plain function never reaches the stream recogniser's reasons.
    mlp = _seq(nn.Linear(M, 7), nn.Softplus(), nn.Linear(7, 5))
    assert isofast.plan(mlp, _codes(), estimator="exact").path == "fused_mlp"
    p = isofast.plan(lambda z: z * 2, _codes(), estimator="exact")
    assert p.reasons["path"] == "generic: decoder is a plain callable, not an nn.Module"


def test_input_errors_name_the_argument() -> None:
    dec = DECODERS["conv2d"]()
    with pytest.raises(TypeError, match="z must have the decoder's dtype torch.float64"):
        isofast.pullback_metric(dec, torch.zeros(2, M))
    with pytest.raises(ValueError, match="z has last dimension 4 but the decoder's first nn.Linear expects 3"):
        isofast.pullback_metric(dec, torch.zeros(2, 4, dtype=F64))
    conv_first = _seq(nn.Conv2d(2, 1, 2))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 2, <2 spatial dims>\)"):
        isofast.pullback_metric(conv_first, torch.zeros(2, 2, dtype=F64))


@pytest.mark.slow
def test_compiles_with_fullgraph() -> None:
    """The stream path is a first-order graph of torch ops: torch.compile(fullgraph=True) traces
    the whole regulariser and matches eager, value and gradients."""
    dec = DECODERS["conv_transpose2d"]().float()
    z = torch.randn(4, M, generator=torch.Generator().manual_seed(5), requires_grad=True)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return isofast.relaxed_distortion(dec, z, eta=None, estimator="exact")

    params = [z, *dec.parameters()]
    want = torch.autograd.grad(loss(z), params)
    value = torch.compile(loss, fullgraph=True)(z)
    assert rel_err(value, loss(z)) < RTOL[torch.float32]
    for g, w in zip(torch.autograd.grad(value, params), want):
        assert rel_err(g, w) < GRAD_RTOL[torch.float32]


def test_training_conv_decoder_opts_in() -> None:
    """``isofast train --decoder conv``'s decoder defines isofast_sequential(): the stream path
    runs it, also on a batch of one, and agrees with brute force."""
    from isofast.training.models import ConvDecoder

    torch.manual_seed(0)
    dec = ConvDecoder(2, (1, 8, 8), width=8).double()
    for bsz in (1, 3):
        z = torch.randn(bsz, 2, dtype=F64)
        assert isofast.plan(dec, z, measure=None).path == "fused_sequential"
        assert rel_err(isofast.pullback_metric(dec, z), pullback_brute_force(dec, z)) < RTOL[F64]


@pytest.mark.parametrize("name", ["conv_transpose2d", "piecewise_linear", "upsample_bilinear"])
def test_hutchinson_equals_the_official_recipe(name: str) -> None:
    """Hutchinson on the stream path (a plain VJP through the streams, a second tangent image) has
    the official recipe's value and gradients on the same probe, without its double backward."""
    dec = DECODERS[name]()
    z = _codes(bsz=5)
    u = torch.randn(5, 1, M, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert isofast.plan(dec, z, estimator="hutchinson", probes=u).path == "fused_sequential"
    got = isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", probes=u)
    want = baselines.official_relaxed_distortion(dec, z, u[:, 0])
    assert rel_err(got, want) < RTOL[F64]
    params = [z, *dec.parameters()]
    for g, r in zip(torch.autograd.grad(got, params, allow_unused=True, materialize_grads=True),
                    torch.autograd.grad(want, params, allow_unused=True, materialize_grads=True)):
        assert rel_err(g, r) < GRAD_RTOL[F64]


@pytest.mark.parametrize("mod", [nn.ConvTranspose1d(3, 4, 5), nn.ConvTranspose2d(3, 4, (2, 3), stride=2),
                                 nn.ConvTranspose3d(3, 2, 2)])
def test_one_pixel_transposed_conv_is_a_matrix_product(mod: nn.Module) -> None:
    """A transposed conv of a one-pixel image runs as a GEMM: the module's output (with and without
    its bias), channels-last for 2-d."""
    mod = mod.to(F64)
    x = torch.randn(6, 3, *[1] * (mod.weight.dim() - 2), dtype=F64)
    assert _pixel_expansion(mod, x)
    assert rel_err(_affine(mod, x, bias=True), mod(x)) < RTOL[F64]
    assert rel_err(_affine(mod, x, bias=False), mod(x) - mod.bias.view(-1, *[1] * (x.dim() - 2))) < RTOL[F64]
    if x.dim() == 4:
        assert _affine(mod, x, bias=False).stride(1) == 1
    padded = nn.ConvTranspose2d(3, 4, 3, padding=1).to(F64)
    assert not _pixel_expansion(padded, torch.randn(2, 3, 1, 1, dtype=F64))


@pytest.mark.slow
def test_auto_stays_compilable_above_the_hutchinson_width() -> None:
    """Above WIDE_LATENT ``auto`` runs Hutchinson eagerly, whose VJP would break a compiled graph:
    under torch.compile it plans the forward estimator, so fullgraph compilation still works."""
    m = isofast.planning.WIDE_LATENT + 1
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Unflatten(1, (m, 1, 1)), nn.ConvTranspose2d(m, 3, 2), nn.Softplus(), nn.Conv2d(3, 1, 2))
    z = torch.randn(4, m, requires_grad=True)
    assert isofast.plan(dec, z).estimator == "hutchinson"
    seen: list[str] = []

    def loss(z: torch.Tensor) -> torch.Tensor:
        seen.append(isofast.plan(dec, z).estimator)
        return isofast.relaxed_distortion(dec, z, eta=None)

    value = torch.compile(loss, fullgraph=True)(z)
    assert seen[-1] == "forward" and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters())
