"""The compiled extension's ops as ``torch.library`` custom ops ``isofast::<op>``: one name per op,
its CPU and CUDA kernels and its fake (shape-only) implementation side by side.

torch.compile traces a custom op as one opaque node through its fake implementation, so a training
step on the cpu or cuda backend compiles with ``fullgraph=True`` instead of breaking the graph at a
pybind call. Registering loads nothing: each kernel fetches the extension (:func:`isofast._ext.get`)
when it runs, so importing this module never compiles and needs no GPU. The CUDA kernels exist only
in a CUDA build of the extension; on any other build they are registered and raise when called.

Ops (``L`` layers, ``B`` batch, ``m`` latent width, ``K`` probes or tangent images, ``D`` width):

- ``mlp_pullback_forward(z (B, m), weights, biases, codes, coefs, thresholds, data_weight)`` ->
  ``(H (B, m, m), saved)``; ``mlp_pullback_backward(grad_h, weights, has_bias, codes, coefs,
  thresholds, saved, data_weight)`` -> ``(grad_z (B, m), grad_weights, grad_biases)``: CPU and CUDA;
- ``mlp_hutchinson_forward(z, probes (B, K, m), ...)`` -> ``(stats (B, K, 2), saved)`` and its
  ``mlp_hutchinson_backward``: CPU only (the cuda backend declares the torch twin instead);
- ``tangent_gram(x (B, K, D))`` -> ``(B, K, K)``, ``tangent_sqnorm(x)`` -> ``(B, K)``: CUDA only;
- ``eigvalsh(H (B, m, m))`` -> ``(B, m)``, ``logdet(H, with_grad)`` -> ``((B,), dlogdet/dH (B, m, m)
  or (0,))``, ``condition_numbers(H)`` -> ``(B,)``, ``airm_sq_to_mean(H)`` -> ``(B,)``: CPU and CUDA.

Custom-op outputs may alias neither inputs nor each other, so the MLP ops hand back the backend's
``saved`` lists less the tensors that would: the CPU pullback's ``saved[0]`` (``z`` itself) and the
CPU Hutchinson's ``saved[3L]`` (the same tensor as ``saved[3L - 1]``); the backend methods put them
back. Backward ops return the bias gradients of the biased layers only (no ``None`` outputs).
``saved`` is backend-specific: the fake implementations read the device to size it.

:func:`call` runs an op: through the dispatcher while torch.compile traces, and its kernel for the
tensors' device directly in eager mode, where the dispatcher costs more than noise (measured on
the paper decoder 2-256x4-784 at batch 100, forward and backward of either MLP op, one thread,
CPU time, alternating: 0.38-0.50 ms of 11-14 ms, 3-4.5%, paired differences well above zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from isofast import _ext
from isofast.activations import Activation
from isofast.backends.base import Grads


def act_args(acts: Sequence[Activation]) -> tuple[list[int], list[float], list[float]]:
    """``(codes, coefs, thresholds)``: the activation records as the compiled ops take them."""
    assert all(isinstance(act, Activation) for act in acts)
    params = [act.kernel_params for act in acts]
    return [act.code for act in acts], [c for c, _ in params], [t for _, t in params]


def _biased(grads: Sequence[Tensor | None], has_bias: Sequence[bool]) -> list[Tensor]:
    return [g for g, hb in zip(grads, has_bias) if hb]  # type: ignore[misc]


def bias_grads(out: tuple[Tensor, list[Tensor], list[Tensor]], has_bias: Sequence[bool]) -> Grads:
    """A backward op's ``(grad_z, grad_weights, grad_biases of the biased layers)`` as the backend
    contract's ``Grads``: ``grad_biases[l]`` is ``None`` where layer ``l`` has no bias."""
    grad_z, grad_w, grad_b = out
    it = iter(grad_b)
    return grad_z, list(grad_w), [next(it) if hb else None for hb in has_bias]


#: op name -> device type -> kernel: what :func:`call` runs in eager mode.
_KERNELS: dict[str, dict[str, Callable[..., Any]]] = {}


def _define(name: str, kernels: dict[str, Callable[..., Any]]) -> None:
    """Register ``isofast::<name>`` with one kernel per device type (the schema from the first's
    annotations)."""
    (device, first), *rest = kernels.items()
    op = custom_op(f"isofast::{name}", first, mutates_args=(), device_types=device)
    for device, kernel in rest:
        op.register_kernel(device, kernel)
    _KERNELS[name] = kernels


def call(name: str, device: torch.device, *args: Any) -> Any:
    """Op ``isofast::<name>`` on tensors on ``device``: the custom op while torch.compile traces
    (an opaque node with its fake implementation), else its kernel for ``device`` directly."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.isofast, name)(*args)
    return _KERNELS[name][device.type](*args)


# --- mlp_pullback ------------------------------------------------------------------------------

def _mlp_pullback_forward_cpu(
    z: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
    codes: list[int], coefs: list[float], thresholds: list[float], data_weight: Optional[Tensor] = None,
) -> tuple[Tensor, list[Tensor]]:
    h, saved = _ext.get().mlp_pullback_forward(z, weights, biases, codes, coefs, thresholds, data_weight)
    return h, list(saved[1:])


def _mlp_pullback_forward_cuda(z, weights, biases, codes, coefs, thresholds, data_weight=None):
    from isofast.backends.cuda_backend import pullback_forward

    return pullback_forward(z, weights, biases, codes, coefs, thresholds, data_weight)


_define("mlp_pullback_forward",
        {"cpu": _mlp_pullback_forward_cpu, "cuda": _mlp_pullback_forward_cuda})


@register_fake("isofast::mlp_pullback_forward")
def _(z, weights, biases, codes, coefs, thresholds, data_weight=None):
    B, m = z.shape
    rows = (m + 1) * B
    if z.device.type == "cuda":  # per layer the stacked input and pre-activation, then the images J
        saved = [z.new_empty(rows, w.shape[i]) for w in weights for i in (1, 0)]
        return z.new_empty(B, m, m), [*saved, z.new_empty(B, m, weights[-1].shape[0])]
    saved = [z.new_empty(B, weights[0].shape[0])]
    for w in weights[1:]:
        saved += [z.new_empty(rows, w.shape[1]), z.new_empty(rows, w.shape[0])]
    return z.new_empty(B, m, m), saved


def _cpu_backward(name: str) -> Callable[..., tuple[Tensor, list[Tensor], list[Tensor]]]:
    """The CPU kernel of the backward op ``isofast::<name>``: the extension's function of that name."""

    def kernel(
        grad: Tensor, weights: list[Tensor], has_bias: list[bool],
        codes: list[int], coefs: list[float], thresholds: list[float], saved: list[Tensor],
        data_weight: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        gz, gw, gb = getattr(_ext.get(), name)(grad, weights, has_bias, codes, coefs, thresholds, saved, data_weight)
        return gz, list(gw), _biased(gb, has_bias)

    return kernel


def _backward_fake(grad, weights, has_bias, codes, coefs, thresholds, saved, data_weight=None):
    """Fake of both backward ops: ``grad_z (B, m)``, the weights' and the biased layers' gradients."""
    w0 = weights[0]
    return (w0.new_empty(grad.shape[0], w0.shape[1]), [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0]) for w, hb in zip(weights, has_bias) if hb])


def _mlp_pullback_backward_cuda(grad_h, weights, has_bias, codes, coefs, thresholds, saved, data_weight=None):
    from isofast.backends.cuda_backend import pullback_backward

    gz, gw, gb = pullback_backward(grad_h, weights, has_bias, codes, coefs, thresholds, saved, data_weight)
    return gz, gw, _biased(gb, has_bias)


_define("mlp_pullback_backward",
        {"cpu": _cpu_backward("mlp_pullback_backward"), "cuda": _mlp_pullback_backward_cuda})
register_fake("isofast::mlp_pullback_backward", _backward_fake)


# --- mlp_hutchinson ----------------------------------------------------------------------------

def _mlp_hutchinson_forward_cpu(
    z: Tensor, probes: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
    codes: list[int], coefs: list[float], thresholds: list[float], data_weight: Optional[Tensor] = None,
) -> tuple[Tensor, list[Tensor]]:
    stats, saved = _ext.get().mlp_hutchinson_forward(z, probes, weights, biases, codes, coefs, thresholds,
                                                     data_weight)
    n = 3 * len(weights)
    return stats, [*saved[:n], saved[n + 1]]


_define("mlp_hutchinson_forward", {"cpu": _mlp_hutchinson_forward_cpu})


@register_fake("isofast::mlp_hutchinson_forward")
def _(z, probes, weights, biases, codes, coefs, thresholds, data_weight=None):
    B, m = z.shape
    K = probes.shape[1]
    rows = (K + 1) * B
    saved = []
    for w in weights:
        saved += [z.new_empty(rows, w.shape[1]), z.new_empty(rows, w.shape[0])]
    saved += [z.new_empty(K * B, w.shape[0]) for w in weights[:-1]]
    # The last layer's tangent rows: a view past the B primal rows of a ((K + 1) B, D) tensor.
    saved.append(z.new_empty(rows, weights[-1].shape[0]).narrow(0, B, K * B))
    saved.append(z.new_empty(K * B, m))
    return z.new_empty(B, K, 2), saved


_define("mlp_hutchinson_backward", {"cpu": _cpu_backward("mlp_hutchinson_backward")})
register_fake("isofast::mlp_hutchinson_backward", _backward_fake)


# --- tangent_gram, tangent_sqnorm --------------------------------------------------------------

def _tangent_gram_cuda(x: Tensor) -> Tensor:
    return _ext.get().cuda_gram(x)


_define("tangent_gram", {"cuda": _tangent_gram_cuda})


@register_fake("isofast::tangent_gram")
def _(x):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[1])


def _tangent_sqnorm_cuda(x: Tensor) -> Tensor:
    return _ext.get().cuda_sqnorm(x)


_define("tangent_sqnorm", {"cuda": _tangent_sqnorm_cuda})


@register_fake("isofast::tangent_sqnorm")
def _(x):
    return x.new_empty(x.shape[0], x.shape[1])


# --- spectral ops: the extension's CPU functions are ``name``, its CUDA ones ``cuda_<name>`` ---

def _define_spectral(name: str, out_shape: Callable[[Tensor], tuple[int, ...]]) -> None:
    """``isofast::<name>``: ``H (B, m, m)`` -> a tensor of ``out_shape(H)`` in ``H``'s dtype."""

    def cpu(H: Tensor) -> Tensor:
        return getattr(_ext.get(), name)(H)

    def cuda(H: Tensor) -> Tensor:
        return getattr(_ext.get(), f"cuda_{name}")(H)

    _define(name, {"cpu": cpu, "cuda": cuda})
    register_fake(f"isofast::{name}", lambda H: H.new_empty(out_shape(H)))


_define_spectral("eigvalsh", lambda H: (H.shape[0], H.shape[1]))
_define_spectral("condition_numbers", lambda H: (H.shape[0],))
_define_spectral("airm_sq_to_mean", lambda H: (H.shape[0],))


def _logdet_cpu(H: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    out, grad = _ext.get().logdet(H, with_grad)
    return out, H.new_empty(0) if grad is None else grad  # a custom op returns no None


def _logdet_cuda(H: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    out, grad = _ext.get().cuda_logdet(H, with_grad)
    return out, H.new_empty(0) if grad is None else grad


_define("logdet", {"cpu": _logdet_cpu, "cuda": _logdet_cuda})


@register_fake("isofast::logdet")
def _(H, with_grad):
    return H.new_empty(H.shape[0]), H.new_empty(H.shape if with_grad else (0,))
