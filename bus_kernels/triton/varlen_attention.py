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
                                  query tiles stream by; accumulates dK, dV and d key_bias (column sums of
                                  dS, per head) in fp32.
            ``_bwd_dq_kernel``   grid (query tiles, B*H): dQ, by streaming key tiles (deterministic, no atomics).
The attention matrix is never stored. Head dims that are not a power of two are padded to the next
power of two (at least 32) with masks.
``key_bias`` (none, per head, or per key through a head stride of 0) and ``causal`` are runtime
flags (uniform branches and a mask term), not constexprs: each kernel compiles once per dtype x
head-dim block, which keeps the sm_80/sm_90 compile check at 120 compilations rather than 480.

Under ``TRITON_INTERPRET=1`` (CPU tests) operands are cast to fp32 right after loading (``UPCAST``),
because the interpreter's bf16/fp16 arithmetic is not faithful; on a GPU fp16/bf16 operands go into
``tl.dot`` as they are, with fp32 accumulation.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

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
def _fwd_tiles(
    acc, l_i, m_i, q, K, V, Bias, row0, h, offs_m, offs_d, d_valid, lo, hi, seq_len,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_bh, qk_scale, has_bias, is_causal,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi). MASKED: the tiles that straddle the end of the
    sequence or (causal) the diagonal; the others need no score mask at all."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + (row0 + offs_n[:, None]) * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (row0 + offs_n[:, None]) * stride_vt + h * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if has_bias:
            bias = tl.load(Bias + (row0 + offs_n) * stride_bt + h * stride_bh, mask=n_valid, other=0.0)
            s += bias.to(tl.float32)[None, :] * 1.4426950408889634
        if MASKED:
            valid = n_valid[None, :] & ((offs_n[None, :] <= offs_m[:, None]) | (is_causal == 0))
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


@triton.jit(do_not_specialize=["has_bias", "is_causal"])
def _fwd_kernel(
    Q, K, V, Bias, Out, Lse, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_bh, stride_lt, stride_lh,
    H, BH, total, D, qk_scale,
    has_bias, is_causal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    if (seq_start < 0) | (seq_len < 0) | (seq_start.to(tl.int64) + seq_len > total):
        return  # malformed cu_seqlens (value checks off): never touch rows outside [0, total)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    row0 = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_len
    d_valid = offs_d < D

    q = tl.load(Q + (row0 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key tiles every query of this tile sees whole (inside the sequence and, causal, at or
    # before the tile's first query) run without a score mask; the rest (the sequence's last
    # tile, the diagonal) with one.
    hi = seq_len
    full = (seq_len // BLOCK_N) * BLOCK_N
    if is_causal:
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K, V, Bias, row0, h, offs_m, offs_d, d_valid, 0, full, seq_len,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_bh, qk_scale, has_bias, is_causal,
        BLOCK_N, UPCAST, DOT_PREC, False,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K, V, Bias, row0, h, offs_m, offs_d, d_valid, full, hi, seq_len,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_bh, qk_scale, has_bias, is_causal,
        BLOCK_N, UPCAST, DOT_PREC, True,
    )

    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_mass, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(Out + (row0 + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(Lse + (row0 + offs_m) * stride_lt + h * stride_lh, lse, mask=m_valid)


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


@triton.jit(do_not_specialize=["has_bias", "is_causal"])
def _bwd_dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, DBias, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bt, stride_bh, stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    H, BH, total, D, scale, qk_scale,
    has_bias, is_causal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    if (seq_start < 0) | (seq_len < 0) | (seq_start.to(tl.int64) + seq_len > total):
        return  # malformed cu_seqlens (value checks off): never touch rows outside [0, total)
    start_n = pid_n * BLOCK_N
    if start_n >= seq_len:
        return
    row0 = seq_start.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < seq_len
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]

    k = tl.load(K + (row0 + offs_n[:, None]) * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (row0 + offs_n[:, None]) * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    bias = tl.zeros([BLOCK_N], tl.float32)
    if has_bias:
        bias = tl.load(Bias + (row0 + offs_n) * stride_bt + h * stride_bh, mask=n_valid, other=0.0)
        bias = bias.to(tl.float32) * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)

    lo = 0
    if is_causal:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier query tiles see none of these keys
    for start_m in range(lo, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < seq_len
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + (row0 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (row0 + offs_m[:, None]) * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(Lse + (row0 + offs_m) * stride_lt + h * stride_lh, mask=m_valid, other=0.0)
        # A query with no finite logit (lse = -inf) has P = 0: +inf makes exp2(s - lse) vanish.
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta + (row0 + offs_m) * H + h, mask=m_valid, other=0.0)

        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        if has_bias:
            sT += bias[:, None]
        valid = n_valid[:, None] & m_valid[None, :] & ((offs_n[:, None] <= offs_m[None, :]) | (is_causal == 0))
        pT = tl.where(valid, tl.exp2(sT - lse[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if has_bias:
            db += tl.sum(dsT, 1)

    dk = dk * scale
    tl.store(DK + (row0 + offs_n[:, None]) * stride_dkt + h * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (row0 + offs_n[:, None]) * stride_dvt + h * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    if has_bias:
        tl.store(DBias + (row0 + offs_n) * H + h, db, mask=n_valid)


@triton.jit(do_not_specialize=["has_bias", "is_causal"])
def _bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bt, stride_bh, stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dqt, stride_dqh,
    H, BH, total, D, scale, qk_scale,
    has_bias, is_causal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + tl.program_id(2) * 65535
    if pid_bh >= BH:
        return
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    if (seq_start < 0) | (seq_len < 0) | (seq_start.to(tl.int64) + seq_len > total):
        return  # malformed cu_seqlens (value checks off): never touch rows outside [0, total)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    row0 = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_len
    d_valid = offs_d < D
    q_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + (row0 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + (row0 + offs_m[:, None]) * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + (row0 + offs_m) * stride_lt + h * stride_lh, mask=m_valid, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + (row0 + offs_m) * H + h, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seq_len
    if is_causal:
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + (row0 + offs_n[:, None]) * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + (row0 + offs_n[:, None]) * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if has_bias:
            bias = tl.load(Bias + (row0 + offs_n) * stride_bt + h * stride_bh, mask=n_valid, other=0.0)
            s += bias.to(tl.float32)[None, :] * 1.4426950408889634
        valid = m_valid[:, None] & n_valid[None, :] & ((offs_n[None, :] <= offs_m[:, None]) | (is_causal == 0))
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    dq = dq * scale
    tl.store(DQ + (row0 + offs_m[:, None]) * stride_dqt + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


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

    fp32 tiles take twice the shared memory of fp16/bf16 ones; d = 256 gets narrower key tiles so
    that the pipelined K/V buffers fit sm_80's 163 KiB. IEEE fp32 dots run on CUDA cores (FMA), where
    large tiles only cost registers and compile time: they get small tiles.
    """
    if prec == "ieee":
        cfg = (32, 32, 4, 2)
    elif dtype != torch.float32 and max_seqlen <= _SHORT_SEQ and block_d <= 128:
        cfg = (64, 64, 4, 3)
    elif dtype != torch.float32:
        cfg = {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}[block_d]
    else:  # tf32
        cfg = {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3), 256: (32, 32, 4, 2)}[block_d]
    return dict(zip(_CFG_KEYS, cfg))


def _bwd_config(dtype: torch.dtype, block_d: int, prec: str) -> dict:
    """Tiles shared by the dK/dV and dQ kernels (BLOCK_N: key tile, BLOCK_M: query tile)."""
    if prec == "ieee":
        cfg = (32, 32, 4, 2) if block_d <= 128 else (16, 32, 4, 1)
    elif dtype != torch.float32:
        cfg = {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 32, 4, 1)}[block_d]
    else:  # tf32
        cfg = {32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)}[block_d]
    return dict(zip(_CFG_KEYS, cfg))


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
        int(key_bias is not None), int(causal),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
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

    cfg = _bwd_config(q.dtype, block_d, prec)
    bias, sbt, sbh = _bias_args(key_bias, q)
    flags = (int(key_bias is not None), int(causal))
    common = dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
        UPCAST=interpret, DOT_PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    strides_in = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        sbt, sbh, grad.stride(0), grad.stride(1), lse.stride(0), lse.stride(1),
    )
    _bwd_dkdv_kernel[_bh_grid(triton.cdiv(max_seqlen, cfg["BLOCK_N"]), B * H)](
        q, k, v, bias, grad, lse, delta, dk, dv, q if dbias is None else dbias, cu,
        *strides_in, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        H, B * H, total, D, scale, scale * _LOG2E, *flags, **common,
    )
    _bwd_dq_kernel[_bh_grid(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), B * H)](
        q, k, v, bias, grad, lse, delta, dq, cu,
        *strides_in, dq.stride(0), dq.stride(1),
        H, B * H, total, D, scale, scale * _LOG2E, *flags, **common,
    )
    if dbias is not None:
        dbias = (dbias if key_bias.dim() == 2 else dbias.sum(dim=1)).to(key_bias.dtype)
    return dq, dk, dv, dbias


# --------------------------------------------------------------------------------------------------
# compile check (tests/triton_compile_check.py)
# --------------------------------------------------------------------------------------------------


def compile_cases() -> Iterator[tuple]:
    """Every (kernel, signature, constexprs, options) the launchers can pick on a GPU: each dtype
    (fp32 with IEEE and with TF32 dots) x padded head dim. Bias mode and causal masking are runtime
    flags (uniform branches), so each case covers all four of their combinations; a per-key [total]
    bias is the [total, H] path with head stride 0. The bias is compiled in the input dtype."""
    i32, f32 = "i32", "fp32"
    for dtype in _DTYPES:
        t = "*" + _TL_NAME[dtype]
        precs = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
        for block_d in _HEAD_BLOCKS:
            yield _case(
                _bwd_preprocess,
                {"Out": t, "DO": t, "Delta": "*fp32"},
                dict.fromkeys(("stride_ot", "stride_oh", "stride_dot", "stride_doh", "total", "H", "D"), i32),
                {"BLOCK_M": _PRE_BLOCK_M, "BLOCK_D": block_d},
                {"num_warps": 4, "num_stages": 1},
            )
            for prec in precs:
                flags = {"BLOCK_D": block_d, "UPCAST": False, "DOT_PREC": prec}
                fwd_cfgs = {tuple(_fwd_config(dtype, block_d, prec, n).items()) for n in (_SHORT_SEQ, 1 << 30)}
                for cfg in map(dict, sorted(fwd_cfgs)):
                    yield _case(
                        _fwd_kernel,
                        {"Q": t, "K": t, "V": t, "Bias": t, "Out": t, "Lse": "*fp32", "CuSeqlens": "*i32"},
                        dict.fromkeys(_int_args(_fwd_kernel), i32) | {"qk_scale": f32},
                        dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]),
                        {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                    )
                cfg = _bwd_config(dtype, block_d, prec)
                ptrs = {"Q": t, "K": t, "V": t, "Bias": t, "DO": t, "Lse": "*fp32", "Delta": "*fp32",
                        "CuSeqlens": "*i32"}
                for kernel, outs in ((_bwd_dkdv_kernel, {"DK": t, "DV": t, "DBias": "*fp32"}),
                                     (_bwd_dq_kernel, {"DQ": t})):
                    yield _case(
                        kernel,
                        ptrs | outs,
                        dict.fromkeys(_int_args(kernel), i32) | {"scale": f32, "qk_scale": f32},
                        dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]),
                        {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                    )


def _int_args(kernel) -> list[str]:
    return [n for n in kernel.arg_names if n.startswith("stride_") or n in ("H", "BH", "total", "D", "has_bias", "is_causal")]


def _case(kernel, ptrs: dict, scalars: dict, constexprs: dict, options: dict) -> tuple:
    sig = dict(ptrs, **scalars, **dict.fromkeys(constexprs, "constexpr"))
    sig = {name: sig[name] for name in kernel.arg_names}  # every argument, in order
    return kernel, sig, constexprs, options
