"""Decoders in train mode on the generic path: BatchNorm with batch statistics, Dropout.

In train mode BatchNorm normalises with the batch's statistics, so a sample's Jacobian depends on
the rest of the (mixup-augmented) batch, and Dropout makes it depend on the mask (one mask per
sample, shared by its tangents). Both are computed as the decoder runs, with a warning (once per
decoder class and cause) and a ``train_mode`` line in ``isofast.plan``. The regulariser's pass never
updates BatchNorm's running statistics: :func:`frozen_running_stats` switches their tracking off
for its duration, which makes a train-mode BatchNorm use batch statistics exactly as it would.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

_warned: set[tuple[type, str]] = set()


def _train_mode_modules(decoder: object) -> tuple[list[nn.Module], list[nn.Module]]:
    if not isinstance(decoder, nn.Module):
        return [], []
    bn = [mod for mod in decoder.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training]
    drop = [mod for mod in decoder.modules() if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0]
    return bn, drop


def describe(decoder: object) -> str | None:
    """One line on what train mode changes for this decoder, or ``None``."""
    bn, drop = _train_mode_modules(decoder)
    parts = []
    if bn:
        parts.append(f"{len(bn)} BatchNorm layer(s) in train mode: each sample's Jacobian includes the batch statistics "
                     f"of the augmented batch (running statistics are not updated by the regulariser)")
    if drop:
        parts.append(f"{len(drop)} Dropout layer(s) in train mode: one mask per sample, shared by its tangents")
    return "; ".join(parts) or None


@contextlib.contextmanager
def frozen_running_stats(decoder: object) -> Iterator[None]:
    """Warn once about train mode; keep BatchNorm's running statistics untouched inside."""
    bn, drop = _train_mode_modules(decoder)
    for mods, cause in ((bn, "BatchNorm"), (drop, "Dropout")):
        key = (type(decoder), cause)
        if mods and key not in _warned:
            _warned.add(key)
            warnings.warn(f"isofast: {describe(decoder)}. Call decoder.eval() for per-sample Jacobians.",
                          stacklevel=4)
    tracked = [mod for mod in bn if mod.track_running_stats]
    for mod in tracked:
        mod.track_running_stats = False
    try:
        yield
    finally:
        for mod in tracked:
            mod.track_running_stats = True
