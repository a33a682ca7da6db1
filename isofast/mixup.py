"""IRVAE's latent sampling distribution P_Z: mixup of each code with a random partner."""

from __future__ import annotations

import torch
from torch import Tensor

from isofast._checks import check_eta, check_generator, check_z


def mixup(z: Tensor, eta: float | None = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """``z_aug (B, *latent_shape)``: ``alpha_b z_b + (1 - alpha_b) z_perm(b)``, ``alpha_b ~ U[-eta, 1 + eta]``.

    ``eta`` is ``None`` or a real number (numpy scalars included) in ``[0, isofast._checks.ETA_MAX]``.
    ``perm`` is a uniformly random permutation of the batch. Draws happen on ``z``'s device with
    ``generator`` (permutation first, then ``alpha``); ``eta=None`` returns ``z`` unchanged.
    Differentiable in ``z``, so gradients reach an encoder through both partners.
    """
    check_z(z)
    eta = check_eta(eta)
    check_generator(generator, z)
    return mixup_unchecked(z, eta, generator)


def mixup_unchecked(z: Tensor, eta: float | None, generator: torch.Generator | None) -> Tensor:
    """:func:`mixup` for arguments already validated (by ``plan``): no second host read of ``z``."""
    if eta is None:
        return z
    eta = float(eta)  # numpy scalars: keep the arithmetic below in torch
    bsz = z.shape[0]
    perm = torch.randperm(bsz, generator=generator, device=z.device)
    alpha = torch.rand(bsz, *[1] * (z.dim() - 1), generator=generator, device=z.device, dtype=z.dtype) * (1 + 2 * eta) - eta
    return alpha * z + (1 - alpha) * z[perm]
