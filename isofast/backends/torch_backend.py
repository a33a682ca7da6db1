"""The pure-PyTorch twin of the fused MLP ops (docs/maths.md section 4).

Streams are stored stream-major, ``S`` of shape ``(1 + K, B, d)`` with stream 0 the primal, so one
GEMM over the ``(1 + K) * B`` stacked rows serves every stream, the bias and activation touch a
contiguous primal block, and ``s'(p)`` gates all tangent streams by broadcasting. This is the
layout the compiled kernels reproduce; this module is their test oracle and the declared fallback
(:data:`isofast.dispatch.TABLE`) of every op a compiled backend lacks. It also holds the torch
implementations of the generic path's reductions and of the spectral ops (:mod:`isofast.spectral`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from isofast import spectral
from isofast.activations import Activation
from isofast.backends.base import Backend, Grads, acc_dtype

_EMPTY = torch.empty(0)


def stream_forward(
    seeds: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], acts: Sequence[Activation]
) -> tuple[Tensor, list[Tensor]]:
    """Push ``seeds (1+K, B, m)`` through the MLP; returns ``S_L (1+K, B, D)`` and, per layer,
    the saved ``[X_l, p_l, A_l[1:]]`` (layer input, primal pre-activation, tangent pre-activations;
    the last is empty for activations with ``s'' = 0``)."""
    s = seeds
    saved: list[Tensor] = []
    for w, b, act in zip(weights, biases, acts):
        n, bsz, d_in = s.shape
        a = (s.reshape(n * bsz, d_in) @ w.t()).view(n, bsz, w.shape[0])
        p = a[0].clone() if b is None else a[0] + b  # a[0] is overwritten by s(p) below
        val, d1 = act.derivatives(p, order=1)
        tangent = a[1:]
        saved += [s, p, tangent if act.has_second_derivative else _EMPTY]
        # Gate in place when a's tangent rows are not saved: one buffer per layer, no concatenation.
        s = a if not act.has_second_derivative else torch.empty_like(a)
        torch.mul(d1.unsqueeze(0), tangent, out=s[1:])
        s[0] = val
    return s, saved


def stream_backward(
    grad_s: Tensor,
    weights: Sequence[Tensor],
    has_bias: Sequence[bool],
    acts: Sequence[Activation],
    layers: Sequence[Tensor],
    grad_p_extra: Sequence[Tensor | None] | None = None,
    grad_w_init: Sequence[Tensor | None] | None = None,
) -> Grads:
    """Backward of :func:`stream_forward` given ``grad_s = dL/dS_L (1+K, B, D)``.

    ``grad_p_extra[l]`` adds into the gradient of the primal pre-activation ``p_l`` (the Hutchinson
    VJP chain's ``s''`` terms); ``grad_w_init[l]`` is added to the weight gradient of layer ``l``.
    """
    n_layers = len(weights)
    grad_w: list[Tensor] = [None] * n_layers  # type: ignore[list-item]
    grad_b: list[Tensor | None] = [None] * n_layers
    g = grad_s
    for l in reversed(range(n_layers)):
        x, p, tangent = layers[3 * l : 3 * l + 3]
        act, w = acts[l], weights[l]
        _, d1, d2 = act.derivatives(p, order=2)
        grad_a = d1.unsqueeze(0) * g
        if act.has_second_derivative:
            grad_a[0] += d2 * (tangent * g[1:]).sum(0)
        if grad_p_extra is not None and grad_p_extra[l] is not None:
            grad_a[0] += grad_p_extra[l]
        n, bsz, d_out = grad_a.shape
        flat = grad_a.reshape(n * bsz, d_out)
        grad_w[l] = flat.t() @ x.reshape(n * bsz, -1)
        if grad_w_init is not None and grad_w_init[l] is not None:
            grad_w[l] += grad_w_init[l]
        if has_bias[l]:
            grad_b[l] = grad_a[0].sum(0)
        # The tangent seeds are constants: below layer 1 only the primal stream's gradient is needed.
        g = (flat @ w).view(n, bsz, -1) if l > 0 else grad_a[0] @ w
    return g, grad_w, grad_b


def identity_seeds(z: Tensor) -> Tensor:
    """The exact estimator's ``1 + m`` seed streams ``(z, e_1, ..., e_m)`` as ``(1 + m, B, m)``."""
    bsz, m = z.shape
    eye = torch.eye(m, dtype=z.dtype, device=z.device).unsqueeze(1).expand(m, bsz, m)
    return torch.cat([z.unsqueeze(0), eye], dim=0)


def _gram(t: Tensor, data_weight: Tensor | None = None) -> Tensor:
    """``G[b, k, l] = sum_d w_d t[k, b, d] t[l, b, d]`` for ``t (K, B, D)`` (``w = 1`` when
    ``data_weight`` is ``None``), accumulated in fp32 or wider."""
    acc = t.to(acc_dtype(t.dtype)).permute(1, 0, 2)
    left = acc if data_weight is None else acc * data_weight.to(acc.dtype)
    return left @ acc.transpose(1, 2)


class TorchBackend(Backend):
    name = "torch"
    diagonal_data_metric = True

    def mlp_pullback_forward(self, z, weights, biases, acts, data_weight=None):  # type: ignore[override]
        s, layers = stream_forward(identity_seeds(z), weights, biases, acts)
        t = s[1:]
        return _gram(t, data_weight), (*layers, t)

    def mlp_pullback_backward(self, grad_h, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        *layers, t = saved
        sym = (grad_h + grad_h.transpose(1, 2)).to(t.dtype)
        grad_t = torch.einsum("bkl,lbd->kbd", sym, t)
        if data_weight is not None:  # H = T^T diag(w) T: tbar_k = w * sum_l (Hbar + Hbar^T)[k, l] t_l
            grad_t.mul_(data_weight)
        grad_s = torch.cat([torch.zeros_like(t[:1]), grad_t], dim=0)
        return stream_backward(grad_s, weights, has_bias, acts, layers)

    def mlp_hutchinson_forward(self, z, probes, weights, biases, acts, data_weight=None):  # type: ignore[override]
        seeds = torch.cat([z.unsqueeze(0), probes.transpose(0, 1)], dim=0)
        s, layers = stream_forward(seeds, weights, biases, acts)
        t = s[1:]
        # VJP chain c_{l-1} = (s'(p_l) * c_l) W_l from c_L = W J v: ends at c_0 = J^T W J v.
        c = t if data_weight is None else t * data_weight
        chain: list[Tensor] = []
        for l in reversed(range(len(weights))):
            chain.append(c)
            d1 = acts[l].derivatives(layers[3 * l + 1], order=1)[1]
            c = (d1.unsqueeze(0) * c) @ weights[l]
        chain.reverse()
        acc = acc_dtype(z.dtype)
        sq = t.to(acc).square()
        q = (sq if data_weight is None else sq * data_weight.to(acc)).sum(-1)  # sum_d w_d (J v)_d^2
        stats = torch.stack([q, c.to(acc).square().sum(-1)], dim=-1)
        return stats.transpose(0, 1), (*layers, *chain, t, c)

    def mlp_hutchinson_backward(self, grad_stats, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        n_layers = len(weights)
        layers = saved[: 3 * n_layers]
        chain = saved[3 * n_layers : 4 * n_layers]
        t, c0 = saved[4 * n_layers :]
        grad_q = grad_stats[..., 0].transpose(0, 1).unsqueeze(-1).to(t.dtype)
        grad_r = grad_stats[..., 1].transpose(0, 1).unsqueeze(-1).to(t.dtype)
        grad_c = 2 * grad_r * c0
        grad_w_chain: list[Tensor | None] = []
        grad_p_chain: list[Tensor | None] = []
        for l in range(n_layers):
            c_l, p = chain[l], layers[3 * l + 1]
            _, d1, d2 = acts[l].derivatives(p, order=2)
            grad_g = grad_c @ weights[l].t()
            gated = d1.unsqueeze(0) * c_l
            grad_w_chain.append(gated.reshape(-1, gated.shape[-1]).t() @ grad_c.reshape(-1, grad_c.shape[-1]))
            grad_p_chain.append(d2 * (c_l * grad_g).sum(0) if acts[l].has_second_derivative else None)
            grad_c = d1.unsqueeze(0) * grad_g
        # q = sum_d w_d t_d^2 and c_L = w * t: tbar = w * (2 qbar t + cbar_L).
        grad_t = 2 * grad_q * t + grad_c
        if data_weight is not None:
            grad_t.mul_(data_weight)
        grad_s = torch.cat([torch.zeros_like(t[:1]), grad_t], dim=0)
        return stream_backward(grad_s, weights, has_bias, acts, layers, grad_p_chain, grad_w_chain)

    @staticmethod
    def tangent_gram(x: Tensor) -> Tensor:
        """``G (B, K, K) = x x^T`` of tangent images ``x (B, K, D)``."""
        return x @ x.transpose(1, 2)

    @staticmethod
    def tangent_sqnorm(x: Tensor) -> Tensor:
        """``s (B, K) = sum_d x^2`` of tangent images ``x (B, K, D)``."""
        return x.square().sum(-1)

    eigvalsh = staticmethod(spectral._eigvalsh_torch)
    logdet = staticmethod(spectral._logdet_torch)
    condition_numbers = staticmethod(spectral._condition_numbers_torch)
    airm_sq_to_mean = staticmethod(spectral._airm_sq_to_mean_torch)


BACKEND = TorchBackend()
