"""The ``"cpu"`` backend: the fused MLP ops of ``csrc/cpu/`` (``mlp_pullback.cpp``, ``mlp_hutchinson.cpp``) (C++ extension, CPU tensors).

Same contract and the same stream-major layout as :mod:`isofast.backends.torch_backend` (its
test oracle); float32 and float64. The ops run in C++: one ATen GEMM per layer over the stacked
``(1 + K) B`` rows and fused, threaded epilogues; the exact estimator's first layer needs no GEMM
for its tangent streams and its last layer reduces straight to the Gram ``J^T J`` (``J^T diag(w) J``
with a ``data_weight``; the Hutchinson chain then starts from ``w * J v``).

Availability needs the compiled extension (see :mod:`isofast._ext`); importing this module never
compiles it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from isofast import _ext
from isofast.activations import Activation
from isofast.backends.base import Backend


def act_args(acts) -> tuple[list[int], list[float], list[float]]:
    """``(codes, coefs, thresholds)``: the activation records as the C++ ops take them."""
    assert all(isinstance(act, Activation) for act in acts)
    params = [act.kernel_params for act in acts]
    return [act.code for act in acts], [c for c, _ in params], [t for _, t in params]


def _grads(grad_z, grad_w, grad_b, has_bias):
    it = iter(grad_b)
    return grad_z, list(grad_w), [next(it) if hb else None for hb in has_bias]


# --- torch.library custom ops ----------------------------------------------------------------
# The extension's four entry points as ``isofast::cpu_*`` custom ops, so that torch.compile traces
# them as opaque nodes with fake (shape-only) implementations instead of breaking the graph at a
# pybind call. Registered once, when the extension first loads (importing isofast loads nothing).
#
# Custom-op outputs may neither alias inputs nor each other, so the wrappers hand back the C++
# ``saved`` lists less the tensors that would: the pullback's ``saved[0]`` (``z`` itself) and the
# Hutchinson's ``saved[3L]`` (the same tensor as ``saved[3L - 1]``, the chain's ``c_L``). The
# backend methods put them back. ``data_weight`` (the diagonal data-space metric, or ``None``) is an
# input of all four: the backward ops receive the forward's again. Backward ops return the bias
# gradients of the biased layers only (no ``None`` outputs).

_registered = False


def _empty(like: torch.Tensor, *shape) -> torch.Tensor:
    return like.new_empty(shape)


def _pullback_forward(z, weights, biases, codes, p0, p1, data_weight=None):
    h, saved = _ext.get().mlp_pullback_forward(z, weights, biases, codes, p0, p1, data_weight)
    return h, list(saved[1:])


def _pullback_backward(grad_h, weights, has_bias, codes, p0, p1, saved, data_weight=None):
    gz, gw, gb = _ext.get().mlp_pullback_backward(grad_h, weights, has_bias, codes, p0, p1, saved, data_weight)
    return gz, list(gw), [g for g, hb in zip(gb, has_bias) if hb]


def _hutchinson_forward(z, probes, weights, biases, codes, p0, p1, data_weight=None):
    stats, saved = _ext.get().mlp_hutchinson_forward(z, probes, weights, biases, codes, p0, p1, data_weight)
    L = len(weights)
    return stats, list(saved[: 3 * L]) + [saved[3 * L + 1]]


def _hutchinson_backward(grad_stats, weights, has_bias, codes, p0, p1, saved, data_weight=None):
    gz, gw, gb = _ext.get().mlp_hutchinson_backward(
        grad_stats, weights, has_bias, codes, p0, p1, saved, data_weight
    )
    return gz, list(gw), [g for g, hb in zip(gb, has_bias) if hb]


def _register_ops() -> None:
    global _registered
    if _registered:
        return
    from torch.library import custom_op, register_fake

    @custom_op("isofast::cpu_mlp_pullback_forward", mutates_args=(), device_types="cpu")
    def pullback_forward(
        z: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
        codes: list[int], p0: list[float], p1: list[float], data_weight: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor]]:
        return _pullback_forward(z, weights, biases, codes, p0, p1, data_weight)

    @register_fake("isofast::cpu_mlp_pullback_forward")
    def _(z, weights, biases, codes, p0, p1, data_weight=None):
        B, m = z.shape
        rows = (m + 1) * B
        saved = [_empty(z, B, weights[0].shape[0])]
        for w in weights[1:]:
            saved += [_empty(z, rows, w.shape[1]), _empty(z, rows, w.shape[0])]
        return _empty(z, B, m, m), saved

    @custom_op("isofast::cpu_mlp_pullback_backward", mutates_args=(), device_types="cpu")
    def pullback_backward(
        grad_h: Tensor, weights: list[Tensor], has_bias: list[bool],
        codes: list[int], p0: list[float], p1: list[float], saved: list[Tensor],
        data_weight: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        return _pullback_backward(grad_h, weights, has_bias, codes, p0, p1, saved, data_weight)

    @register_fake("isofast::cpu_mlp_pullback_backward")
    def _(grad_h, weights, has_bias, codes, p0, p1, saved, data_weight=None):
        z = saved[0]
        return (
            _empty(z, *z.shape),
            [_empty(w, *w.shape) for w in weights],
            [_empty(w, w.shape[0]) for w, hb in zip(weights, has_bias) if hb],
        )

    @custom_op("isofast::cpu_mlp_hutchinson_forward", mutates_args=(), device_types="cpu")
    def hutchinson_forward(
        z: Tensor, probes: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
        codes: list[int], p0: list[float], p1: list[float], data_weight: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor]]:
        return _hutchinson_forward(z, probes, weights, biases, codes, p0, p1, data_weight)

    @register_fake("isofast::cpu_mlp_hutchinson_forward")
    def _(z, probes, weights, biases, codes, p0, p1, data_weight=None):
        B, m = z.shape
        K = probes.shape[1]
        rows = (K + 1) * B
        saved = []
        for w in weights:
            saved += [_empty(z, rows, w.shape[1]), _empty(z, rows, w.shape[0])]
        saved += [_empty(z, K * B, w.shape[0]) for w in weights[:-1]]
        # The last layer's tangent rows: a view past the B primal rows of a ((K + 1) B, D) tensor.
        saved.append(_empty(z, rows, weights[-1].shape[0]).narrow(0, B, K * B))
        saved.append(_empty(z, K * B, m))
        return _empty(z, B, K, 2), saved

    @custom_op("isofast::cpu_mlp_hutchinson_backward", mutates_args=(), device_types="cpu")
    def hutchinson_backward(
        grad_stats: Tensor, weights: list[Tensor], has_bias: list[bool],
        codes: list[int], p0: list[float], p1: list[float], saved: list[Tensor],
        data_weight: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        return _hutchinson_backward(grad_stats, weights, has_bias, codes, p0, p1, saved, data_weight)

    @register_fake("isofast::cpu_mlp_hutchinson_backward")
    def _(grad_stats, weights, has_bias, codes, p0, p1, saved, data_weight=None):
        B = grad_stats.shape[0]
        w0 = weights[0]
        return (
            _empty(w0, B, w0.shape[1]),
            [_empty(w, *w.shape) for w in weights],
            [_empty(w, w.shape[0]) for w, hb in zip(weights, has_bias) if hb],
        )

    _registered = True


def _call(name: str, *args):
    """Run op ``name``: as the ``isofast::cpu_<name>`` custom op while torch.compile traces, and
    as the plain wrapper in eager mode (the same code, without the custom-op dispatch overhead)."""
    if not _registered:  # a backend used without availability(): load the extension now
        _ext.get()
        _register_ops()
    if torch.compiler.is_compiling():
        return getattr(torch.ops.isofast, "cpu_" + name)(*args)
    return _EAGER[name](*args)


_EAGER = {
    "mlp_pullback_forward": _pullback_forward,
    "mlp_pullback_backward": _pullback_backward,
    "mlp_hutchinson_forward": _hutchinson_forward,
    "mlp_hutchinson_backward": _hutchinson_backward,
}


class CpuBackend(Backend):
    name = "cpu"
    diagonal_data_metric = True

    def availability(self) -> tuple[bool, str]:
        module, why = _ext.load()
        if module is not None:
            _register_ops()
        return (module is not None), why

    def supports(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
        if torch.device(device).type != "cpu":
            return False, f"the cpu backend runs CPU tensors only, got device {device}"
        if dtype not in (torch.float32, torch.float64):
            return False, f"the cpu backend runs float32 and float64, got {dtype}"
        return True, ""

    def build(self) -> tuple[bool, str]:
        return _ext.build()

    def mlp_pullback_forward(self, z, weights, biases, acts, data_weight=None):  # type: ignore[override]
        h, saved = _call("mlp_pullback_forward", z, list(weights), list(biases), *act_args(acts), data_weight)
        return h, (z, *saved)

    def mlp_pullback_backward(self, grad_h, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        out = _call("mlp_pullback_backward", grad_h, list(weights), list(has_bias), *act_args(acts), list(saved),
                    data_weight)
        return _grads(*out, has_bias)

    def mlp_hutchinson_forward(self, z, probes, weights, biases, acts, data_weight=None):  # type: ignore[override]
        stats, saved = _call("mlp_hutchinson_forward", z, probes, list(weights), list(biases), *act_args(acts),
                             data_weight)
        n = 3 * len(weights)
        return stats, (*saved[:n], saved[n - 1], saved[n])

    def mlp_hutchinson_backward(self, grad_stats, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        out = _call(
            "mlp_hutchinson_backward", grad_stats, list(weights), list(has_bias), *act_args(acts), list(saved),
            data_weight,
        )
        return _grads(*out, has_bias)


BACKEND = CpuBackend()
