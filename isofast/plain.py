"""Which decoders are provably the plain computation of their layers, and why not.

The fused paths (:mod:`isofast.mlp`, :mod:`isofast.streams`) read a decoder's layers instead of
calling its modules, so they take only what calling it would compute anyway: exact classes (a
subclass may override ``forward``), no instance-level ``forward``, no module hooks and no global
module hooks (hook-based ``spectral_norm`` and ``weight_norm`` are pre-hooks). Parametrized
layers (``torch.nn.utils.parametrize``) are plain: reading ``weight`` evaluates the
parametrization, as the module's forward would.
"""

from __future__ import annotations

import torch.nn.modules.module as _module
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

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


def global_hooks() -> str | None:
    """Why global module hooks (``torch.nn.modules.module.register_module_*_hook``) block fusion."""
    for kind, attr in _GLOBAL_HOOKS.items():
        if getattr(_module, attr):
            return f"a global module {kind} is registered (torch.nn.modules.module.register_module_*_hook)"
    return None


def hooks(mod: nn.Module) -> str | None:
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
                        "torch.nn.utils.parametrizations.spectral_norm to keep the fused paths)")
            if isinstance(hook, WeightNorm):
                return ("has a hook-based torch.nn.utils.weight_norm (use "
                        "torch.nn.utils.parametrizations.weight_norm to keep the fused paths)")
        return f"has a module {name} ({len(hooks)} registered); the stream and fused paths would not run it"
    return None


def parametrized(mod: nn.Module) -> bool:
    # parametrize registers its ModuleDict as a child; looking there first spares the plain layers
    # nn.Module.__getattr__'s AttributeError (plan() runs on every call).
    return "parametrizations" in mod._modules and parametrize.is_parametrized(mod)


def base_type(mod: nn.Module) -> type:
    """``type(mod)``, or for a parametrized module the class parametrize derived it from."""
    cls = type(mod)
    return cls.__mro__[1] if parametrized(mod) else cls


def where(path: str, mod: nn.Module) -> str:
    return f"module {path} ({type(mod).__name__})"


def _leaves(seq: nn.Sequential, verb: str, prefix: str = "") -> tuple[list[tuple[str, nn.Module]], str | None]:
    """``([(path, module), ...], why_not)``: leaves of nested exact Sequentials, or why not."""
    out: list[tuple[str, nn.Module]] = []
    for i, mod in enumerate(seq._modules.values()):
        why = hooks(mod)
        if why is not None:
            return out, f"{where(prefix + str(i), mod)} {why}"
        if type(mod) is nn.Sequential:
            inner, why = _leaves(mod, verb, f"{prefix}{i}.")
            out += inner
            if why is not None:
                return out, why
        elif isinstance(mod, nn.Sequential):
            return out, (f"{where(prefix + str(i), mod)} is a subclass of nn.Sequential (its forward may differ); "
                         f"only nn.Sequential itself is {verb}")
        else:
            out.append((prefix + str(i), mod))
    return out, None


def plain_leaves(decoder: object, verb: str) -> tuple[list[tuple[str, nn.Module]] | None, str]:
    """``([(path, module), ...], "")``: the leaves of ``decoder`` (an exact ``nn.Sequential``, or a
    wrapper's ``isofast_sequential()``; nested Sequentials flattened) when calling it is their plain
    computation, else ``(None, why)``. ``verb`` names the path in messages ("fused", "carried")."""
    why = global_hooks()
    if why is not None:
        return None, why
    name = type(decoder).__name__
    hook = getattr(decoder, "isofast_sequential", None)
    if callable(hook):
        if isinstance(decoder, nn.Module):
            why = hooks(decoder)
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
                              f"only nn.Sequential itself is {verb}")
            return None, f"decoder is a {name}, not an nn.Sequential (nor does it define isofast_sequential())"
    why = hooks(seq)
    if why is not None:
        return None, f"decoder ({type(seq).__name__}) {why}"
    modules, why = _leaves(seq, verb)
    if why is not None:
        return None, why
    return modules, ""
