"""The generic path on conv / GroupNorm / attention decoders with image-shaped latents, and its
edge cases: batch of 1, inference mode, train-mode BatchNorm and Dropout, constant decoders,
scale, autocast and clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import isofast
from isofast.tangents import tangent_images
from tests.conftest import RTOL, ConvDecoder, rel_err
from tests.helpers import DeConvNet28, ResAttnDecoder, tiny_autoencoder_kl_decoder


def _check_images(dec, z, k=3):
    """``<J v, w> = <v, J^T w>`` for random ``v, w``: the forward images against one reverse pass."""
    v = torch.randn(z.shape[0], k, *z.shape[1:], dtype=z.dtype)
    primal, jv = tangent_images(dec, z, v)
    zg = z.detach().requires_grad_()
    out = dec(zg).reshape(z.shape[0], -1)
    w = torch.randn_like(out)
    (jtw,) = torch.autograd.grad(out, zg, w)
    lhs = torch.einsum("bkd,bd->bk", jv, w)
    rhs = torch.einsum("bk...,b...->bk", v, jtw)
    assert rel_err(primal, out) < RTOL[z.dtype]
    assert rel_err(lhs, rhs) < RTOL[z.dtype]


@pytest.mark.parametrize("mha", [False, True], ids=["sdpa", "multihead"])
def test_residual_groupnorm_attention_decoder(mha):
    dec = ResAttnDecoder((2, 3, 3), width=8, groups=2, mha=mha, dtype=torch.float64)
    z = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    _check_images(dec, z)
    h = isofast.pullback_metric(dec, z)
    assert h.shape == (3, 18, 18)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda x: dec(x[None]).reshape(-1), zb).reshape(-1, 18)
                       for zb in z])
    assert rel_err(h, jac.transpose(1, 2) @ jac) < RTOL[torch.float64]
    p = isofast.plan(dec, z)
    assert "scaled_dot_product_attention" in p.reasons["operators"]
    assert "(3, 18, 18)" in p.reasons["shapes"]


def test_plain_forward_mode_fails_where_isofast_does_not():
    dec = ResAttnDecoder((2, 3, 3), width=8, groups=2)
    z, v = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(dec, (z,), (v,))
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    gn = nn.GroupNorm(2, 8)
    with pytest.raises(RuntimeError):
        torch.func.jvp(gn, (x,), (torch.randn_like(x),))
    _, jv = tangent_images(gn, x, torch.randn(2, 2, 8, 4, 4))
    assert torch.isfinite(jv).all()


def test_image_latents_probes_and_mixup():
    dec = ResAttnDecoder((2, 3, 3), width=8, groups=2, dtype=torch.float64)
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    probes = torch.randn(4, 5, 2, 3, 3, dtype=torch.float64)
    flat = lambda x: dec(x.reshape(-1, 2, 3, 3))  # noqa: E731
    for est in ("forward", "hutchinson"):
        a = isofast.relaxed_distortion(dec, z, eta=None, estimator=est, probes=probes)
        b = isofast.relaxed_distortion(flat, z.reshape(4, 18), eta=None, estimator=est, probes=probes.reshape(4, 5, 18))
        assert rel_err(a, b) < RTOL[torch.float64]
    gen = torch.Generator().manual_seed(0)
    assert isofast.mixup(z, 0.2, gen).shape == z.shape
    with pytest.raises(ValueError, match=r"\(B, K, \*latent_shape\) = \(4, K >= 1, 2, 3, 3\)"):
        isofast.relaxed_distortion(dec, z, probes=probes.reshape(4, 5, 18))


def test_tiny_autoencoder_kl_decoder_under_default_attention():
    dec = tiny_autoencoder_kl_decoder()
    z = torch.randn(2, 4, 16, 16)
    p = isofast.plan(dec, z)
    assert p.path == "generic" and p.estimator == "hutchinson"  # m = 1024: first-order Hutchinson
    loss = isofast.relaxed_distortion(dec, z, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(q.grad).all() for q in dec.parameters() if q.grad is not None)
    _check_images(tiny_autoencoder_kl_decoder(torch.float64), torch.randn(1, 4, 4, 4, dtype=torch.float64))


def test_batch_of_one_and_deconvnet():
    dec = DeConvNet28(2, nh=1, dtype=torch.float64)
    z = torch.randn(1, 2, dtype=torch.float64)
    for est in ("exact", "forward", "hutchinson"):
        loss = isofast.relaxed_distortion(dec, z, estimator=est, n_probes=None if est == "exact" else 2)
        loss.backward()
        assert torch.isfinite(loss)


def test_inference_mode_computes_the_same_values():
    dec, z = ConvDecoder(3), torch.randn(4, 3, dtype=torch.float64)
    probes = torch.randn(4, 3, 3, dtype=torch.float64)
    want_h = isofast.pullback_metric(dec, z).detach()
    want = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", probes=probes).detach()
    with torch.inference_mode():
        h = isofast.pullback_metric(dec, z)
        got = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", probes=probes)
    assert float(h.abs().max()) > 0
    assert rel_err(h, want_h) < RTOL[torch.float64] and rel_err(got, want) < RTOL[torch.float64]


class _BNDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)

    def forward(self, z):
        return self.b(torch.tanh(self.bn(self.a(z))))


def test_train_mode_batchnorm_warns_once_and_keeps_running_statistics():
    dec = _BNDecoder().double()
    z = torch.randn(6, 3, dtype=torch.float64)
    before = [dec.bn.running_mean.clone(), dec.bn.running_var.clone(), dec.bn.num_batches_tracked.clone()]
    isofast.train_mode._warned.clear()
    with pytest.warns(UserWarning, match="BatchNorm"):
        isofast.relaxed_distortion(dec, z, estimator="forward")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        isofast.relaxed_distortion(dec, z, estimator="forward")
    for b, now in zip(before, [dec.bn.running_mean, dec.bn.running_var, dec.bn.num_batches_tracked]):
        assert torch.equal(b, now)
    assert dec.bn.track_running_stats
    assert "BatchNorm" in isofast.plan(dec, z).reasons["train_mode"]
    dec(z)  # the user's own forward still updates them
    assert not torch.equal(before[0], dec.bn.running_mean)


def test_train_mode_dropout_draws_one_mask_per_sample():
    drop = nn.Dropout(0.5)
    z = torch.rand(5, 40) + 1
    v = torch.rand(5, 4, 40) + 1
    primal, jv = tangent_images(drop, z, v)
    mask = (primal != 0).reshape(5, 1, 40)
    assert torch.equal(jv != 0, mask.expand_as(jv))
    assert "Dropout" in isofast.plan(drop, z).reasons["train_mode"]


@pytest.mark.parametrize("estimator", ["exact", "forward", "hutchinson"])
def test_a_decoder_ignoring_z_gives_zero(estimator):
    const = nn.Parameter(torch.randn(7, dtype=torch.float64))
    dec = lambda z: const.expand(z.shape[0], 7) * 1.0  # noqa: E731
    z = torch.randn(4, 3, dtype=torch.float64)
    loss = isofast.relaxed_distortion(dec, z, estimator=estimator, n_probes=None if estimator == "exact" else 2)
    assert float(loss) == 0
    (loss + const.sum()).backward()  # added to a training loss it contributes nothing
    assert torch.equal(const.grad, torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-15, 1e15])
@pytest.mark.parametrize("estimator", ["exact", "forward", "hutchinson"])
def test_ratio_measures_are_right_in_fp32_at_any_jacobian_scale(scale, estimator):
    base = ConvDecoder(3, dtype=torch.float32)
    z = torch.randn(6, 3)
    probes = None if estimator == "exact" else torch.randn(6, 3, 3)
    params = list(base.parameters())
    ref = isofast.relaxed_distortion(base, z, eta=None, estimator=estimator, probes=probes)
    got = isofast.relaxed_distortion(lambda x: scale * base(x), z, eta=None, estimator=estimator, probes=probes)
    assert rel_err(got, ref) < 1e-4
    for g, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        assert torch.isfinite(g).all() and rel_err(g, r) < 1e-3


def test_unrepresentable_results_are_refused():
    base = ConvDecoder(3, dtype=torch.float32)
    z = torch.randn(6, 3)
    with pytest.raises(OverflowError, match="not representable in torch.float32"):
        isofast.distortion(lambda x: 1e15 * base(x), z, "isometry", estimator="forward")
    with pytest.raises(OverflowError, match="pullback metric"):
        isofast.pullback_metric(lambda x: 1e30 * base(x), z)


def test_cpu_bf16_autocast_returns_fp32_traces_and_loss():
    dec = DeConvNet28(4, nh=1)
    z = torch.randn(4, 4)
    probes = torch.randn(4, 4, 4)
    ref = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", probes=probes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", probes=probes)
        h = isofast.pullback_metric(dec, z)
    assert got.dtype == torch.float32 and h.dtype == torch.float32
    assert rel_err(got, ref) < 0.05
    got.backward()
    assert all(torch.isfinite(q.grad).all() for q in dec.parameters() if q.grad is not None)


@pytest.mark.parametrize("out, err, match", [
    (lambda y: (y, y), TypeError, "got a tuple"),
    (lambda y: {"x": y}, TypeError, "got a dict"),
    (lambda y: [y], TypeError, "got a list"),
    (lambda y: y.sum(), ValueError, r"shape \(4, \.\.\.\); got \(\)"),
])
def test_decoders_returning_other_things_are_refused(out, err, match):
    dec = ConvDecoder(3)
    with pytest.raises(err, match=match):
        isofast.relaxed_distortion(lambda z: out(dec(z)), torch.randn(4, 3, dtype=torch.float64))


def test_dtype_mismatch_and_oversized_metric_are_refused():
    dec = ConvDecoder(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="z must have the decoder's dtype torch.float64, got torch.float32"):
        isofast.relaxed_distortion(dec, torch.randn(4, 3))
    with pytest.raises(TypeError, match="decoder returned dtype torch.float64 for z of dtype torch.float32"):
        isofast.relaxed_distortion(lambda z: dec(z.double()), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(2, 49152, 49152\): .* GiB"):
        isofast.pullback_metric(dec, torch.randn(2, 3, 128, 128, dtype=torch.float64))


@pytest.mark.parametrize("norm", [
    lambda: nn.LayerNorm([6, 4, 4]),
    lambda: nn.InstanceNorm2d(6, affine=True),
    lambda: nn.BatchNorm2d(6).eval(),
    lambda: nn.GroupNorm(3, 6),
], ids=["layernorm", "instancenorm", "batchnorm_eval", "groupnorm"])
def test_normalisation_layers(norm):
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Unflatten(1, (3, 2, 2)), nn.ConvTranspose2d(3, 6, 4, stride=2, padding=1), norm(),
                        nn.SiLU(), nn.Conv2d(6, 2, 3, padding=1)).double()
    if isinstance(dec[2], nn.BatchNorm2d):
        dec[2].running_mean.uniform_(-1, 1), dec[2].running_var.uniform_(0.5, 2)
    z = torch.randn(3, 12, dtype=torch.float64)
    _check_images(dec, z)
    assert "train_mode" not in isofast.plan(dec, z).reasons
