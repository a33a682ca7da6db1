"""The multi-stream linear layer (docs/maths.md section 4) as Triton kernels, and their launchers.

Streams are stored stream-major, ``S (NS, B, d)`` with stream 0 the primal (the layout of the
torch twin). Every kernel tiles the rows so that one program owns a block of ``BM`` samples *in
every stream*: its row tile is ``NSP * BM`` stacked rows (``NSP`` = ``NS`` rounded up to a power of
two; padded streams are masked), read as one ``(NSP * BM, BK)`` GEMM operand and reshaped to
``(NSP, BM, BN)`` in the epilogue or prologue, where the primal pre-activation of the same
sample and column gates the tangent streams.

Kernels (the op-specific ones live in ``mlp_pullback.py`` and ``mlp_hutchinson.py``):

- :func:`mlp_stream_fwd_kernel`: ``A = S W^T`` over all streams, bias on the primal stream,
  ``s(p)`` / ``s'(p) A_k`` epilogue; saves ``p`` and (smooth activations) the tangent
  pre-activations; optionally accumulates ``||S_out[k]||^2`` into the Hutchinson statistics.
- :func:`mlp_stream_dgrad_kernel`: ``Sbar_in = Abar W`` with the gating prologue
  (``Abar`` from ``Sbar_out``, ``p``, the saved tangents and the ``s''`` term) fused in.
- :func:`mlp_stream_wgrad_kernel`: ``Wbar += Abar^T S_in`` (split over row blocks, fp32 atomics)
  and ``bbar += sum_b Abar[0]``, with the same prologue fused in.

Precision (constexpr ``PREC``): 0 = fp32 operands with ieee fp32 products (the default), 1 = tf32
tensor cores, 2 = bf16 operands (the index of the mode in :data:`isofast.backends.PRECISIONS`).
Accumulation is always fp32. Activation arguments: ``ACT`` (constexpr kind code), ``coef`` and
``threshold`` (:func:`launch.act_kwargs`). Tiles, grids and warps: :mod:`launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import act_kwargs, col_tile, dummy, interpreting, num_warps, row_tiles, sm_count, stream_launch

#: Prologue codes of the dgrad / wgrad kernels: how ``Abar`` is formed from the loaded gradient.
PRO_NONE = 0  # the loaded tensor is Abar already
PRO_STREAM = 1  # primal + tangent streams: Abar[k] = s'(p) G[k], Abar[0] += s''(p) sum_k A_k G_k (+ extra)
PRO_TANGENT = 2  # tangent-only rows (Hutchinson cotangents): Abar = s'(p) G

#: Triton's interpreter (3.x) returns garbage for bf16 ``tl.dot``: there, bf16 operands are
#: emulated by rounding to bf16 and multiplying in fp32 (same products, exact fp32 accumulation).
_EMULATE_BF16 = tl.constexpr(interpreting())


# --------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _tanh(x):
    # tanh through exp of a non-positive argument: no overflow, ~1e-7 absolute error.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def act_fn(a, ACT: tl.constexpr, coef, threshold):
    """``(s(a), s'(a), s''(a))`` for activation code ``ACT`` (isofast.activations.KINDS order)."""
    zero = tl.zeros_like(a)
    one = zero + 1.0
    if ACT == 0:  # identity
        v, d1, d2 = a, one, zero
    elif ACT == 1:  # relu
        pos = a > 0
        v, d1, d2 = tl.where(pos, a, zero), tl.where(pos, one, zero), zero
    elif ACT == 2:  # leaky_relu(coef = negative slope)
        pos = a > 0
        v, d1, d2 = tl.where(pos, a, a * coef), tl.where(pos, one, one * coef), zero
    elif ACT == 3:  # elu(coef = alpha)
        pos = a > 0
        e = coef * (tl.exp(tl.minimum(a, zero)) - 1.0)
        v, d1, d2 = tl.where(pos, a, e), tl.where(pos, one, e + coef), tl.where(pos, zero, e + coef)
    elif ACT == 4:  # silu
        sg = tl.sigmoid(a)
        v = a * sg
        d1 = sg * (1.0 + a * (1.0 - sg))
        d2 = sg * (1.0 - sg) * (2.0 + a * (1.0 - 2.0 * sg))
    elif ACT == 5:  # softplus(coef = beta, threshold = threshold)
        x = a * coef
        lin = x > threshold
        sg = tl.sigmoid(x)
        sp = (tl.maximum(x, zero) + tl.log(1.0 + tl.exp(-tl.abs(x)))) / coef
        v, d1, d2 = tl.where(lin, a, sp), tl.where(lin, one, sg), tl.where(lin, zero, coef * sg * (1.0 - sg))
    elif ACT == 6:  # tanh
        t = _tanh(a)
        d1 = 1.0 - t * t
        v, d2 = t, -2.0 * t * d1
    elif ACT == 7:  # sigmoid
        sg = tl.sigmoid(a)
        d1 = sg * (1.0 - sg)
        v, d2 = sg, d1 * (1.0 - 2.0 * sg)
    elif ACT == 8:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * a * a)
        v, d1, d2 = a * cdf, cdf + a * pdf, pdf * (2.0 - a * a)
    else:  # 9: gelu_tanh
        c0 = 0.7978845608028654
        c1 = 0.044715
        u = c0 * (a + c1 * a * a * a)
        du = c0 * (1.0 + 3.0 * c1 * a * a)
        ddu = c0 * 6.0 * c1 * a
        t = _tanh(u)
        sech2 = 1.0 - t * t
        v = 0.5 * a * (1.0 + t)
        d1 = 0.5 * (1.0 + t) + 0.5 * a * sech2 * du
        d2 = sech2 * du + 0.5 * a * (sech2 * ddu - 2.0 * t * sech2 * du * du)
    return v, d1, d2


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation at precision ``PREC`` (see the module docstring)."""
    if PREC == 2:
        if _EMULATE_BF16:
            a16 = a.to(tl.bfloat16).to(tl.float32)
            b16 = b.to(tl.bfloat16).to(tl.float32)
            return tl.dot(a16, b16, acc, input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif PREC == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def rows_times_wt(x_ptr, w_ptr, b0, n0, B, N, KD, NS: tl.constexpr, NSP: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``acc[(s, i), n] = sum_k X[s, b0 + i, k] W[n0 + n, k]`` for ``X (NS, B, KD)``, ``W (N, KD)``:
    the stacked ``(NSP * BM, BN)`` tile of every stream of samples ``b0 .. b0 + BM``."""
    r = tl.arange(0, NSP * BM)
    s = r // BM
    b = b0 + r % BM
    row_ok = (s < NS) & (b < B)
    row_off = s.to(tl.int64) * B * KD + b.to(tl.int64) * KD
    n = n0 + tl.arange(0, BN)
    n_ok = n < N
    acc = tl.zeros((NSP * BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < KD
        x = tl.load(x_ptr + row_off[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * KD + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(x, w, acc, PREC)
    return acc


@triton.jit
def pick(x3, sid, k):
    """Stream ``k`` of a ``(NSP, BM, BN)`` tile as ``(BM, BN)``."""
    return tl.sum(tl.where(sid == k, x3, 0.0), axis=0)


@triton.jit
def layer_tile(x_ptr, w_ptr, bias_ptr, B, N, KD, NS: tl.constexpr, NSP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """This program's tile of one layer's pre-activations, for the samples ``b (BM,)`` and columns
    ``n (BN,)`` its program ids select: ``(a3, p, sid, b, n)`` with ``a3 (NSP, BM, BN)`` every
    stream's ``A``, ``p = A[0] + bias (BM, BN)`` the primal and ``sid (NSP, 1, 1)`` the stream index."""
    b0 = tl.program_id(0) * BM
    n0 = tl.program_id(1) * BN
    a3 = tl.reshape(rows_times_wt(x_ptr, w_ptr, b0, n0, B, N, KD, NS, NSP, BM, BN, BK, PREC), (NSP, BM, BN))
    sid = tl.arange(0, NSP)[:, None, None]
    p = pick(a3, sid, 0)
    b = b0 + tl.arange(0, BM)
    n = n0 + tl.arange(0, BN)
    if HAS_BIAS:
        p += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    return a3, p, sid, b, n


@triton.jit
def gated_abar(g_ptr, p_ptr, t_ptr, px_ptr, b0, c0, B, C, NS: tl.constexpr, NSP: tl.constexpr,
               BM: tl.constexpr, BC: tl.constexpr, ACT: tl.constexpr, coef, threshold, PRO: tl.constexpr,
               HAS_T: tl.constexpr, HAS_PX: tl.constexpr):
    """The backward prologue: ``Abar`` of samples ``b0..`` and columns ``c0..`` as ``(NSP, BM, BC)``
    from the gradient ``G (NS, B, C)`` of the layer's output streams (see ``PRO_*``)."""
    sid = tl.arange(0, NSP)[:, None, None]
    b = b0 + tl.arange(0, BM)
    c = c0 + tl.arange(0, BC)
    b3 = b[None, :, None]
    c3 = c[None, None, :]
    ok2 = (b[:, None] < B) & (c[None, :] < C)
    ok3 = (sid < NS) & ok2[None, :, :]
    off2 = b[:, None].to(tl.int64) * C + c[None, :]
    g = tl.load(g_ptr + sid.to(tl.int64) * B * C + b3.to(tl.int64) * C + c3, mask=ok3, other=0.0).to(tl.float32)
    if PRO == 0:
        abar = g
    else:
        p = tl.load(p_ptr + off2, mask=ok2, other=0.0).to(tl.float32)
        _, d1, d2 = act_fn(p, ACT, coef, threshold)
        abar = d1[None, :, :] * g
        if PRO == 1:
            extra = tl.zeros_like(p)
            if HAS_T:
                tmask = (sid >= 1) & ok3
                t = tl.load(t_ptr + (sid.to(tl.int64) - 1) * B * C + b3.to(tl.int64) * C + c3, mask=tmask,
                            other=0.0).to(tl.float32)
                extra += d2 * tl.sum(tl.where(sid >= 1, t * g, 0.0), axis=0)
            if HAS_PX:
                extra += tl.load(px_ptr + off2, mask=ok2, other=0.0).to(tl.float32)
            abar = tl.where(sid == 0, abar + extra[None, :, :], abar)
    return abar


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def mlp_stream_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, p_ptr, t_ptr, stats_ptr, dw_ptr,
    B, N, KD, coef, threshold,
    NS: tl.constexpr, NSP: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_P: tl.constexpr, SAVE_T: tl.constexpr, STATS: tl.constexpr, HAS_W: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """One multi-stream layer: ``out[0] = s(p)``, ``out[k] = s'(p) A[k]`` with ``p = A[0] + b``.
    ``HAS_W``: the statistics are weighted by the data-space weight ``dw (N,)``."""
    a3, p, sid, b, n = layer_tile(x_ptr, w_ptr, bias_ptr, B, N, KD, NS, NSP, HAS_BIAS, BM, BN, BK, PREC)
    ok2 = (b[:, None] < B) & (n[None, :] < N)
    v, d1, _ = act_fn(p, ACT, coef, threshold)
    out = tl.where(sid == 0, v[None, :, :], d1[None, :, :] * a3)
    off3 = sid.to(tl.int64) * B * N + b[None, :, None].to(tl.int64) * N + n[None, None, :]
    ok3 = (sid < NS) & ok2[None, :, :]
    tl.store(out_ptr + off3, out.to(out_ptr.dtype.element_ty), mask=ok3)
    off2 = b[:, None].to(tl.int64) * N + n[None, :]
    if SAVE_P:
        tl.store(p_ptr + off2, p.to(p_ptr.dtype.element_ty), mask=ok2)
    if SAVE_T:
        tl.store(t_ptr + off3 - B * N, a3.to(t_ptr.dtype.element_ty), mask=ok3 & (sid >= 1))
    if STATS:  # stats (B, NS - 1, 2) fp32: stats[b, k - 1, 0] += ||out[k, b]||^2 over this column tile
        if HAS_W:  # ... or sum_n w_n out[k, b, n]^2
            wv = tl.load(dw_ptr + n, mask=n < N, other=0.0).to(tl.float32)
            q = tl.sum(out * out * wv[None, None, :], axis=2)
        else:
            q = tl.sum(out * out, axis=2)
        s2 = tl.arange(0, NSP)[:, None]
        b2 = b[None, :]
        tl.atomic_add(stats_ptr + b2 * (2 * (NS - 1)) + (s2 - 1) * 2, q, mask=(s2 >= 1) & (s2 < NS) & (b2 < B))


@triton.jit
def mlp_stream_dgrad_kernel(
    g_ptr, p_ptr, t_ptr, px_ptr, w_ptr, out_ptr, stats_ptr,
    B, N, J, coef, threshold,
    NS: tl.constexpr, NSP: tl.constexpr, ACT: tl.constexpr, PRO: tl.constexpr,
    HAS_T: tl.constexpr, HAS_PX: tl.constexpr, PRIMAL_ONLY: tl.constexpr, STATS: tl.constexpr,
    BM: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``out (NS, B, J) = Abar (NS, B, N) @ W (N, J)`` with ``Abar`` formed in the prologue.
    ``PRIMAL_ONLY``: store stream 0 only, as ``(B, J)``. ``STATS``: ``stats[b, s, 1] += ||out[s, b]||^2``
    (tangent-only rows, the Hutchinson ``||J^T J v||^2``)."""
    b0 = tl.program_id(0) * BM
    j0 = tl.program_id(1) * BJ
    j = j0 + tl.arange(0, BJ)
    j_ok = j < J
    acc = tl.zeros((NSP * BM, BJ), dtype=tl.float32)
    for k0 in range(0, N, BK):
        abar = gated_abar(g_ptr, p_ptr, t_ptr, px_ptr, b0, k0, B, N, NS, NSP, BM, BK, ACT, coef, threshold, PRO,
                          HAS_T, HAS_PX)
        k = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + k[:, None].to(tl.int64) * J + j[None, :], mask=(k[:, None] < N) & j_ok[None, :], other=0.0)
        acc = mma(tl.reshape(abar, (NSP * BM, BK)), w, acc, PREC)
    a3 = tl.reshape(acc, (NSP, BM, BJ))
    sid = tl.arange(0, NSP)[:, None, None]
    b = b0 + tl.arange(0, BM)
    ok2 = (b[:, None] < B) & j_ok[None, :]
    if PRIMAL_ONLY:
        tl.store(out_ptr + b[:, None].to(tl.int64) * J + j[None, :], pick(a3, sid, 0).to(out_ptr.dtype.element_ty),
                 mask=ok2)
    else:
        off3 = sid.to(tl.int64) * B * J + b[None, :, None].to(tl.int64) * J + j[None, None, :]
        tl.store(out_ptr + off3, a3.to(out_ptr.dtype.element_ty), mask=(sid < NS) & ok2[None, :, :])
    if STATS:
        q = tl.sum(a3 * a3, axis=2)
        s2 = tl.arange(0, NSP)[:, None]
        b2 = b[None, :]
        tl.atomic_add(stats_ptr + b2 * (2 * NS) + s2 * 2 + 1, q, mask=(s2 < NS) & (b2 < B))


@triton.jit
def mlp_stream_wgrad_kernel(
    g_ptr, p_ptr, t_ptr, px_ptr, x_ptr, wgrad_ptr, bgrad_ptr,
    B, N, J, BLOCKS_PER_SPLIT, coef, threshold,
    NS: tl.constexpr, NSP: tl.constexpr, ACT: tl.constexpr, PRO: tl.constexpr,
    HAS_T: tl.constexpr, HAS_PX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr,
):
    """``Wbar (N, J) += sum over rows of Abar^T X`` for ``X (NS, B, J)``, over this program's share
    of the sample blocks (fp32 atomics); ``bbar += sum_b Abar[0]`` when ``HAS_BIAS``."""
    n0 = tl.program_id(0) * BN
    j0 = tl.program_id(1) * BJ
    split = tl.program_id(2)
    n = n0 + tl.arange(0, BN)
    j = j0 + tl.arange(0, BJ)
    r = tl.arange(0, NSP * BM)
    s = r // BM
    acc = tl.zeros((BN, BJ), dtype=tl.float32)
    bacc = tl.zeros((BN,), dtype=tl.float32)
    sid = tl.arange(0, NSP)[:, None, None]
    for blk in range(split * BLOCKS_PER_SPLIT, (split + 1) * BLOCKS_PER_SPLIT):
        b0 = blk * BM
        abar = gated_abar(g_ptr, p_ptr, t_ptr, px_ptr, b0, n0, B, N, NS, NSP, BM, BN, ACT, coef, threshold, PRO,
                          HAS_T, HAS_PX)
        b = b0 + r % BM
        row_ok = (s < NS) & (b < B)
        x = tl.load(x_ptr + s[:, None].to(tl.int64) * B * J + b[:, None].to(tl.int64) * J + j[None, :],
                    mask=row_ok[:, None] & (j[None, :] < J), other=0.0)
        acc = mma(tl.trans(tl.reshape(abar, (NSP * BM, BN))), x, acc, PREC)
        if HAS_BIAS:
            bacc += tl.sum(pick(abar, sid, 0), axis=0)
    ok = (n[:, None] < N) & (j[None, :] < J)
    tl.atomic_add(wgrad_ptr + n[:, None] * J + j[None, :], acc, mask=ok)
    if HAS_BIAS:
        tl.atomic_add(bgrad_ptr + n, bacc, mask=(n < N) & ((n * 0 + j0) == 0))


# --------------------------------------------------------------------------------------------
# launchers


def mlp_stream_forward(x, w, bias, act, *, save_t: bool, stats=None, prec: int = 0, data_weight=None):
    """``x (NS, B, KD)`` through one layer: returns ``(out (NS, B, N), p (B, N), t (NS-1, B, N) or empty)``.

    ``stats (B, NS-1, 2)`` fp32, if given, receives ``||out[k, b]||^2`` in ``[..., 0]`` (added), or
    ``sum_n w_n out[k, b, n]^2`` with ``data_weight`` ``w (N,)``."""
    assert x.is_contiguous() and w.is_contiguous(), "the stream kernels take contiguous tensors"
    ns, bsz, kd = x.shape
    n = w.shape[0]
    out = torch.empty(ns, bsz, n, device=x.device, dtype=x.dtype)
    p = torch.empty(bsz, n, device=x.device, dtype=x.dtype)
    t = torch.empty(ns - 1, bsz, n, device=x.device, dtype=x.dtype) if save_t else x.new_empty(0)
    grid, meta = stream_launch(ns, bsz, n, kd)
    d = dummy(x)
    mlp_stream_fwd_kernel[grid](
        x, w, bias if bias is not None else d, out, p, t if save_t else d, stats if stats is not None else d,
        data_weight if data_weight is not None else d,
        bsz, n, kd, **act_kwargs(act), HAS_BIAS=bias is not None, SAVE_P=True, SAVE_T=save_t,
        STATS=stats is not None, HAS_W=data_weight is not None, PREC=prec, **meta,
    )
    return out, p, t


def mlp_stream_dgrad(g, w, act, *, pro: int, p=None, t=None, px=None, primal_only: bool = False,
                     stats=None, prec: int = 0):
    """``Abar (NS, B, N) @ W (N, J)`` with ``Abar`` formed from ``g`` by prologue ``pro``; returns
    ``(NS, B, J)``, or ``(B, J)`` when ``primal_only``. ``stats (B, NS, 2)``: adds ``||out[s, b]||^2``
    into ``[..., 1]``."""
    assert g.is_contiguous() and w.is_contiguous(), "the stream kernels take contiguous tensors"
    ns, bsz, n = g.shape
    jw = w.shape[1]
    shape = (bsz, jw) if primal_only else (ns, bsz, jw)
    out = torch.empty(shape, device=g.device, dtype=g.dtype)
    has_t = t is not None and t.numel() > 0
    grid, meta = stream_launch(ns, bsz, jw, n, out="BJ")
    d = dummy(g)
    mlp_stream_dgrad_kernel[grid](
        g, p if p is not None else d, t if has_t else d, px if px is not None else d, w, out,
        stats if stats is not None else d,
        bsz, n, jw, **act_kwargs(act), PRO=pro, HAS_T=has_t, HAS_PX=px is not None, PRIMAL_ONLY=primal_only,
        STATS=stats is not None, PREC=prec, **meta,
    )
    return out


def mlp_stream_wgrad(g, x, act, wgrad, bgrad=None, *, pro: int, p=None, t=None, px=None, prec: int = 0):
    """Adds ``sum over rows of Abar^T X`` into ``wgrad (N, J)`` fp32 and ``sum_b Abar[0]`` into
    ``bgrad (N,)`` fp32 (when given); ``g (NS, B, N)``, ``x (NS, B, J)``."""
    assert g.is_contiguous() and x.is_contiguous(), "the stream kernels take contiguous tensors"
    ns, bsz, n = g.shape
    jw = x.shape[2]
    nsp, bm = row_tiles(ns, bsz)
    bn, bj = col_tile(n), col_tile(jw)
    has_t = t is not None and t.numel() > 0
    d = dummy(g)
    blocks = triton.cdiv(bsz, bm)
    tiles = triton.cdiv(n, bn) * triton.cdiv(jw, bj)
    # Split the row blocks so that about two waves of programs fill the GPU.
    split = 1 if interpreting() else max(1, min(blocks, (2 * sm_count(g.device)) // tiles))
    per = triton.cdiv(blocks, split)
    split = triton.cdiv(blocks, per)
    grid = (triton.cdiv(n, bn), triton.cdiv(jw, bj), split)
    mlp_stream_wgrad_kernel[grid](
        g, p if p is not None else d, t if has_t else d, px if px is not None else d, x, wgrad,
        bgrad if bgrad is not None else d,
        bsz, n, jw, per, **act_kwargs(act),
        NS=ns, NSP=nsp, PRO=pro, HAS_T=has_t, HAS_PX=px is not None, HAS_BIAS=bgrad is not None,
        BM=bm, BN=bn, BJ=bj, PREC=prec, num_warps=num_warps(bn, bj),
    )
