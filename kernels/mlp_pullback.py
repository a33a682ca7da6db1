"""Exact pullback metric ``H = J^T J`` (``J^T diag(w) J`` with a data-space weight) of an MLP (op
``mlp_pullback``) with Triton kernels.

Forward: the hidden layers run :func:`mlp_stream.mlp_stream_fwd_kernel` on the ``1 + m`` streams
seeded with ``(z, I_m)``; the last layer runs :func:`mlp_pullback_gram_kernel`, which reduces the
gated tangent images of its tile straight into the per-sample Gram ``H[b] (m x m)`` (fp32 atomics
over column tiles): the ``B x m x D`` tangent images are never written.

Backward: :func:`mlp_pullback_gram_bwd_kernel` recomputes the last layer's pre-activations from
its saved input and forms ``Abar_L`` directly from ``Hbar`` (``Sbar_L`` never exists):
with ``U[k] = sum_k' (Hbar + Hbar^T)[k, k'] A[k']``,
``Abar[k] = s'(p)^2 U[k]`` and ``Abar[0] = s''(p) s'(p) sum_k A[k] U[k]`` (with a data-space weight
``w``, ``U`` is multiplied by ``w``). The layers below run the
dgrad / wgrad kernels of ``mlp_stream`` with the gating prologue fused in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from isofast.backends.torch_backend import identity_seeds

from . import mlp_stream as ms
from .launch import act_kwargs, dummy, stream_launch
from .mlp_stream import act_fn, layer_tile, pick


@triton.jit
def mlp_pullback_gram_kernel(
    x_ptr, w_ptr, bias_ptr, gram_ptr, dw_ptr,
    B, N, KD, coef, threshold,
    NS: tl.constexpr, NSP: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``gram[b, k, k'] += <T_k, T_k'>`` over this column tile, ``T_k = s'(p) A[k]``, ``K = NS - 1``
    (``HAS_W``: ``<w T_k, T_k'>`` with the data-space weight ``dw (N,)``)."""
    a3, p, sid, b, n = layer_tile(x_ptr, w_ptr, bias_ptr, B, N, KD, NS, NSP, HAS_BIAS, BM, BN, BK, PREC)
    _, d1, _ = act_fn(p, ACT, coef, threshold)
    # Padded columns hold p = 0 and A = 0, so they contribute nothing.
    tg = tl.where((sid >= 1) & (sid < NS), d1[None, :, :] * a3, 0.0)
    tw = tg  # the left factor: w T when weighted
    if HAS_W:
        tw = tg * tl.load(dw_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, None, :]
    s2 = tl.arange(0, NSP)[:, None]
    b2 = b[None, :]
    ok = (s2 >= 1) & (s2 < NS) & (b2 < B)
    for k in tl.static_range(1, NS):
        tk = pick(tg, sid, k)
        g = tl.sum(tw * tk[None, :, :], axis=2)  # (NSP, BM): <T_s, T_k> (<w T_s, T_k>) over this tile
        tl.atomic_add(gram_ptr + b2 * ((NS - 1) * (NS - 1)) + (s2 - 1) * (NS - 1) + (k - 1), g, mask=ok)


@triton.jit
def mlp_pullback_gram_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, gh_ptr, abar_ptr, dw_ptr,
    B, N, KD, coef, threshold,
    NS: tl.constexpr, NSP: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D2: tl.constexpr,
    HAS_W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``abar (NS, B, N)``: the last layer's pre-activation gradient given ``Hbar = gh (B, K, K)``
    (``HAS_W``: of ``H = T^T diag(w) T``, ``w = dw (N,)``)."""
    a3, p, sid, b, n = layer_tile(x_ptr, w_ptr, bias_ptr, B, N, KD, NS, NSP, HAS_BIAS, BM, BN, BK, PREC)
    _, d1, d2 = act_fn(p, ACT, coef, threshold)
    s2 = tl.arange(0, NSP)[:, None]
    b2 = b[None, :]
    ok = (s2 >= 1) & (s2 < NS) & (b2 < B)
    kk = NS - 1
    u = tl.zeros((NSP, BM, BN), dtype=tl.float32)
    for k in tl.static_range(1, NS):
        ak = pick(a3, sid, k)
        base = gh_ptr + b2 * (kk * kk)
        gsym = tl.load(base + (s2 - 1) * kk + (k - 1), mask=ok, other=0.0).to(tl.float32)
        gsym += tl.load(base + (k - 1) * kk + (s2 - 1), mask=ok, other=0.0).to(tl.float32)
        u += gsym[:, :, None] * ak[None, :, :]
    if HAS_W:  # Sbar_k = w s'(p) U[k]
        u = u * tl.load(dw_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, None, :]
    abar = (d1 * d1)[None, :, :] * u
    if HAS_D2:
        a0 = d2 * d1 * tl.sum(tl.where(sid >= 1, a3 * u, 0.0), axis=0)
        abar = tl.where(sid == 0, a0[None, :, :], abar)
    ok2 = (b[:, None] < B) & (n[None, :] < N)
    off3 = sid.to(tl.int64) * B * N + b[None, :, None].to(tl.int64) * N + n[None, None, :]
    tl.store(abar_ptr + off3, abar.to(abar_ptr.dtype.element_ty), mask=(sid < NS) & ok2[None, :, :])


# --------------------------------------------------------------------------------------------
# launchers


def mlp_pullback_gram(x, w, bias, act, prec: int = 0, data_weight=None):
    """``H (B, K, K)`` fp32 of the last layer from its input streams ``x (1 + K, B, KD)`` (weighted
    by ``data_weight (N,)`` when given)."""
    ns, bsz, kd = x.shape
    n = w.shape[0]
    gram = torch.zeros(bsz, ns - 1, ns - 1, device=x.device, dtype=torch.float32)
    grid, meta = stream_launch(ns, bsz, n, kd)
    mlp_pullback_gram_kernel[grid](
        x, w, bias if bias is not None else dummy(x), gram,
        data_weight if data_weight is not None else dummy(x), bsz, n, kd, **act_kwargs(act),
        HAS_BIAS=bias is not None, HAS_W=data_weight is not None, PREC=prec, **meta,
    )
    return gram


def mlp_pullback_gram_backward(x, w, bias, act, grad_h, prec: int = 0, data_weight=None):
    """``Abar_L (1 + K, B, N)`` of the last layer given ``grad_h = dL/dH (B, K, K)``."""
    ns, bsz, kd = x.shape
    n = w.shape[0]
    abar = torch.empty(ns, bsz, n, device=x.device, dtype=x.dtype)
    if not act.has_second_derivative:
        abar[0].zero_()
    grid, meta = stream_launch(ns, bsz, n, kd)
    mlp_pullback_gram_bwd_kernel[grid](
        x, w, bias if bias is not None else dummy(x), grad_h, abar,
        data_weight if data_weight is not None else dummy(x), bsz, n, kd, **act_kwargs(act),
        HAS_BIAS=bias is not None, HAS_D2=act.has_second_derivative, HAS_W=data_weight is not None, PREC=prec,
        **meta,
    )
    return abar


# --------------------------------------------------------------------------------------------
# the op


def mlp_pullback_forward(z, weights, biases, acts, prec: int = 0, data_weight=None):
    """``(H (B, m, m) fp32, saved)``; ``saved = [X_1, p_1, T_1, ..., X_{L-1}, p_{L-1}, T_{L-1}, X_L, b_L]``
    (``T_l`` empty for activations with ``s'' = 0``; ``b_L`` empty without a bias): the last layer's
    pre-activations are recomputed in the backward from ``X_L`` and ``b_L``."""
    s = identity_seeds(z)
    saved: list[torch.Tensor] = []
    for w, b, act in zip(weights[:-1], biases[:-1], acts[:-1]):
        out, p, t = ms.mlp_stream_forward(s, w, b, act, save_t=act.has_second_derivative, prec=prec)
        saved += [s, p, t]
        s = out
    b_last = biases[-1]
    saved += [s, b_last if b_last is not None else s.new_empty(0)]
    return mlp_pullback_gram(s, weights[-1], b_last, acts[-1], prec, data_weight), saved


def stream_backward(grad_s, weights, has_bias, acts, layers, wgrads, bgrads, *, upto: int,
                    grad_p_extra=None, prec: int = 0):
    """Backward of layers ``upto - 1 .. 0`` (0-based) given ``grad_s``, the gradient of layer
    ``upto - 1``'s output streams; ``layers = [X_l, p_l, T_l, ...]``. Adds into the fp32 buffers
    ``wgrads`` / ``bgrads`` and returns ``grad_z (B, m)``."""
    g = grad_s
    for l in reversed(range(upto)):
        x, p, t = layers[3 * l : 3 * l + 3]
        px = None if grad_p_extra is None else grad_p_extra[l]
        ms.mlp_stream_wgrad(g, x, acts[l], wgrads[l], bgrads[l] if has_bias[l] else None,
                            pro=ms.PRO_STREAM, p=p, t=t, px=px, prec=prec)
        g = ms.mlp_stream_dgrad(g, weights[l], acts[l], pro=ms.PRO_STREAM, p=p, t=t, px=px,
                                primal_only=l == 0, prec=prec)
    return g


def grad_buffers(weights, has_bias):
    """Zeroed fp32 gradient accumulators (the wgrad kernels add into them with atomics)."""
    wgrads = [torch.zeros(w.shape, device=w.device, dtype=torch.float32) for w in weights]
    bgrads = [torch.zeros(w.shape[0], device=w.device, dtype=torch.float32) if hb else None
              for w, hb in zip(weights, has_bias)]
    return wgrads, bgrads


def mlp_pullback_backward(grad_h, weights, has_bias, acts, saved, prec: int = 0, data_weight=None):
    """``(grad_z, grad_weights, grad_biases)`` (fp32) given ``grad_h = dL/dH (B, m, m)``."""
    n_layers = len(weights)
    x_last, b_last = saved[-2], saved[-1]
    wgrads, bgrads = grad_buffers(weights, has_bias)
    abar = mlp_pullback_gram_backward(x_last, weights[-1], b_last if has_bias[-1] else None, acts[-1], grad_h, prec,
                                      data_weight)
    last = n_layers - 1
    ms.mlp_stream_wgrad(abar, x_last, acts[last], wgrads[last], bgrads[last], pro=ms.PRO_NONE, prec=prec)
    g = ms.mlp_stream_dgrad(abar, weights[last], acts[last], pro=ms.PRO_NONE, primal_only=last == 0, prec=prec)
    if last > 0:
        g = stream_backward(g, weights, has_bias, acts, saved[:-2], wgrads, bgrads, upto=last, prec=prec)
    return g, wgrads, bgrads
