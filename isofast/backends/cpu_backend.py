"""The ``"cpu"`` backend: the fused MLP ops of ``csrc/mlp_cpu.cpp`` (C++ extension, CPU tensors).

Same contract and the same stream-major layout as :mod:`isofast.backends.torch_backend` (its
test oracle); float32 and float64. The ops run in C++: one ATen GEMM per layer over the stacked
``(1 + K) B`` rows and fused, threaded epilogues; the exact estimator's first layer needs no GEMM
for its tangent streams and its last layer reduces straight to the Gram ``J^T J``.

Availability needs the compiled extension (see :mod:`isofast._ext`); importing this module never
compiles it.
"""

from __future__ import annotations

import torch

from isofast import _ext
from isofast.activations import Activation
from isofast.backends.base import Backend


def act_args(acts) -> tuple[list[int], list[float], list[float]]:
    """``(codes, p0, p1)``: the activation records as the C++ ops take them."""
    codes, p0, p1 = [], [], []
    for act in acts:
        assert isinstance(act, Activation)
        params = tuple(float(x) for x in act.params) + (0.0, 0.0)
        codes.append(act.code)
        p0.append(params[0])
        p1.append(params[1])
    return codes, p0, p1


def _grads(out, has_bias):
    grad_z, grad_w, grad_b = out
    return grad_z, list(grad_w), [g if hb else None for g, hb in zip(grad_b, has_bias)]


class CpuBackend(Backend):
    name = "cpu"

    def availability(self) -> tuple[bool, str]:
        module, why = _ext.load()
        return (module is not None), why

    def supports(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
        if torch.device(device).type != "cpu":
            return False, f"the cpu backend runs CPU tensors only, got device {device}"
        if dtype not in (torch.float32, torch.float64):
            return False, f"the cpu backend runs float32 and float64, got {dtype}"
        return True, ""

    def build(self) -> tuple[bool, str]:
        return _ext.build()

    def mlp_pullback_forward(self, z, weights, biases, acts):  # type: ignore[override]
        h, saved = _ext.get().mlp_pullback_forward(z, list(weights), list(biases), *act_args(acts))
        return h, tuple(saved)

    def mlp_pullback_backward(self, grad_h, weights, has_bias, acts, saved):  # type: ignore[override]
        out = _ext.get().mlp_pullback_backward(grad_h, list(weights), list(has_bias), *act_args(acts), list(saved))
        return _grads(out, has_bias)

    def mlp_hutchinson_forward(self, z, probes, weights, biases, acts):  # type: ignore[override]
        stats, saved = _ext.get().mlp_hutchinson_forward(z, probes, list(weights), list(biases), *act_args(acts))
        return stats, tuple(saved)

    def mlp_hutchinson_backward(self, grad_stats, weights, has_bias, acts, saved):  # type: ignore[override]
        out = _ext.get().mlp_hutchinson_backward(
            grad_stats, list(weights), list(has_bias), *act_args(acts), list(saved)
        )
        return _grads(out, has_bias)


BACKEND = CpuBackend()
