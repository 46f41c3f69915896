"""Triton kernels for ``varlen_attention``: FlashAttention-2 over packed variable-length sequences.

Layout: ``q, k, v, out`` are ``[total, H, d]`` (last dim contiguous, other strides passed
explicitly); ``cu_seqlens`` int32 ``[B+1]`` gives each sequence's rows. ``lse`` is float32
``[total, H]``, the natural-log log-sum-exp of each query's logits (``-inf`` for a query with no
finite logit, whose output is zeros).

Passes:
  forward   ``_fwd_kernel``      grid (query tiles of max_seqlen, B*H). Each program reads its
                                  sequence bounds from cu_seqlens (programs past the end exit), keeps
                                  a [BLOCK_M, d] query tile and streams key/value tiles with an online
                                  softmax in fp32 (exp2, log2(e) folded into the scale); writes out, lse.
                                  Only the key tiles at the sequence's end or on the causal diagonal
                                  are masked (``_fwd_tiles(MASKED=True)``); 16-bit inputs with short
                                  sequences (<= 192) take 64-query tiles.
  backward  ``_bwd_preprocess``  delta = rowsum(dO * O), grid (row tiles of total, H).
            ``_bwd_dkdv_kernel`` grid (key tiles, B*H): a [BLOCK_N, d] key/value tile stays put while
                                  query tiles stream by; accumulates dK, dV and d key_bias (row sums of
                                  dS, per head) in fp32. Scores are masked only on the causal diagonal
                                  and query rows only in the sequence's last query tile.
            ``_bwd_dq_kernel``   grid (query tiles, B*H): dQ, by streaming key tiles (deterministic, no
                                  atomics), masked as in the forward.
            Both recompute P and dS with one helper, ``_bwd_p_ds`` (each in its own orientation).
The attention matrix is never stored. Head dims that are not a power of two are padded to the next
power of two (at least 32) with masks; an even head dim (``EVEN_D``) and whole tiles load without
any mask. ``key_bias`` (none, per head, or per key through a head stride of 0) and ``causal`` are
compile-time constants (``HAS_BIAS``, ``IS_CAUSAL``): the common case (bias, not causal) carries no
dead branch, at the price of a compile per combination actually used. Tile offsets are int32 from
int64 per-tile base pointers (``total * stride`` may exceed 2^31).

Under ``TRITON_INTERPRET=1`` (CPU tests) operands are cast to fp32 right after loading (``UPCAST``),
because the interpreter's bf16/fp16 arithmetic is not faithful; on a GPU fp16/bf16 operands go into
``tl.dot`` as they are, with fp32 accumulation.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import fp32_dots_allow_tf32

_MAX_GRID_Y = 65535  # CUDA limit of grid dims 1 and 2; B*H is folded over both


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, stride, rows, d_offs, rows_valid, d_valid, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
               UPCAST: tl.constexpr):
    """A [len(rows), BLOCK_D] tile at ``base`` (rows ``stride`` apart, the last dim contiguous),
    zeros outside. Masks only what can be out of range: rows (MASK_ROWS) and padded head dims
    (unless EVEN_D): full tiles of an even head dim load without any mask (vectorised)."""
    ptrs = base + rows[:, None] * stride + d_offs[None, :]
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows_valid[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_valid[:, None] & d_valid[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_valid[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _seq_bounds(CuSeqlens, b, total):
    """(first row int64, length, bad) of sequence b; bad for a malformed cu_seqlens (value checks
    off): the program then returns and touches no row outside [0, total)."""
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    bad = (seq_start < 0) | (seq_len < 0) | (seq_start.to(tl.int64) + seq_len > total)
    return seq_start.to(tl.int64), seq_len, bad


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, Kh, Vh, Bh, offs_m, offs_d, d_valid, lo, hi, seq_len,
    stride_kt, stride_vt, stride_bt, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi). MASKED: the tiles that straddle the end of the
    sequence or (causal) the diagonal; the others need no score or row mask at all."""
    rn = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + rn
        n_valid = offs_n < seq_len
        row = tl.cast(start_n, tl.int64)
        k = _load_rows(Kh + row * stride_kt, stride_kt, rn, offs_d, n_valid, d_valid, MASKED, EVEN_D, UPCAST)
        v = _load_rows(Vh + row * stride_vt, stride_vt, rn, offs_d, n_valid, d_valid, MASKED, EVEN_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_BIAS:
            if MASKED:
                bias = tl.load(Bh + row * stride_bt + rn * stride_bt, mask=n_valid, other=0.0)
            else:
                bias = tl.load(Bh + row * stride_bt + rn * stride_bt)
            s += bias.to(tl.float32)[None, :] * 1.4426950408889634
        if MASKED:
            valid = n_valid[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no finite logit yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Bias, Out, Lse, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_bh, stride_lt, stride_lh,
    H, BH, total, D, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    row0, seq_len, bad = _seq_bounds(CuSeqlens, b, total)
    start_m = pid_m * BLOCK_M
    if bad | (start_m >= seq_len):
        return
    rm = tl.arange(0, BLOCK_M)
    offs_m = start_m + rm
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_len
    d_valid = offs_d < D
    row_m = row0 + start_m

    q = _load_rows(Q + row_m * stride_qt + h * stride_qh, stride_qt, rm, offs_d, m_valid, d_valid, True, EVEN_D,
                   UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key tiles every query of this tile sees whole (inside the sequence and, causal, at or
    # before the tile's first query) run without a mask; the rest (the sequence's last tile, the
    # diagonal) with one.
    hi = seq_len
    full = (seq_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    Kh = K + row0 * stride_kt + h * stride_kh
    Vh = V + row0 * stride_vt + h * stride_vh
    Bh = Bias + row0 * stride_bt + h * stride_bh
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, Kh, Vh, Bh, offs_m, offs_d, d_valid, 0, full, seq_len,
        stride_kt, stride_vt, stride_bt, qk_scale, HAS_BIAS, IS_CAUSAL, BLOCK_N, EVEN_D, UPCAST, DOT_PREC, False,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, Kh, Vh, Bh, offs_m, offs_d, d_valid, full, hi, seq_len,
        stride_kt, stride_vt, stride_bt, qk_scale, HAS_BIAS, IS_CAUSAL, BLOCK_N, EVEN_D, UPCAST, DOT_PREC, True,
    )

    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_mass, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(Out + row_m * stride_ot + h * stride_oh + rm[:, None] * stride_ot + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(Lse + row_m * stride_lt + h * stride_lh + rm * stride_lt, lse, mask=m_valid)


@triton.jit
def _bwd_preprocess(
    Out, DO, Delta,
    stride_ot, stride_oh, stride_dot, stride_doh,
    total, H, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + rows * H + h, delta, mask=rows < total)


@triton.jit
def _bwd_p_ds(
    a, b, c, e, bias, lse, delta, key_idx, q_idx, seq_len, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """P and dS = P * (dP - delta) of one query tile x key tile, recomputed from the stored
    log-sum-exp; the one formula of both backward kernels, in either orientation:
    ``(a, b, c, e) = (q, k, dO, v)`` gives [BLOCK_M, BLOCK_N] (dQ kernel), ``(k, q, v, dO)`` gives
    [BLOCK_N, BLOCK_M] (dK/dV kernel, no transposes of its accumulators). ``bias`` (base 2),
    ``lse`` (base 2, +inf for a query without mass or out of range: P = 0), ``delta``,
    ``key_idx`` and ``q_idx`` come broadcastable to that shape. MASKED: the tile straddles the
    sequence's end (keys past it get P = 0) or the causal diagonal."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:
        s += bias
    if MASKED:
        valid = key_idx < seq_len
        if IS_CAUSAL:
            valid = valid & (key_idx <= q_idx)
        s = tl.where(valid, s, float("-inf"))
    p = tl.exp2(s - lse)
    dp = tl.dot(c, tl.trans(e), input_precision=DOT_PREC)
    return p, p * (dp - delta)


@triton.jit
def _query_stats(Lh, Dh, row, stride_lt, H, rows, valid):
    """Base-2 log-sum-exp (+inf where a query has no mass or is out of range, so that its P is 0)
    and delta of the query rows ``row + rows`` of a sequence (``row`` int64, ``rows`` a tile)."""
    lse = tl.load(Lh + row * stride_lt + rows * stride_lt, mask=valid, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Dh + row * H + rows * H, mask=valid, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tiles(
    dk, dv, db, k, v, bias, Qh, DOh, Lh, Dh, offs_n, offs_d, d_valid, lo, hi, seq_len,
    stride_qt, stride_dot, stride_lt, H, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, MASK_SCORES: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    """dK, dV, d bias of one key tile over the query tiles [lo, hi). MASK_SCORES: tiles on the
    causal diagonal; MASK_ROWS: the query tile that straddles the sequence's end. Keys past the
    end (a key tile that straddles it) need no mask: their rows of dK, dV, d bias depend on
    nothing else and are never stored."""
    rm = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + rm
        m_valid = offs_m < seq_len
        row = tl.cast(start_m, tl.int64)
        q = _load_rows(Qh + row * stride_qt, stride_qt, rm, offs_d, m_valid, d_valid, MASK_ROWS, EVEN_D, UPCAST)
        do = _load_rows(DOh + row * stride_dot, stride_dot, rm, offs_d, m_valid, d_valid, MASK_ROWS, EVEN_D, UPCAST)
        lse, delta = _query_stats(Lh, Dh, row, stride_lt, H, rm, m_valid)
        pT, dsT = _bwd_p_ds(k, q, v, do, bias[:, None], lse[None, :], delta[None, :], offs_n[:, None],
                            offs_m[None, :], seq_len, qk_scale, HAS_BIAS, IS_CAUSAL, MASK_SCORES, DOT_PREC)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if HAS_BIAS:
            db += tl.sum(dsT, 1)
    return dk, dv, db


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, DBias, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bt, stride_bh, stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    H, BH, total, D, scale, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    row0, seq_len, bad = _seq_bounds(CuSeqlens, b, total)
    start_n = pid_n * BLOCK_N
    if bad | (start_n >= seq_len):
        return
    rn = tl.arange(0, BLOCK_N)
    offs_n = start_n + rn
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < seq_len
    d_valid = offs_d < D
    row_n = row0 + start_n

    k = _load_rows(K + row_n * stride_kt + h * stride_kh, stride_kt, rn, offs_d, n_valid, d_valid, True, EVEN_D, UPCAST)
    v = _load_rows(V + row_n * stride_vt + h * stride_vh, stride_vt, rn, offs_d, n_valid, d_valid, True, EVEN_D, UPCAST)
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias + row_n * stride_bt + h * stride_bh + rn * stride_bt, mask=n_valid, other=0.0)
        bias = bias.to(tl.float32) * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)

    Qh = Q + row0 * stride_qt + h * stride_qh
    DOh = DO + row0 * stride_dot + h * stride_doh
    Lh = Lse + row0 * stride_lt + h * stride_lh
    Dh = Delta + row0 * H + h
    # Query tiles [lo, mid) on the causal diagonal with a score mask, then the rest without
    # (query rows past the sequence's end load as zeros and get P = 0 from their lse).
    mid = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier query tiles see none of these keys
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, seq_len)
        dk, dv, db = _dkdv_tiles(
            dk, dv, db, k, v, bias, Qh, DOh, Lh, Dh, offs_n, offs_d, d_valid, lo, mid, seq_len,
            stride_qt, stride_dot, stride_lt, H, qk_scale,
            HAS_BIAS, IS_CAUSAL, BLOCK_M, EVEN_D, UPCAST, DOT_PREC, True, True,
        )
    dk, dv, db = _dkdv_tiles(
        dk, dv, db, k, v, bias, Qh, DOh, Lh, Dh, offs_n, offs_d, d_valid, mid, seq_len, seq_len,
        stride_qt, stride_dot, stride_lt, H, qk_scale,
        HAS_BIAS, IS_CAUSAL, BLOCK_M, EVEN_D, UPCAST, DOT_PREC, False, True,
    )

    dk = dk * scale
    kv_mask = n_valid[:, None] & d_valid[None, :]
    tl.store(DK + row_n * stride_dkt + h * stride_dkh + rn[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + row_n * stride_dvt + h * stride_dvh + rn[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    if HAS_BIAS:
        tl.store(DBias + row_n * H + h + rn * H, db, mask=n_valid)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, Kh, Vh, Bh, offs_m, offs_d, d_valid, lo, hi, seq_len,
    stride_kt, stride_vt, stride_bt, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr,
):
    """dQ of one query tile over the key tiles [lo, hi); MASKED as in the forward's ``_fwd_tiles``."""
    rn = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + rn
        n_valid = offs_n < seq_len
        row = tl.cast(start_n, tl.int64)
        k = _load_rows(Kh + row * stride_kt, stride_kt, rn, offs_d, n_valid, d_valid, MASKED, EVEN_D, UPCAST)
        v = _load_rows(Vh + row * stride_vt, stride_vt, rn, offs_d, n_valid, d_valid, MASKED, EVEN_D, UPCAST)
        bias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_BIAS:
            if MASKED:
                bias = tl.load(Bh + row * stride_bt + rn * stride_bt, mask=n_valid, other=0.0)
            else:
                bias = tl.load(Bh + row * stride_bt + rn * stride_bt)
            bias = bias.to(tl.float32) * 1.4426950408889634
        _, ds = _bwd_p_ds(q, k, do, v, bias[None, :], lse[:, None], delta[:, None], offs_n[None, :],
                          offs_m[:, None], seq_len, qk_scale, HAS_BIAS, IS_CAUSAL, MASKED, DOT_PREC)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bt, stride_bh, stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dqt, stride_dqh,
    H, BH, total, D, scale, qk_scale,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    row0, seq_len, bad = _seq_bounds(CuSeqlens, b, total)
    start_m = pid_m * BLOCK_M
    if bad | (start_m >= seq_len):
        return
    rm = tl.arange(0, BLOCK_M)
    offs_m = start_m + rm
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_len
    d_valid = offs_d < D
    row_m = row0 + start_m

    q = _load_rows(Q + row_m * stride_qt + h * stride_qh, stride_qt, rm, offs_d, m_valid, d_valid, True, EVEN_D, UPCAST)
    do = _load_rows(DO + row_m * stride_dot + h * stride_doh, stride_dot, rm, offs_d, m_valid, d_valid, True, EVEN_D,
                    UPCAST)
    lse, delta = _query_stats(Lse + h * stride_lh, Delta + h, row_m, stride_lt, H, rm, m_valid)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seq_len
    full = (seq_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    Kh = K + row0 * stride_kt + h * stride_kh
    Vh = V + row0 * stride_vt + h * stride_vh
    Bh = Bias + row0 * stride_bt + h * stride_bh
    dq = _dq_tiles(dq, q, do, lse, delta, Kh, Vh, Bh, offs_m, offs_d, d_valid, 0, full, seq_len,
                   stride_kt, stride_vt, stride_bt, qk_scale, HAS_BIAS, IS_CAUSAL, BLOCK_N, EVEN_D, UPCAST,
                   DOT_PREC, False)
    dq = _dq_tiles(dq, q, do, lse, delta, Kh, Vh, Bh, offs_m, offs_d, d_valid, full, hi, seq_len,
                   stride_kt, stride_vt, stride_bt, qk_scale, HAS_BIAS, IS_CAUSAL, BLOCK_N, EVEN_D, UPCAST,
                   DOT_PREC, True)

    dq = dq * scale
    tl.store(DQ + row_m * stride_dqt + h * stride_dqh + rm[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
# BLOCK_D for every head dim d in 8..256 (multiple of 8). d <= 16 is padded to 32, not 16: one
# variant fewer to compile and ship, for head dims that are rare.
_HEAD_BLOCKS = (32, 64, 128, 256)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_PRE_BLOCK_M = 64


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_d(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


_CFG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


# Sequences up to this long (e.g. ~140 tokens after pruning) take 64-query tiles in the 16-bit
# forward: with 128, ~45% of the tensor-core work on such sequences is tail padding.
_SHORT_SEQ = 192


def _fwd_config(dtype: torch.dtype, block_d: int, prec: str, max_seqlen: int = 1 << 30) -> dict:
    """Forward tiles (BLOCK_M queries x BLOCK_N keys), warps and pipeline stages, from dtype, head
    dim and (for 16-bit inputs) the longest sequence.

    Chosen with the compile check (``tests/triton_compile_check.py``): no spills on sm_80 and sm_90
    under triton 3.6 and 3.8 at the mission shapes. 128-query tiles take 8 warps (16 rows a warp;
    with 4 they spilled on sm_80 at d = 64), d = 256 narrower key tiles and 8 warps. IEEE fp32
    dots run on CUDA cores (FMA), whose operands hold whole rows of the head dim in registers:
    16 x 16 tiles from d = 128 on.
    """
    if prec == "ieee":
        cfg = {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 8, 1)}[block_d]
    elif dtype != torch.float32 and max_seqlen <= _SHORT_SEQ and block_d <= 128:
        cfg = (64, 64, 4, 2)  # 3 stages spilled 8 B (fp16, sm_80); ~3 key tiles a sequence anyway
    elif dtype != torch.float32:
        cfg = {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}[block_d]
    else:  # tf32
        cfg = {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3), 256: (32, 32, 4, 2)}[block_d]
    return dict(zip(_CFG_KEYS, cfg))


def _bwd_config(dtype: torch.dtype, block_d: int, prec: str) -> tuple[dict, dict]:
    """Tiles of the dK/dV kernel (BLOCK_N: its key tile, BLOCK_M: the query tiles it streams) and
    of the dQ kernel (BLOCK_M: its query tile, BLOCK_N: the key tiles it streams), as
    ``(BLOCK_M, BLOCK_N, warps, stages)``; chosen like the forward's. The dK/dV kernel holds two
    fp32 accumulators and its K/V tile: 32-query steps (64 spilled at d = 64 on sm_80 and under
    triton 3.6 on sm_90)."""
    if prec == "ieee":
        dkdv = {32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (16, 16, 4, 1), 256: (16, 16, 8, 1)}[block_d]
        dq = {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 8, 2)}[block_d]
    elif dtype != torch.float32:
        dkdv = {32: (32, 64, 4, 3), 64: (32, 64, 4, 3), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)}[block_d]
        dq = {32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 64, 8, 2), 256: (32, 32, 8, 1)}[block_d]
    else:  # tf32
        dkdv = dq = {32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)}[block_d]
    return dict(zip(_CFG_KEYS, dkdv)), dict(zip(_CFG_KEYS, dq))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE fp32 dots unless the user allowed TF32 in PyTorch (as torch.matmul does),
    # through the current fp32_precision API or the legacy allow_tf32.
    if dtype == torch.float32 and not fp32_dots_allow_tf32():
        return "ieee"
    return "tf32"


def _bh_grid(tiles: int, bh: int) -> tuple[int, int, int]:
    return (tiles, min(bh, _MAX_GRID_Y), triton.cdiv(bh, _MAX_GRID_Y))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_args(key_bias: Optional[Tensor], dummy: Tensor) -> tuple[Tensor, int, int]:
    """(pointer, stride over tokens, stride over heads); a per-key [total] bias has head stride 0."""
    if key_bias is None:
        return dummy, 0, 0
    if key_bias.dim() == 1:
        return key_bias, key_bias.stride(0), 0
    return key_bias, key_bias.stride(0), key_bias.stride(1)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


def varlen_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    key_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """q, k, v ``[total, H, d]`` -> (out ``[total, H, d]`` in q.dtype, lse float32 ``[total, H]``)."""
    total, H, D = q.shape
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty((total, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((total, H), dtype=torch.float32, device=q.device)
    B = cu_seqlens.numel() - 1
    if total == 0 or B <= 0 or max_seqlen <= 0:
        return out, lse
    cu = cu_seqlens.to(torch.int32).contiguous()
    block_d = _block_d(D)
    prec = _dot_precision(q.dtype)
    cfg = _fwd_config(q.dtype, block_d, prec, max_seqlen)
    bias, sbt, sbh = _bias_args(key_bias, q)
    grid = _bh_grid(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, bias, out, lse, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), sbt, sbh, lse.stride(0), lse.stride(1),
        H, B * H, total, D, scale * _LOG2E,
        HAS_BIAS=key_bias is not None, IS_CAUSAL=bool(causal),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, EVEN_D=block_d == D,
        UPCAST=_interpret(), DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def varlen_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    key_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(dq, dk, dv, d key_bias or None), each in its input's dtype and shape."""
    total, H, D = q.shape
    grad, q, k, v, out = (_last_dim_contiguous(t) for t in (grad, q, k, v, out))
    dq = torch.empty((total, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((total, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((total, H, D), dtype=v.dtype, device=q.device)
    dbias = None
    if key_bias is not None:
        dbias = torch.zeros((total, H), dtype=torch.float32, device=q.device)
    B = cu_seqlens.numel() - 1
    if total == 0 or B <= 0 or max_seqlen <= 0:
        if dbias is not None:
            dbias = (dbias if key_bias.dim() == 2 else dbias.sum(dim=1)).to(key_bias.dtype)
        return dq, dk, dv, dbias
    cu = cu_seqlens.to(torch.int32).contiguous()
    lse = lse.to(torch.float32)
    block_d = _block_d(D)
    interpret = _interpret()
    prec = _dot_precision(q.dtype)

    delta = torch.empty((total, H), dtype=torch.float32, device=q.device)
    _bwd_preprocess[(triton.cdiv(total, _PRE_BLOCK_M), H)](
        out, grad, delta, out.stride(0), out.stride(1), grad.stride(0), grad.stride(1),
        total, H, D, BLOCK_M=_PRE_BLOCK_M, BLOCK_D=block_d,
    )

    cfg_kv, cfg_q = _bwd_config(q.dtype, block_d, prec)
    bias, sbt, sbh = _bias_args(key_bias, q)
    common = dict(
        HAS_BIAS=key_bias is not None, IS_CAUSAL=bool(causal), BLOCK_D=block_d, EVEN_D=block_d == D,
        UPCAST=interpret, DOT_PREC=prec,
    )
    strides_in = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        sbt, sbh, grad.stride(0), grad.stride(1), lse.stride(0), lse.stride(1),
    )
    _bwd_dkdv_kernel[_bh_grid(triton.cdiv(max_seqlen, cfg_kv["BLOCK_N"]), B * H)](
        q, k, v, bias, grad, lse, delta, dk, dv, q if dbias is None else dbias, cu,
        *strides_in, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        H, B * H, total, D, scale, scale * _LOG2E, **common, **cfg_kv,
    )
    _bwd_dq_kernel[_bh_grid(triton.cdiv(max_seqlen, cfg_q["BLOCK_M"]), B * H)](
        q, k, v, bias, grad, lse, delta, dq, cu,
        *strides_in, dq.stride(0), dq.stride(1),
        H, B * H, total, D, scale, scale * _LOG2E, **common, **cfg_q,
    )
    if dbias is not None:
        dbias = (dbias if key_bias.dim() == 2 else dbias.sum(dim=1)).to(key_bias.dtype)
    return dq, dk, dv, dbias
