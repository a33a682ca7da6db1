"""Shared test (and benchmark) decoders for the generic path: conv, normalisation and attention.

- :class:`DeConvNet28`: an IRVAE ``DeConvNet28``-style transposed-conv decoder ``(B, m) -> (B, 1, 28, 28)``.
- :class:`ResAttnDecoder`: a residual conv / GroupNorm / self-attention decoder with an image-shaped
  latent ``(B, C, H, W) -> (B, 3, 2H, 2W)``; its attention uses ``F.scaled_dot_product_attention``
  (or ``nn.MultiheadAttention``) and hands GroupNorm channels-last strided inputs, as diffusers'
  ``AutoencoderKL`` decoder does.
- :func:`tiny_autoencoder_kl_decoder`: a randomly initialised tiny ``diffusers.AutoencoderKL`` decoder
  (latent ``(4, 16, 16)``), skipping the test when diffusers is absent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DeConvNet28(nn.Module):
    """``(B, m) -> (B, 1, 28, 28)``: transposed convolutions 1 -> 7 -> 14 -> 28 with widths
    ``32 nh, 16 nh, 8 nh`` and ReLU, a 3x3 output conv and a sigmoid (``nh = 4``: 128/64/32)."""

    def __init__(self, m: int = 2, nh: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Unflatten(1, (m, 1, 1)),
            nn.ConvTranspose2d(m, 32 * nh, 7), nn.ReLU(),
            nn.ConvTranspose2d(32 * nh, 16 * nh, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16 * nh, 8 * nh, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8 * nh, 1, 3, padding=1), nn.Sigmoid(),
        )
        self.to(dtype)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class ResBlock(nn.Module):
    """``x + conv(silu(gn(conv(silu(gn(x))))))``."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return x + self.c2(F.silu(self.n2(h)))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual, GroupNorm in front.

    ``mha=False`` uses ``F.scaled_dot_product_attention`` under PyTorch's default kernel choice;
    ``mha=True`` uses ``nn.MultiheadAttention``. The output goes back to ``(B, C, H, W)`` by a
    transpose, so it is channels-last strided, as in diffusers' attention processor.
    """

    def __init__(self, c: int, groups: int, mha: bool = False) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.mha = nn.MultiheadAttention(c, 2, batch_first=True) if mha else None
        self.qkv = None if mha else nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        if self.mha is not None:
            a, _ = self.mha(t, t, t, need_weights=False)
        else:
            q, k, v = self.qkv(t).chunk(3, dim=-1)
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        a = self.proj(a).transpose(1, 2).reshape(b, c, h, w)
        return a + x


class ResAttnDecoder(nn.Module):
    """``(B, C, H, W) -> (B, 3, 2H, 2W)``: conv_in, residual block, attention, residual block,
    nearest 2x upsampling, a final GroupNorm / LayerNorm-free head. ``latent_shape = (C, H, W)``."""

    def __init__(self, latent_shape: tuple[int, int, int] = (4, 4, 4), width: int = 16, groups: int = 4,
                 mha: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.latent_shape = latent_shape
        self.conv_in = nn.Conv2d(latent_shape[0], width, 3, padding=1)
        self.body = nn.Sequential(ResBlock(width, groups), AttnBlock(width, groups, mha), ResBlock(width, groups))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)
        self.to(dtype)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.body(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def tiny_autoencoder_kl_decoder(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny ``diffusers.AutoencoderKL`` decoder, latent ``(4, 16, 16)`` ->
    image ``(3, 32, 32)`` (GroupNorm, a mid-block attention). Skips the calling test without diffusers."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    return KLDecoder(vae).to(dtype)


class KLDecoder(nn.Module):
    """``z (B, 4, h, w) -> image``: an ``AutoencoderKL``'s ``post_quant_conv`` and decoder."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))
