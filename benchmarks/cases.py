"""The measured cases: decoder shapes, batches, and the shared inputs every provider sees.

Every provider of one case gets the same decoder weights, the same mixup-augmented codes
``z_aug (B, m)`` (augmented once, here, so no provider pays for or randomises mixup) and the
same Gaussian probes ``(B, K, m)``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import isofast

#: The IRVAE paper's MNIST decoder: 2-256-256-256-256-784, ReLU hidden, sigmoid output.
PAPER_HIDDEN = (256, 256, 256, 256)
PAPER_OUT = 784

_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "identity": nn.Identity}


@dataclass(frozen=True)
class Case:
    """One decoder shape at one batch size.

    ``group`` is ``"paper"`` (the paper's decoder over batches), ``"latent"`` (latent sweep),
    ``"width"`` (hidden/output widths), ``"activation"`` (smooth activations), ``"conv"`` or
    ``"attention"``. ``kind`` is the decoder family: ``"mlp"`` (``hidden``, ``out``, ``act`` and
    ``out_act`` apply), ``"deconv28"`` (:func:`deconv28`), ``"attention"`` (:class:`AttentionDecoder`)
    or ``"autoencoder_kl"`` (:func:`autoencoder_kl`, when diffusers is installed).
    ``providers`` optionally restricts which competitors run (``None``: all of the mode's).
    """

    name: str
    group: str
    batch: int
    m: int = 2
    hidden: tuple[int, ...] = PAPER_HIDDEN
    out: int = PAPER_OUT
    act: str = "relu"
    out_act: str = "sigmoid"
    providers: tuple[str, ...] | None = field(default=None, compare=False)
    kind: str = "mlp"

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths ``(m, hidden..., out)``."""
        return (self.m, *self.hidden, self.out)

    def describe(self) -> str:
        """Short human-readable shape, e.g. ``2-256x4-784 relu/sigmoid``."""
        if self.kind == "deconv28":
            return f"DeConvNet28 nh={DECONV_NH}, m={self.m} -> 1x28x28"
        if self.kind == "attention":
            return f"conv/GroupNorm/attention, latent {'x'.join(map(str, ATTENTION_LATENT))} -> 3x16x16"
        if self.kind == "autoencoder_kl":
            return f"diffusers AutoencoderKL decoder (tiny), latent {'x'.join(map(str, KL_LATENT))} -> 3x32x32"
        hid = self.hidden
        body = f"{hid[0]}x{len(hid)}" if len(set(hid)) == 1 else "-".join(map(str, hid))
        return f"{self.m}-{body}-{self.out} {self.act}/{self.out_act}"


@dataclass
class Inputs:
    """What every provider of a case receives: decoder, augmented codes, probes ``(B, K, m)``."""

    decoder: nn.Module
    z: Tensor
    probes: Tensor


#: Width factor of the DeConvNet28 case (channels 32 nh, 16 nh, 8 nh, 1).
DECONV_NH = 4
#: Image-shaped latent of the attention case, carried flat as ``z (B, 4 * 8 * 8)``.
ATTENTION_LATENT = (4, 8, 8)
#: Image-shaped latent of the diffusers case, carried flat as ``z (B, 4 * 16 * 16)``.
KL_LATENT = (4, 16, 16)


def deconv28(m: int, nh: int = DECONV_NH) -> nn.Sequential:
    """The official IRVAE ``DeConvNet28`` decoder's layer shapes as an ``nn.Sequential``:
    ``z (B, m)`` as a ``1x1`` image, transposed convs to ``8x8`` (kernel 8), ``15x15`` (kernel 3,
    stride 2, padding 1), ``28x28`` (kernel 2, stride 2, padding 1), a ``1x1`` conv to one channel;
    ReLU between layers, sigmoid output."""
    return nn.Sequential(
        nn.Unflatten(1, (m, 1, 1)),
        nn.ConvTranspose2d(m, nh * 32, kernel_size=8), nn.ReLU(),
        nn.ConvTranspose2d(nh * 32, nh * 16, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(nh * 16, nh * 8, kernel_size=2, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(nh * 8, 1, kernel_size=1), nn.Sigmoid(),
    )


class AttentionDecoder(nn.Module):
    """``z (B, 4*8*8) -> (B, 3, 16, 16)``, the shape of a latent-diffusion decoder in miniature:
    conv in, a GroupNorm/SiLU residual conv block, a GroupNorm + single-head self-attention block
    over the ``8x8`` tokens (``F.scaled_dot_product_attention``, residual), nearest upsampling,
    GroupNorm/SiLU and a conv out, sigmoid."""

    def __init__(self, channels: int = 32, groups: int = 8) -> None:
        super().__init__()
        c = channels
        self.conv_in = nn.Conv2d(ATTENTION_LATENT[0], c, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm_attn, self.qkv, self.proj = nn.GroupNorm(groups, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.norm_out, self.conv_out = nn.GroupNorm(groups, c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z.view(-1, *ATTENTION_LATENT))
        h = h + self.conv1(torch.nn.functional.silu(self.norm1(h)))
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(self.norm_attn(h)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(b, c, hh, ww))
        return torch.sigmoid(self.conv_out(torch.nn.functional.silu(self.norm_out(self.up(h)))))


class _Unflattened(nn.Module):
    """Runs ``decoder`` on ``z (B, prod(shape))`` viewed as ``(B, *shape)``."""

    def __init__(self, decoder: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.decoder, self.shape = decoder, shape

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z.view(-1, *self.shape))


def autoencoder_kl() -> nn.Module:
    """A randomly initialised tiny ``diffusers.AutoencoderKL`` decoder (two up blocks of 16/32
    channels, GroupNorm with 8 groups, the mid-block attention under PyTorch's default attention
    kernels), ``z (B, 4*16*16) -> (B, 3, 32, 32)``."""
    import diffusers

    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=KL_LATENT[0],
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    return _Unflattened(nn.Sequential(vae.post_quant_conv, vae.decoder), KL_LATENT)


def make_decoder(case: Case, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> nn.Module:
    """The case's decoder with PyTorch's default initialisation under ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if case.kind == "deconv28":
            return deconv28(case.m).to(device=device, dtype=dtype)
        if case.kind == "attention":
            return AttentionDecoder().to(device=device, dtype=dtype)
        if case.kind == "autoencoder_kl":
            return autoencoder_kl().to(device=device, dtype=dtype)
        widths = case.widths
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            last = i == len(widths) - 2
            layers.append(_ACTS[case.out_act if last else case.act]())
        return nn.Sequential(*layers).to(device=device, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen_state)


def make_inputs(case: Case, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                n_probes: int = 4, seed: int = 0, eta: float = 0.2) -> Inputs:
    """Decoder, mixup-augmented codes (``eta`` as in IRVAE; augmented once) and ``n_probes``
    Gaussian probes per sample, all deterministic in ``seed``."""
    decoder = make_decoder(case, device, dtype, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    z = torch.randn(case.batch, case.m, generator=gen, dtype=dtype)
    probes = torch.randn(case.batch, n_probes, case.m, generator=gen, dtype=dtype)
    z_aug = isofast.mixup(z, eta, gen)
    return Inputs(decoder, z_aug.to(device).detach(), probes.to(device))


#: The competitors of the latent sweep and of the width / activation cases (the full list runs
#: on the paper decoder).
CORE = ("official", "forward_ad", "isofast-torch-exact", "isofast-torch-hutch-K1")
SWEEP = (*CORE, "isofast-torch-hutch-K4")
#: The competitors of the conv and attention cases: the official recipe (the attention case also
#: with PyTorch's math attention kernel forced), today's generic path, the stream path, the
#: first-order estimator once isofast has it, its first-order Hutchinson, and what ``estimator="auto"`` runs.
DECODER_CORE = ("official", "generic-hutch-K1", "isofast-hutch-K1", "isofast-forward-K2", "isofast-forward-K4",
                "isofast-auto")
CONV = (*DECODER_CORE, "generic-exact", "isofast-seq-exact")
ATTENTION = (*DECODER_CORE, "official-math-sdpa")


def grid(mode: str, device: torch.device | str) -> list[Case]:
    """The cases of ``mode`` (``"quick"``, ``"medium"`` or ``"full"``) on ``device``.

    quick: paper decoder at batch 100 and 1024, a two-point latent sweep, one width and one smooth
    activation (under 3 minutes on 2 CPU cores). medium: the paper decoder at 100 and 1024, the latent
    sweep m in {2, 4, 8, 16, 64}, widths 64/128/512, wide output 3072, softplus and tanh. full: adds
    batch 8192 everywhere and 65536 for the paper decoder. medium and full add a tiny diffusers
    ``AutoencoderKL`` decoder where diffusers is installed.
    """
    dev = torch.device(device)
    if mode == "quick":
        paper_b, other_b, sweep_m = (100, 1024), 256, (2, 16)
        widths, acts, out_w = (64,), ("tanh",), ()
    elif mode == "medium":
        paper_b, other_b, sweep_m = (100, 1024), 1024, (2, 4, 8, 16, 64)
        widths, acts, out_w = (64, 128, 512), ("softplus", "tanh"), (3072,)
    elif mode == "full":
        paper_b, other_b, sweep_m = (100, 1024, 8192, 65536), 8192, (2, 4, 8, 16, 64)
        widths, acts, out_w = (64, 128, 512), ("softplus", "tanh"), (3072,)
    else:
        raise ValueError(f"mode must be quick, medium or full, got {mode!r}")
    del dev  # every mode runs the same shapes on every device; the runner adapts repetitions
    cases = [Case("paper", "paper", b) for b in paper_b]
    cases += [Case(f"latent-m{m}", "latent", other_b, m=m, providers=SWEEP) for m in sweep_m]
    cases += [Case(f"width-{w}", "width", other_b, hidden=(w,) * 4, providers=CORE) for w in widths]
    cases += [Case(f"out-{d}", "width", other_b, out=d, providers=CORE) for d in out_w]
    cases += [Case(f"act-{a}", "activation", other_b, act=a, providers=CORE) for a in acts]
    # The official IRVAE DeConvNet28 shape (issue-sized: batch 64) and a small attention decoder.
    # Today's generic exact path carries m forward-mode streams over m repeated codes: m = 2 only.
    cases += [Case(f"deconv28-m{m}", "conv", 64, m=m, kind="deconv28",
                   providers=CONV if m <= 2 else tuple(p for p in CONV if p != "generic-exact")) for m in (2, 16)]
    cases.append(Case("attention-4x8x8", "attention", 8, m=256, kind="attention", providers=ATTENTION))
    if mode != "quick" and importlib.util.find_spec("diffusers") is not None:
        cases.append(Case("autoencoder-kl-4x16x16", "attention", 8, m=1024, kind="autoencoder_kl", providers=ATTENTION))
    return cases


__all__ = ["ATTENTION", "CONV", "CORE", "SWEEP", "AttentionDecoder", "Case", "Inputs", "autoencoder_kl", "deconv28", "grid",
           "make_decoder", "make_inputs"]
