"""Recognise decoders the fused MLP path can run, and say why when it cannot.

A decoder is fusable when it is an ``nn.Sequential`` (nested Sequentials are flattened) of
``nn.Linear`` layers, each followed by at most one supported elementwise activation
(:mod:`isofast.activations`), optionally ending in a per-sample reshape (``nn.Unflatten`` or
``nn.Flatten``). A wrapper module whose ``forward`` is such a Sequential followed by a reshape can
opt in by defining ``isofast_sequential(self) -> nn.Sequential``.

The fused path reads weights instead of calling modules, so it fuses only what is provably the
plain computation: exact classes (a subclass may override ``forward``), no instance-level
``forward``, no module hooks and no global module hooks (hook-based ``spectral_norm`` and
``weight_norm`` are pre-hooks). Parametrized ``nn.Linear`` layers
(``torch.nn.utils.parametrize``) are fused: reading ``weight`` evaluates the parametrization,
as the module's forward would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from isofast.activations import IDENTITY, Activation, from_module
from isofast.plain import base_type, parametrized, plain_leaves, where


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

    def to(self, dtype: torch.dtype) -> MLPSpec:
        """The same layers with parameters cast to ``dtype`` (differentiable casts; a no-op where
        they already have it)."""
        return MLPSpec(tuple(w.to(dtype) for w in self.weights),
                       tuple(None if b is None else b.to(dtype) for b in self.biases), self.activations)

    def params(self) -> list[Tensor | None]:
        """``[W_1, b_1, W_2, b_2, ...]``: the flat argument list of the MLP autograd functions."""
        return interleave(self.weights, self.biases)


def interleave(weights: Sequence[Tensor | None], biases: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``[w_1, b_1, w_2, b_2, ...]``, the order the MLP autograd functions take parameters in."""
    return [x for pair in zip(weights, biases) for x in pair]


def _reshape_ok(mod: nn.Module) -> bool:
    """Whether a trailing Flatten/Unflatten reshapes each sample (leaves the batch dimension alone)."""
    if type(mod) is nn.Flatten:
        return mod.start_dim in (1, -1) and mod.end_dim in (1, -1)
    return type(mod) is nn.Unflatten and mod.dim in (1, -1)


def extract_mlp(decoder: object) -> tuple[MLPSpec | None, str]:
    """``(spec, reason)``: the decoder's layers if it is fusable, else ``None`` and why not."""
    name = type(decoder).__name__
    modules, why = plain_leaves(decoder, "fused")
    if modules is None:
        return None, why
    weights: list[Tensor] = []
    biases: list[Tensor | None] = []
    acts: list[Activation] = []
    reshaped = False
    for path, mod in modules:
        if reshaped:
            return None, f"{where(path, mod)} follows the trailing reshape; only a final reshape is allowed"
        if base_type(mod) is nn.Linear:
            weights.append(mod.weight)  # evaluates a parametrization, as Linear.forward would
            biases.append(mod.bias)
            acts.append(IDENTITY)
            continue
        if parametrized(mod):
            return None, f"{where(path, mod)} is parametrized; only parametrized nn.Linear layers are fused"
        if type(mod) in (nn.Unflatten, nn.Flatten):
            if not _reshape_ok(mod):
                return None, f"{where(path, mod)} reshapes the batch dimension; only a per-sample reshape (dim 1) is fused"
            reshaped = True
            continue
        if type(mod) is nn.Dropout and (mod.p == 0 or not mod.training):
            continue
        act = from_module(mod)
        if act is None:
            return None, (f"{where(path, mod)} is not nn.Linear, a supported activation or a trailing reshape "
                          "(exact classes only: a subclass may change forward)")
        if act == IDENTITY:
            continue
        if not weights:
            return None, f"{where(path, mod)}: an activation before the first nn.Linear is not fusable"
        if acts[-1] != IDENTITY:
            return None, f"{where(path, mod)}: two activations in a row are not fusable"
        acts[-1] = act
    if not weights:
        return None, "decoder has no nn.Linear layer"
    for prev, w in zip(weights[:-1], weights[1:]):
        if w.shape[1] != prev.shape[0]:
            return None, f"layer widths do not chain ({tuple(prev.shape)} then {tuple(w.shape)})"
    return MLPSpec(tuple(weights), tuple(biases), tuple(acts)), f"{name} is an MLP of {len(weights)} Linear layers"
