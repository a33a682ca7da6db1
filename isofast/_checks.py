"""Argument checks shared by the public API: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

ESTIMATORS = ("auto", "exact", "forward", "hutchinson")

#: Largest accepted mixup range ``eta``: ``alpha ~ U[-eta, 1 + eta]`` extrapolates codes up to
#: ``eta`` pair distances past either partner. Beyond a thousand pair distances the codes are far
#: from any data, and a bound keeps ``alpha * z`` finite for every finite ``z`` of sane scale.
ETA_MAX = 1000.0


def can_read_values() -> bool:
    """Whether value checks may read tensors back to the host (NaN/Inf, scale): not while
    torch.compile traces or a CUDA graph captures, where a host read is impossible or a sync."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_z(z: object) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (B, m) or (B, *latent_shape), got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must have a floating dtype, got {z.dtype}")
    if z.dim() < 2:
        raise ValueError(f"z must have shape (B, m) or (B, *latent_shape), got {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError("z must hold at least one code, got an empty batch (B = 0)")
    if z[0].numel() == 0:
        raise ValueError(f"z must have a latent size m >= 1, got latent shape {tuple(z.shape[1:])}")
    if z.device.type == "meta":
        raise ValueError("z must hold values on a real device (cpu, cuda, ...), got a tensor on the meta device")
    if can_read_values() and not bool(torch.isfinite(z).all()):
        raise ValueError("z must be finite, got NaN or Inf entries")


def check_eta(eta: object) -> float | None:
    """``eta`` as a float (any real number type, numpy scalars included), or ``None``."""
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be None or a real number in [0, {ETA_MAX:g}], got {type(eta).__name__}")
    value = float(eta)
    if not (math.isfinite(value) and 0 <= value <= ETA_MAX):
        raise ValueError(f"eta must be None or a real number in [0, {ETA_MAX:g}] (isofast._checks.ETA_MAX), got {eta!r}")
    return value


def check_generator(generator: object, z: Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != z.device.type:
        raise ValueError(f"generator must be on z's device ({z.device.type}), got one on {generator.device.type}")


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_probes(probes: object, z: Tensor) -> None:
    if not isinstance(probes, Tensor):
        raise TypeError(f"probes must be a torch.Tensor of shape (B, K, *latent_shape), got {type(probes).__name__}")
    bsz, latent = z.shape[0], tuple(z.shape[1:])
    if probes.dim() != z.dim() + 1 or probes.shape[0] != bsz or tuple(probes.shape[2:]) != latent or probes.shape[1] == 0:
        want = ", ".join(map(str, (bsz, "K >= 1") + latent))
        form = "(B, K, m)" if z.dim() == 2 else "(B, K, *latent_shape)"
        raise ValueError(f"probes must have shape {form} = ({want}), got {tuple(probes.shape)}")
    if probes.dtype != z.dtype or probes.device != z.device:
        raise TypeError(
            f"probes must match z's dtype and device ({z.dtype}, {z.device}), got ({probes.dtype}, {probes.device})"
        )
    if can_read_values() and not bool(torch.isfinite(probes).all()):
        raise ValueError("probes must be finite, got NaN or Inf entries")
