"""The ``"cpu"`` backend: the fused MLP ops of ``csrc/cpu/`` (``mlp_pullback.cpp``, ``mlp_hutchinson.cpp``)
and the batched spectral ops (``spectral.cpp``) of the C++ extension, on CPU tensors.

Same contract and the same stream-major layout as :mod:`isofast.backends.torch_backend` (its
test oracle); float32 and float64. The ops run in C++: one ATen GEMM per layer over the stacked
``(1 + K) B`` rows and fused, threaded epilogues; the exact estimator's first layer needs no GEMM
for its tangent streams and its last layer reduces straight to the Gram ``J^T J`` (``J^T diag(w) J``
with a ``data_weight``; the Hutchinson chain then starts from ``w * J v``).

Each op runs as the custom op ``isofast::<op>`` (:mod:`isofast.library`), so torch.compile traces
it. The reductions ``tangent_gram`` and ``tangent_sqnorm`` fall back to the torch twin, as
:data:`isofast.dispatch.TABLE` declares. Availability needs the compiled extension (see
:mod:`isofast._ext`); importing this module never compiles it.
"""

from __future__ import annotations

import torch

from isofast import _ext, _spectral_ext, library
from isofast.backends.base import Backend
from isofast.library import act_args, bias_grads


class CpuBackend(Backend):
    name = "cpu"
    diagonal_data_metric = True

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

    def mlp_pullback_forward(self, z, weights, biases, acts, data_weight=None):  # type: ignore[override]
        h, saved = library.call("mlp_pullback_forward", z.device, z, list(weights), list(biases), *act_args(acts),
                                data_weight)
        return h, (z, *saved)  # the op leaves out z, an input (custom-op outputs alias none)

    def mlp_pullback_backward(self, grad_h, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        out = library.call("mlp_pullback_backward", grad_h.device, grad_h, list(weights), list(has_bias),
                           *act_args(acts), list(saved), data_weight)
        return bias_grads(out, has_bias)

    def mlp_hutchinson_forward(self, z, probes, weights, biases, acts, data_weight=None):  # type: ignore[override]
        stats, saved = library.call("mlp_hutchinson_forward", z.device, z, probes, list(weights), list(biases),
                                    *act_args(acts), data_weight)
        n = 3 * len(weights)
        return stats, (*saved[:n], saved[n - 1], saved[n])  # the op leaves out the alias saved[n - 1]

    def mlp_hutchinson_backward(self, grad_stats, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        out = library.call("mlp_hutchinson_backward", grad_stats.device, grad_stats, list(weights), list(has_bias),
                           *act_args(acts), list(saved), data_weight)
        return bias_grads(out, has_bias)

    eigvalsh = staticmethod(_spectral_ext.eigvalsh)
    logdet = staticmethod(_spectral_ext.logdet)
    condition_numbers = staticmethod(_spectral_ext.condition_numbers)
    airm_sq_to_mean = staticmethod(_spectral_ext.airm_sq_to_mean)


BACKEND = CpuBackend()
