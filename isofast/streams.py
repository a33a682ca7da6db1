"""The fused Sequential path: tangent streams carried as extra rows through a decoder's own layers.

A decoder qualifies when it is an ``nn.Sequential`` (nested Sequentials are flattened) of exactly
these module types, with no hooks: ``Linear``, ``Conv{1,2,3}d`` (zero padding),
``ConvTranspose{1,2,3}d``, ``Upsample`` (and its ``UpsamplingNearest2d`` / ``UpsamplingBilinear2d``
forms), ``Flatten`` / ``Unflatten``, the elementwise activations of :mod:`isofast.activations`,
and ``Identity`` / inactive ``Dropout``. :func:`extract_sequential` says why a decoder does not.

For codes ``z (B, *latent)`` and tangent seeds ``V (B, K, *latent)`` the streams are stacked
stream-major along the batch, rows ``[0, B)`` the primal and rows ``[B k, B (k + 1))`` the tangent
of seed ``k`` (``k = 1..K``), so every layer is one call over ``B (1 + K)`` rows:

- an affine layer ``x -> W x + b`` runs over every row without its bias, which is then added to the
  primal rows only (the tangent of ``W x + b`` is ``W t``);
- a linear per-sample map (upsampling, reshapes) runs unchanged over every row;
- an elementwise activation maps the primal ``p`` to ``s(p)`` and gates every tangent ``t`` by
  ``s'(p)``.

The streams leave the last layer as the output ``f(z)`` and the tangent images ``J V``. This is a
first-order autograd graph of plain torch ops: reverse mode through it differentiates anything
computed from the tangent images (the Gram ``(J V)(J V)^T``, its squared norms) with respect to
``z`` and the parameters, with no double backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from isofast.activations import Activation, from_module
from isofast.plain import plain_leaves, where

#: Affine layer types and their bias-free functional form ``(module, x) -> W x``.
_AFFINE: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    nn.Linear: lambda mod, x: F.linear(x, mod.weight),
    **{
        cls: (lambda fn: lambda mod, x: fn(x, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups))(fn)
        for cls, fn in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d))
    },
    **{
        cls: (lambda fn: lambda mod, x: fn(
            x, mod.weight, None, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation))(fn)
        for cls, fn in ((nn.ConvTranspose1d, F.conv_transpose1d), (nn.ConvTranspose2d, F.conv_transpose2d),
                        (nn.ConvTranspose3d, F.conv_transpose3d))
    },
}
_CHANNELS_LAST = (nn.Conv2d, nn.ConvTranspose2d)
#: Linear per-sample maps run unchanged over all rows (every interpolation mode is linear in its input).
_LINEAR_MAPS = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.Flatten, nn.Unflatten)
_INTERPOLATION = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")
SUPPORTED = ("Linear, Conv{1,2,3}d, ConvTranspose{1,2,3}d, Upsample, Flatten, Unflatten, "
             "an elementwise activation, Identity or inactive Dropout")
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _pixel_expansion(mod: nn.Module, x: Tensor) -> bool:
    """Whether ``mod`` maps a one-pixel input by a plain matrix product: a transposed convolution
    with no padding, groups or dilation on a ``1 x ... x 1`` image (a DCGAN-style first layer)."""
    return (type(mod) in _TRANSPOSED and all(n == 1 for n in x.shape[2:]) and not any(mod.padding)
            and not any(mod.output_padding) and mod.groups == 1 and all(d == 1 for d in mod.dilation))


def _affine(mod: nn.Module, x: Tensor, bias: bool) -> Tensor:
    """``W x`` (``W x + b`` with ``bias``) of an affine layer over all rows of ``x``. A one-pixel
    transposed convolution is the GEMM ``x (N, C_in) @ W (C_in, C_out * k)``: the same sums as the
    convolution call, which oneDNN runs several times slower for this shape."""
    if _pixel_expansion(mod, x):
        w = mod.weight  # (C_in, C_out, *k), multiplied as (C_in, *k, C_out) so the output is channels-last
        nd = w.dim() - 2
        wl = w.permute(0, *range(2, 2 + nd), 1)
        out = (x.flatten(1) @ wl.reshape(w.shape[0], -1)).view(x.shape[0], *wl.shape[1:])
        out = out.permute(0, nd + 1, *range(1, nd + 1))
        return out + mod.bias.view(-1, *[1] * nd) if bias and mod.bias is not None else out
    if bias:
        return mod(x)
    return _AFFINE[type(mod)](mod, x)


@dataclass(frozen=True)
class Step:
    """One layer of the stream forward: ``kind`` is ``"affine"``, ``"map"`` or ``"act"``."""

    kind: str
    module: nn.Module
    act: Activation | None = None


@dataclass(frozen=True)
class SequentialSpec:
    """The layers of a decoder the stream path carries, in order (inactive modules dropped)."""

    steps: tuple[Step, ...]

    def params(self) -> list[Tensor]:
        return [p for s in self.steps for p in s.module.parameters()]


def _step(mod: nn.Module) -> tuple[Step | None, str]:
    """The step for one module, or ``None`` and why it cannot be carried (``""``: skip it)."""
    cls = type(mod)
    if cls in _AFFINE:
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            return None, f"uses padding_mode={mod.padding_mode!r}; the stream path carries zero padding only"
        return Step("affine", mod), ""
    if cls in _LINEAR_MAPS:
        if isinstance(mod, nn.Upsample) and mod.mode not in _INTERPOLATION:
            return None, f"interpolates with mode={mod.mode!r}; carried modes are {', '.join(_INTERPOLATION)}"
        if isinstance(mod, nn.Flatten) and mod.start_dim == 0:
            return None, "flattens the batch dimension (start_dim=0)"
        if isinstance(mod, nn.Unflatten) and mod.dim == 0:
            return None, "unflattens the batch dimension (dim=0)"
        return Step("map", mod), ""
    if cls is nn.Dropout:
        if mod.training and mod.p > 0:
            return None, "is Dropout in training mode (a random mask per call)"
        return None, ""
    act = from_module(mod)
    if act is not None and cls.__module__.startswith("torch.nn"):
        return (None, "") if act.kind == "identity" else (Step("act", mod, act), "")
    return None, f"is not one of {SUPPORTED} (exact types)"


def extract_sequential(decoder: object) -> tuple[SequentialSpec | None, str]:
    """``(spec, reason)``: the decoder's layers if the stream path can carry it, else ``None``
    and why not. A wrapper may opt in with ``isofast_sequential(self) -> nn.Sequential`` as for
    :func:`isofast.mlp.extract_mlp`."""
    name = type(decoder).__name__
    modules, why = plain_leaves(decoder, "carried")
    if modules is None:
        return None, why
    steps: list[Step] = []
    for path, mod in modules:
        where_ = where(path, mod)
        step, why = _step(mod)
        if why:
            return None, f"{where_} {why}"
        if step is not None:
            steps.append(step)
    n_affine = sum(s.kind == "affine" for s in steps)
    if n_affine == 0:
        return None, "decoder has no Linear or convolution layer"
    kinds = sorted({type(s.module).__name__ for s in steps if s.kind != "act"})
    return SequentialSpec(tuple(steps)), (
        f"{name} is an nn.Sequential of {len(steps)} stream-carried layers ({', '.join(kinds)} and activations)")


def _mul_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a * b`` in place. torch.compile refuses ``out=`` on non-contiguous (channels-last)
    views, and fuses the copy of the product into ``out`` anyway, so it gets the copy."""
    if torch.compiler.is_compiling():
        out.copy_(a * b)
    else:
        torch.mul(a, b, out=out)


class _Gate(torch.autograd.Function):
    """``rows ((1 + K) B, ...) -> ((1 + K) B, ...)``: ``p = rows[:B] + b``, primal rows ``s(p)``,
    tangent rows ``s'(p) t``, written into one buffer (no concatenation, so the next layer call
    takes it as is). Backward: ``t_bar = s'(p) out_bar_t``,
    ``p_bar = s'(p) out_bar_p + s''(p) sum_k t_k out_bar_k`` and ``b_bar = p_bar`` summed to the
    bias's shape. For activations with ``s'' != 0``; :class:`_SlopeGate` takes the others."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, bias: Tensor | None, act: Activation, bsz: int) -> Tensor:  # type: ignore[override]
        p = rows[:bsz] if bias is None else rows[:bsz] + bias
        value, slope = act.derivatives(p, order=1)
        out = torch.empty_like(rows)
        out[:bsz] = value
        _mul_into(slope, rows[bsz:].unflatten(0, (-1, bsz)), out[bsz:].unflatten(0, (-1, bsz)))
        ctx.save_for_backward(p, rows)
        ctx.act, ctx.bsz, ctx.bias_shape = act, bsz, None if bias is None else bias.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        p, rows = ctx.saved_tensors
        bsz, act = ctx.bsz, ctx.act
        _, slope, curve = act.derivatives(p, order=2)
        grad_t = grad[bsz:].unflatten(0, (-1, bsz))
        grad_rows = torch.empty_like(grad)
        _mul_into(slope, grad_t, grad_rows[bsz:].unflatten(0, (-1, bsz)))
        grad_p = slope * grad[:bsz] + curve * (rows[bsz:].unflatten(0, (-1, bsz)) * grad_t).sum(0)
        grad_rows[:bsz] = grad_p
        grad_bias = None if ctx.bias_shape is None else grad_p.sum_to_size(ctx.bias_shape)
        return grad_rows, grad_bias, None, None


class _SlopeGate(torch.autograd.Function):
    """The gate of a piecewise-linear activation (``s'' = 0``: ReLU, leaky ReLU), in place.

    ``rows ((1 + K) B, ...)``, the previous layer's fresh output (no other node saves it), is
    gated where it lies: ``p = rows[:B] + b`` becomes ``s(p)`` and every tangent row is multiplied
    by ``s'(p)``; only ``s'(p)`` is saved. Backward: every stream's gradient times ``s'(p)`` (for
    the primal ``d s(p) / dp = s'(p)``, as ``s''`` vanishes), ``b_bar`` the primal's summed. One
    output-sized buffer less per layer and per direction than :class:`_Gate`, which matters on the
    CPU, where every fresh buffer above glibc's mmap threshold is paid in page faults.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, bias: Tensor | None, act: Activation, bsz: int) -> Tensor:  # type: ignore[override]
        streams = rows.unflatten(0, (-1, bsz))
        p = streams[0]
        if bias is not None:
            p.add_(bias)
        slope = act.slope(p)
        streams[1:].mul_(slope)
        act.apply_(p)
        ctx.mark_dirty(rows)
        ctx.save_for_backward(slope)
        ctx.bsz, ctx.bias_shape = bsz, None if bias is None else bias.shape
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (slope,) = ctx.saved_tensors
        grad_streams = grad.unflatten(0, (-1, ctx.bsz)) * slope
        grad_bias = None if ctx.bias_shape is None else grad_streams[0].sum_to_size(ctx.bias_shape)
        return grad_streams.flatten(0, 1), grad_bias, None, None


def _gate(rows: Tensor, bias: Tensor | None, act: Activation, bsz: int) -> Tensor:
    gate = _Gate if act.has_second_derivative else _SlopeGate
    return gate.apply(rows, bias, act, bsz)


def _add_primal(rows: Tensor, bias: Tensor, bsz: int) -> Tensor:
    """``rows`` with ``bias`` added to the primal rows ``[0, B)`` only (a bias no activation
    follows), in place: ``rows`` is the affine layer's fresh output."""
    rows[:bsz] += bias
    return rows


def _channels_last(rows: Tensor) -> Tensor:
    """``rows (N, C, H, W)`` with channels-last strides. A ``1 x 1`` image is contiguous in both
    formats, and oneDNN then reads it as the contiguous one and returns a contiguous output: the
    strides are spelled out so the layer's output is channels-last too."""
    rows = rows.contiguous(memory_format=torch.channels_last)
    n, c, h, w = rows.shape
    return rows.as_strided(rows.shape, (c * h * w, 1, w * c, c)) if h == w == 1 else rows


def tangent_images(spec: SequentialSpec, z: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(z) (B, D), J V (B, K, D))`` for codes ``z (B, *latent)`` and seeds ``V (B, K, *latent)``.

    Outputs are flattened per sample; ``J V`` is a stream-major view (``(K, B, D)`` transposed).
    Differentiable in ``z``, ``vectors`` and the parameters by ordinary reverse mode.
    """
    bsz, k = vectors.shape[:2]
    rows = torch.cat([z.unsqueeze(0), vectors.transpose(0, 1)]).flatten(0, 1)
    bias: Tensor | None = None  # the last affine layer's bias, until an activation or a map takes it
    for step in spec.steps:
        if step.kind == "act":
            rows, bias = _gate(rows, bias, step.act, bsz), None
            continue
        if bias is not None:
            rows, bias = _add_primal(rows, bias, bsz), None
        if step.kind == "map":
            rows = step.module(rows)
        else:
            mod = step.module
            if type(mod) in _CHANNELS_LAST and rows.device.type == "cpu":
                # oneDNN computes 2-d convolutions channels-last and copies a contiguous input's
                # result back (a full extra pass per layer): keep the rows channels-last instead.
                rows = _channels_last(rows)
            rows = _affine(mod, rows, bias=False)
            if mod.bias is not None:
                # Linear biases broadcast over the last dim, convolution biases over channels (dim 1).
                bias = mod.bias if type(mod) is nn.Linear else mod.bias.view(-1, *[1] * (rows.dim() - 2))
        if rows.shape[0] != bsz * (1 + k):
            raise ValueError(f"{type(step.module).__name__} changed the number of rows: the stream path needs per-sample layers")
    if bias is not None:
        rows = _add_primal(rows, bias, bsz)
    primal, tangents = rows.flatten(1).split([bsz, k * bsz])
    return primal, tangents.unflatten(0, (k, bsz)).transpose(0, 1)


class Carrier:
    """The primal pass of a decoder's layers, kept so tangent streams can be carried through it
    later: ``Carrier(spec, z).primal (B, D)``, then ``tangents(V (B, K, *latent)) -> (B, K, D)``
    as often as needed.

    For tangents that depend on the primal's own VJP (Hutchinson's ``J (J^T J u)``) and so cannot
    ride along with it as rows of one call: each later stream costs its ``B K`` rows through the
    layers (no bias, gated by ``s'`` of the recorded pre-activations, which stay in the graph so a
    smooth activation's ``s''`` reaches the parameters), never the primal again.
    """

    def __init__(self, spec: SequentialSpec, z: Tensor) -> None:
        self.spec, self.bsz = spec, z.shape[0]
        self.pre: list[Tensor] = []  # pre-activation of every "act" step, in order
        x = z
        for step in spec.steps:
            if step.kind == "act":
                self.pre.append(x)
                x = step.module(x)  # the module's own (native) kernel; its derivatives are recorded below
            else:
                if type(step.module) in _CHANNELS_LAST and x.device.type == "cpu":
                    x = _channels_last(x)
                x = step.module(x) if step.kind == "map" else _affine(step.module, x, bias=True)
        self.primal = x.flatten(1)
        self._slopes: list[Tensor] | None = None

    def _slope_list(self) -> list[Tensor]:
        """``s'`` of every recorded pre-activation, computed once for all streams: a constant mask
        for piecewise-linear activations, a function of the pre-activation (in the graph, so a
        smooth activation's ``s''`` reaches the parameters) otherwise."""
        if self._slopes is None:
            acts = [st.act for st in self.spec.steps if st.kind == "act"]
            self._slopes = [a.derivatives(p, order=1)[1] if a.has_second_derivative else a.slope(p.detach())
                            for a, p in zip(acts, self.pre)]  # type: ignore[union-attr]
        return self._slopes

    def tangents(self, vectors: Tensor) -> Tensor:
        """``J V (B, K, D)`` for ``vectors (B, K, *latent)``, differentiable by reverse mode."""
        k, bsz = vectors.shape[1], self.bsz
        rows = vectors.transpose(0, 1).flatten(0, 1)
        slopes = iter(self._slope_list())
        fresh = False  # rows is a buffer of this pass (not the caller's vectors)
        for step in self.spec.steps:
            if step.kind == "act":
                slope = next(slopes)
                if k == 1 and fresh and not slope.requires_grad:
                    # a constant mask on this pass's own buffer: in place (on rows itself; through a
                    # view autograd would clone and copy the rows back in the backward)
                    rows.mul_(slope)
                else:
                    rows, fresh = (rows.unflatten(0, (k, bsz)) * slope).flatten(0, 1), True
            elif step.kind == "map":
                rows = step.module(rows)
            else:
                fresh = True
                if type(step.module) in _CHANNELS_LAST and rows.device.type == "cpu":
                    rows = _channels_last(rows)
                rows = _affine(step.module, rows, bias=False)
        return rows.flatten(1).unflatten(0, (k, bsz)).transpose(0, 1)


#: Estimators the stream path computes: all need only the tangent images and, for Hutchinson, a
#: plain VJP through them (:mod:`isofast.generic` reduces them, as for any decoder).
ESTIMATORS = ("exact", "forward", "hutchinson")

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
              nn.ConvTranspose3d: 3}


def _check_inputs(spec: SequentialSpec, z: Tensor) -> None:
    params = spec.params()
    if params and params[0].dtype != z.dtype:
        raise TypeError(f"z must have the decoder's dtype {params[0].dtype}, got {z.dtype}")
    if params and params[0].device != z.device:
        raise ValueError(f"z must be on the decoder's device {params[0].device}, got {z.device}")
    first = spec.steps[0].module
    if type(first) is nn.Linear and z.shape[-1] != first.in_features:
        raise ValueError(f"z has last dimension {z.shape[-1]} but the decoder's first nn.Linear expects {first.in_features}")
    if type(first) in _CONV_DIMS:
        n = _CONV_DIMS[type(first)]
        if z.dim() != n + 2 or z.shape[1] != first.in_channels:
            raise ValueError(f"z must have shape (B, {first.in_channels}, <{n} spatial dims>) for the decoder's "
                             f"first {type(first).__name__}, got {tuple(z.shape)}")


def plan_sequential(decoder: object, z: Tensor, estimator: str, mlp_why: str,
                    graph_vjp: bool = False) -> tuple[SequentialSpec | None, str]:
    """The planner's question: does this call take the stream path? ``(spec, reason)``, or
    ``(None, why not)`` where ``mlp_why`` is why the fused MLP path did not take it. ``graph_vjp``:
    the call differentiates a VJP again (the path length's Hutchinson recipe), which runs the
    decoder itself."""
    spec, why = extract_sequential(decoder)
    if spec is None:
        sequential = isinstance(decoder, nn.Sequential) or callable(getattr(decoder, "isofast_sequential", None))
        return None, f"{mlp_why}; stream path: {why}" if sequential else mlp_why
    if estimator not in ESTIMATORS or graph_vjp:
        return None, (f"{why}, but estimator {estimator!r} differentiates a VJP through the decoder, which the "
                      f"stream path does not compute")
    _check_inputs(spec, z)
    return spec, why
