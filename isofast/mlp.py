"""Recognise decoders the fused MLP path can run, and say why when it cannot.

A decoder is fusable when it is an ``nn.Sequential`` (nested Sequentials are flattened) of
``nn.Linear`` layers, each followed by at most one supported elementwise activation
(:mod:`isofast.activations`), optionally ending in a per-sample reshape (``nn.Unflatten`` or
``nn.Flatten``). A wrapper module whose ``forward`` is such a Sequential followed by a reshape can
opt in by defining ``isofast_sequential(self) -> nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from isofast.activations import IDENTITY, Activation, from_module


@dataclass(frozen=True)
class MLPSpec:
    """The layers of a fusable decoder: ``h_l = act_l(h_{l-1} W_l^T + b_l)``, ``l = 1..L``.

    ``weights[l]`` has shape ``(d_l, d_{l-1})``; ``biases[l]`` is ``(d_l,)`` or ``None``.
    """

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor | None, ...]
    activations: tuple[Activation, ...]

    @property
    def in_features(self) -> int:
        return self.weights[0].shape[1]

    @property
    def out_features(self) -> int:
        return self.weights[-1].shape[0]

    def params(self) -> list[Tensor | None]:
        """``[W_1, b_1, W_2, b_2, ...]``: the flat argument list of the MLP autograd functions."""
        return interleave(self.weights, self.biases)


def interleave(weights: Sequence[Tensor | None], biases: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``[w_1, b_1, w_2, b_2, ...]``, the order the MLP autograd functions take parameters in."""
    return [x for pair in zip(weights, biases) for x in pair]


def _flatten(seq: nn.Sequential) -> list[nn.Module]:
    out: list[nn.Module] = []
    for mod in seq:
        out += _flatten(mod) if isinstance(mod, nn.Sequential) else [mod]
    return out


def extract_mlp(decoder: object) -> tuple[MLPSpec | None, str]:
    """``(spec, reason)``: the decoder's layers if it is fusable, else ``None`` and why not."""
    hook = getattr(decoder, "isofast_sequential", None)
    seq = hook() if callable(hook) else decoder
    name = type(decoder).__name__
    if not isinstance(seq, nn.Sequential):
        return None, f"decoder is a {name}, not an nn.Sequential (nor does it define isofast_sequential())"
    modules = _flatten(seq)
    weights: list[Tensor] = []
    biases: list[Tensor | None] = []
    acts: list[Activation] = []
    reshaped = False
    for i, mod in enumerate(modules):
        where = f"module {i} ({type(mod).__name__})"
        if reshaped:
            return None, f"{where} follows the trailing reshape; only a final reshape is allowed"
        if isinstance(mod, nn.Linear):
            weights.append(mod.weight)
            biases.append(mod.bias)
            acts.append(IDENTITY)
            continue
        if isinstance(mod, (nn.Unflatten, nn.Flatten)):
            reshaped = True
            continue
        if isinstance(mod, nn.Dropout) and (mod.p == 0 or not mod.training):
            continue
        act = from_module(mod)
        if act is None:
            return None, f"{where} is not nn.Linear, a supported activation or a trailing reshape"
        if act == IDENTITY:
            continue
        if not weights:
            return None, f"{where}: an activation before the first nn.Linear is not fusable"
        if acts[-1] != IDENTITY:
            return None, f"{where}: two activations in a row are not fusable"
        acts[-1] = act
    if not weights:
        return None, "decoder has no nn.Linear layer"
    for prev, w in zip(weights[:-1], weights[1:]):
        if w.shape[1] != prev.shape[0]:
            return None, f"layer widths do not chain ({tuple(prev.shape)} then {tuple(w.shape)})"
    return MLPSpec(tuple(weights), tuple(biases), tuple(acts)), f"{name} is an MLP of {len(weights)} Linear layers"
