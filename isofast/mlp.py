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
import torch.nn.modules.module as _module
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

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


#: Hook dicts a module call runs: any entry means the call is not the plain computation.
_HOOK_NAMES = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}
_GLOBAL_HOOKS = {
    "forward pre-hook": "_global_forward_pre_hooks",
    "forward hook": "_global_forward_hooks",
    "backward pre-hook": "_global_backward_pre_hooks",
    "backward hook": "_global_backward_hooks",
}


def _global_hooks() -> str | None:
    """Why global module hooks (``torch.nn.modules.module.register_module_*_hook``) block fusion."""
    for kind, attr in _GLOBAL_HOOKS.items():
        if getattr(_module, attr):
            return f"a global module {kind} is registered (torch.nn.modules.module.register_module_*_hook)"
    return None


def _hooks(mod: nn.Module) -> str | None:
    """Why ``mod``'s own hooks or instance ``forward`` mean calling it is not its class's computation."""
    d = mod.__dict__
    if not (d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"] or d["_backward_hooks"]
            or "forward" in d):
        return None  # the common case, checked first: plan() runs on every call
    if "forward" in d:
        return "has an instance-level forward"
    for attr, name in _HOOK_NAMES.items():
        hooks = d[attr]
        if not hooks:
            continue
        for hook in hooks.values():
            if isinstance(hook, SpectralNorm):
                return ("has a hook-based torch.nn.utils.spectral_norm (use "
                        "torch.nn.utils.parametrizations.spectral_norm to keep the fused path)")
            if isinstance(hook, WeightNorm):
                return ("has a hook-based torch.nn.utils.weight_norm (use "
                        "torch.nn.utils.parametrizations.weight_norm to keep the fused path)")
        return f"has a module {name} ({len(hooks)} registered); the fused path would not run it"
    return None


def _parametrized(mod: nn.Module) -> bool:
    # parametrize registers its ModuleDict as a child; looking there first spares the plain layers
    # nn.Module.__getattr__'s AttributeError (plan() runs on every call).
    return "parametrizations" in mod._modules and parametrize.is_parametrized(mod)


def _base_type(mod: nn.Module) -> type:
    """``type(mod)``, or for a parametrized module the class parametrize derived it from."""
    cls = type(mod)
    return cls.__mro__[1] if _parametrized(mod) else cls


def _where(path: str, mod: nn.Module) -> str:
    return f"module {path} ({type(mod).__name__})"


def _flatten(seq: nn.Sequential, prefix: str = "") -> tuple[list[tuple[str, nn.Module]], str | None]:
    """``([(path, module), ...], why_not)``: leaves of nested exact Sequentials, or why not."""
    out: list[tuple[str, nn.Module]] = []
    for i, mod in enumerate(seq._modules.values()):
        why = _hooks(mod)
        if why is not None:
            return out, f"{_where(prefix + str(i), mod)} {why}"
        if type(mod) is nn.Sequential:
            inner, why = _flatten(mod, f"{prefix}{i}.")
            out += inner
            if why is not None:
                return out, why
        elif isinstance(mod, nn.Sequential):
            return out, (f"{_where(prefix + str(i), mod)} is a subclass of nn.Sequential (its forward may differ); "
                         "only nn.Sequential itself is fused")
        else:
            out.append((prefix + str(i), mod))
    return out, None


def _reshape_ok(mod: nn.Module) -> bool:
    """Whether a trailing Flatten/Unflatten reshapes each sample (leaves the batch dimension alone)."""
    if type(mod) is nn.Flatten:
        return mod.start_dim in (1, -1) and mod.end_dim in (1, -1)
    return type(mod) is nn.Unflatten and mod.dim in (1, -1)


def extract_mlp(decoder: object) -> tuple[MLPSpec | None, str]:
    """``(spec, reason)``: the decoder's layers if it is fusable, else ``None`` and why not."""
    why = _global_hooks()
    if why is not None:
        return None, why
    name = type(decoder).__name__
    hook = getattr(decoder, "isofast_sequential", None)
    if callable(hook):
        if isinstance(decoder, nn.Module):
            why = _hooks(decoder)
            if why is not None:
                return None, f"decoder ({name}) {why}"
        seq = hook()
        if type(seq) is not nn.Sequential:
            return None, f"{name}.isofast_sequential() returned a {type(seq).__name__}, not an nn.Sequential"
    else:
        seq = decoder
        if type(seq) is not nn.Sequential:
            if isinstance(seq, nn.Sequential):
                return None, (f"decoder is a {name}, a subclass of nn.Sequential (its forward may differ); "
                              "only nn.Sequential itself is fused")
            return None, f"decoder is a {name}, not an nn.Sequential (nor does it define isofast_sequential())"
    why = _hooks(seq)
    if why is not None:
        return None, f"decoder ({type(seq).__name__}) {why}"
    modules, why = _flatten(seq)
    if why is not None:
        return None, why
    weights: list[Tensor] = []
    biases: list[Tensor | None] = []
    acts: list[Activation] = []
    reshaped = False
    for path, mod in modules:
        if reshaped:
            return None, f"{_where(path, mod)} follows the trailing reshape; only a final reshape is allowed"
        if _base_type(mod) is nn.Linear:
            weights.append(mod.weight)  # evaluates a parametrization, as Linear.forward would
            biases.append(mod.bias)
            acts.append(IDENTITY)
            continue
        if _parametrized(mod):
            return None, f"{_where(path, mod)} is parametrized; only parametrized nn.Linear layers are fused"
        if type(mod) in (nn.Unflatten, nn.Flatten):
            if not _reshape_ok(mod):
                return None, f"{_where(path, mod)} reshapes the batch dimension; only a per-sample reshape (dim 1) is fused"
            reshaped = True
            continue
        if type(mod) is nn.Dropout and (mod.p == 0 or not mod.training):
            continue
        act = from_module(mod)
        if act is None:
            return None, (f"{_where(path, mod)} is not nn.Linear, a supported activation or a trailing reshape "
                          "(exact classes only: a subclass may change forward)")
        if act == IDENTITY:
            continue
        if not weights:
            return None, f"{_where(path, mod)}: an activation before the first nn.Linear is not fusable"
        if acts[-1] != IDENTITY:
            return None, f"{_where(path, mod)}: two activations in a row are not fusable"
        acts[-1] = act
    if not weights:
        return None, "decoder has no nn.Linear layer"
    for prev, w in zip(weights[:-1], weights[1:]):
        if w.shape[1] != prev.shape[0]:
            return None, f"layer widths do not chain ({tuple(prev.shape)} then {tuple(w.shape)})"
    return MLPSpec(tuple(weights), tuple(biases), tuple(acts)), f"{name} is an MLP of {len(weights)} Linear layers"
