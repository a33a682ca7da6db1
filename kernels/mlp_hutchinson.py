"""Hutchinson trace statistics of an MLP (op ``mlp_hutchinson``) with Triton kernels.

Forward: ``1 + K`` streams seeded with ``(z, v_1..v_K)`` run :func:`mlp_stream.mlp_stream_fwd_kernel`;
the last layer's epilogue adds ``||J v_k||^2`` into ``stats[..., 0]``. The VJP chain
``c_{l-1} = (s'(p_l) c_l) W_l`` from ``c_L = J v`` runs the dgrad kernel with the tangent-only
gating prologue; its last step adds ``||J^T J v_k||^2`` into ``stats[..., 1]``.

Backward (docs/maths.md section 4, "the Hutchinson VJP chain"): for ``l = 1..L``,
:func:`mlp_hutchinson_chain_bwd_kernel` computes ``gbar_l = cbar_{l-1} W_l^T`` with the epilogue
``cbar_l = s'(p_l) gbar_l`` and ``pbar_l = s''(p_l) sum_k c_l[k] gbar_l[k]`` (it owns all ``K``
streams of its samples), the wgrad kernel adds ``(s'(p_l) c_l)^T cbar_{l-1}`` into ``Wbar_l``; the
last step writes ``cbar_L + 2 qbar J v`` straight into the tangent streams of ``Sbar_L``, whose
backward is the shared multi-stream one.

With a data-space weight ``w``: the last layer's statistic is ``sum_n w_n (J v)_n^2``, the chain
starts at ``c_L = w J v``, and the last chain step writes ``w (cbar_L + 2 qbar J v)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import mlp_stream as ms
from .launch import act_kwargs, dummy, stream_launch
from .mlp_pullback import grad_buffers, stream_backward
from .mlp_stream import act_fn, rows_times_wt


@triton.jit
def mlp_hutchinson_chain_bwd_kernel(
    gc_ptr, w_ptr, p_ptr, c_ptr, t_ptr, gs_ptr, out_ptr, px_ptr, dw_ptr,
    B, N, KD, coef, threshold,
    NS: tl.constexpr, NSP: tl.constexpr, ACT: tl.constexpr, HAS_D2: tl.constexpr, LAST: tl.constexpr,
    HAS_W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``gbar = gc (K, B, KD) @ W^T``; stores ``s'(p) gbar`` (``LAST``: plus ``2 qbar t``, times the
    data-space weight ``dw (N,)`` when ``HAS_W``, into streams ``1..K`` of ``out``) and
    ``px = s''(p) sum_k c[k] gbar[k]`` (``HAS_D2``). ``NS = K``."""
    b0 = tl.program_id(0) * BM
    n0 = tl.program_id(1) * BN
    acc = rows_times_wt(gc_ptr, w_ptr, b0, n0, B, N, KD, NS, NSP, BM, BN, BK, PREC)
    a3 = tl.reshape(acc, (NSP, BM, BN))
    sid = tl.arange(0, NSP)[:, None, None]
    b = b0 + tl.arange(0, BM)
    n = n0 + tl.arange(0, BN)
    ok2 = (b[:, None] < B) & (n[None, :] < N)
    ok3 = (sid < NS) & ok2[None, :, :]
    off2 = b[:, None].to(tl.int64) * N + n[None, :]
    off3 = sid.to(tl.int64) * B * N + b[None, :, None].to(tl.int64) * N + n[None, None, :]
    p = tl.load(p_ptr + off2, mask=ok2, other=0.0).to(tl.float32)
    _, d1, d2 = act_fn(p, ACT, coef, threshold)
    out = d1[None, :, :] * a3
    if HAS_D2:
        c = tl.load(c_ptr + off3, mask=ok3, other=0.0).to(tl.float32)
        tl.store(px_ptr + off2, (d2 * tl.sum(c * a3, axis=0)).to(px_ptr.dtype.element_ty), mask=ok2)
    if LAST:
        t = tl.load(t_ptr + off3, mask=ok3, other=0.0).to(tl.float32)
        s2 = tl.arange(0, NSP)[:, None]
        b2 = b[None, :]
        q = tl.load(gs_ptr + b2 * (2 * NS) + s2 * 2, mask=(s2 < NS) & (b2 < B), other=0.0).to(tl.float32)
        out += 2.0 * q[:, :, None] * t
        if HAS_W:
            out = out * tl.load(dw_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, None, :]
        tl.store(out_ptr + off3 + B * N, out.to(out_ptr.dtype.element_ty), mask=ok3)
    else:
        tl.store(out_ptr + off3, out.to(out_ptr.dtype.element_ty), mask=ok3)


# --------------------------------------------------------------------------------------------
# launchers and the op


def mlp_hutchinson_chain_backward(gc, w, p, c, act, *, last: bool, t=None, grad_stats=None, out=None, prec: int = 0,
                                  data_weight=None):
    """One backward step of the VJP chain; returns ``(cbar_l, pbar_l or None)``. With ``last``,
    ``cbar_L + 2 qbar t`` goes into streams ``1..K`` of ``out (1 + K, B, N)``, which is returned."""
    ns, bsz, kd = gc.shape
    n = w.shape[0]
    if not last:
        out = torch.empty(ns, bsz, n, device=gc.device, dtype=gc.dtype)
    has_d2 = act.has_second_derivative
    px = torch.empty(bsz, n, device=gc.device, dtype=torch.float32) if has_d2 else None
    grid, meta = stream_launch(ns, bsz, n, kd)
    d = dummy(gc)
    mlp_hutchinson_chain_bwd_kernel[grid](
        gc, w, p, c, t if last else d, grad_stats if last else d, out, px if has_d2 else d,
        data_weight if last and data_weight is not None else d,
        bsz, n, kd, **act_kwargs(act), HAS_D2=has_d2, LAST=last, HAS_W=last and data_weight is not None, PREC=prec,
        **meta,
    )
    return out, px


def mlp_hutchinson_forward(z, probes, weights, biases, acts, prec: int = 0, data_weight=None):
    """``(stats (B, K, 2) fp32, saved)`` with ``saved = [X_l, p_l, T_l]_l + [c_1..c_L] + [t, c_0]``
    (the torch twin's layout; ``t = J v`` as ``(K, B, D)``, ``c_L = t``, or ``w t`` with a weight)."""
    bsz, k, _ = probes.shape
    seeds = torch.cat([z.unsqueeze(0), probes.transpose(0, 1)], dim=0)
    stats = torch.zeros(bsz, k, 2, device=z.device, dtype=torch.float32)
    n_layers = len(weights)
    s = seeds
    layers: list[torch.Tensor] = []
    for l, (w, b, act) in enumerate(zip(weights, biases, acts)):
        last = l == n_layers - 1
        out, p, t = ms.mlp_stream_forward(s, w, b, act, save_t=act.has_second_derivative,
                                          stats=stats if last else None, prec=prec,
                                          data_weight=data_weight if last else None)
        layers += [s, p, t]
        s = out
    t = s[1:]
    c = t if data_weight is None else t * data_weight
    chain: list[torch.Tensor] = []
    for l in reversed(range(n_layers)):
        chain.append(c)
        c = ms.mlp_stream_dgrad(c, weights[l], acts[l], pro=ms.PRO_TANGENT, p=layers[3 * l + 1],
                                stats=stats if l == 0 else None, prec=prec)
    chain.reverse()
    return stats, [*layers, *chain, t, c]


def mlp_hutchinson_backward(grad_stats, weights, has_bias, acts, saved, prec: int = 0, data_weight=None):
    """``(grad_z, grad_weights, grad_biases)`` (fp32) given ``grad_stats = dL/dstats (B, K, 2)``."""
    n_layers = len(weights)
    layers = saved[: 3 * n_layers]
    chain = saved[3 * n_layers : 4 * n_layers]
    t, c0 = saved[4 * n_layers :]
    wgrads, bgrads = grad_buffers(weights, has_bias)
    grad_c = (2.0 * grad_stats[..., 1].transpose(0, 1).unsqueeze(-1).to(c0.dtype) * c0).contiguous()
    grad_s = torch.empty(1 + t.shape[0], t.shape[1], t.shape[2], device=t.device, dtype=t.dtype)
    grad_s[0].zero_()
    pextra: list[torch.Tensor | None] = [None] * n_layers
    for l in range(n_layers):
        c_l, p = chain[l], layers[3 * l + 1]
        ms.mlp_stream_wgrad(c_l, grad_c, acts[l], wgrads[l], pro=ms.PRO_TANGENT, p=p, prec=prec)
        last = l == n_layers - 1
        grad_c, pextra[l] = mlp_hutchinson_chain_backward(
            grad_c, weights[l], p, c_l, acts[l], last=last, t=t, grad_stats=grad_stats,
            out=grad_s if last else None, prec=prec, data_weight=data_weight,
        )
    grad_z = stream_backward(grad_s, weights, has_bias, acts, layers, wgrads, bgrads, upto=n_layers,
                             grad_p_extra=pextra, prec=prec)
    return grad_z, wgrads, bgrads
