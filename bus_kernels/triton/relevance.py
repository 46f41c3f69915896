"""Triton kernels for ``relevance_scores``, forward and backward.

``s[b, n] = sum_{h,t} w[b,t] softmax_n(scale * <q[b,h,t], k[b,h,n]>)`` with ``w`` the mean over heads
and real text tokens: ``w[b,t] = m[b,t] * c[b]``, ``m`` the 0/1 text mask, ``c[b] = 1 / (H * T_real)``.

Forward, grid ``(B*H, T tiles)``: a program holds one tile of at most 64 text queries in registers
and streams the N keys twice: a first pass for each query's log-sum-exp (online max/sum, base 2),
a second for the probabilities. ``k[b, h]`` (N * d elements, e.g. 577 * 64 * 2 B = 74 KB) is
re-read from L2, so HBM sees k about once per T tile (once in total for T <= 64: a text [CLS] or a
caption). Each program writes its fp32 partial row ``[N]``; the launcher sums the H * T-tiles
partials (deterministic, no atomics). Tiling T keeps registers and shared memory bounded: one
``next_pow2(T)`` tile spilled at T = 256 and needed 176 KB of shared memory at T = 512.
One text query (T = 1, a text [CLS]) is a matrix-vector product: ``BLOCK_T = 1``, fp32 products and
row sums instead of a dot padded to 16 queries (``GEMV``), and the forward keeps the first pass's
logits (4 B a key, in the partial row it then overwrites) instead of reading k a second time.

Backward, ``dlogit[t, n] = scale * c * m[t] * p[t, n] * (g[n] - r[t])`` with ``r[t] = sum_n g[n] p[t, n]``:
  ``_relevance_bwd_kernel``, grid ``(B*H, T tiles)``: a pass for ``r``, then a pass accumulating
  ``dq`` and, when T fits one tile, writing ``dk`` tiles too (k streamed twice in all).
  ``_relevance_bwd_dk_kernel``, grid ``(B*H, N tiles)``, only when T spans several tiles: each
  key tile accumulates ``dk`` over the query tiles (``r`` stored by the first kernel).
The dots take ``p * (g - r) / gs`` rounded to the input dtype (tensor cores), where ``gs`` is a power
of two >= max |g[b]|: |p * (g - r) / gs| <= 2 p, so every probability that matters is a normal
fp16 number whatever the gradient's size. The factors ``scale * c * gs`` are applied in fp32 after
the dots. (Folding them into the dot operand, as before, made it ~1e-7 at the mission shapes:
subnormal or zero in fp16, 73% dq error at gradients of 1e-2.) The [B, H, T, N] matrix never exists.

Dots run on tensor cores in the input dtype with fp32 accumulation (fp32 inputs: IEEE unless PyTorch
allows TF32, see ``bus_kernels._backend.fp32_dots_allow_tf32``); softmax arithmetic is fp32.
Per-program base offsets are int64 (``B * N * d`` may exceed 2^31). Under ``TRITON_INTERPRET=1``
(CPU tests) operands are upcast to fp32 after loading (``F32``), but the dot operand of the
backward is still rounded to the input dtype first, as on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._backend import fp32_dots_allow_tf32

_LOG2E = 1.4426950408889634
_MAX_BLOCK_T = 64  # text queries per program
_MAX_TILE_TD = 64 * 128  # BLOCK_T * BLOCK_D: d = 256 takes 32 queries a tile


@triton.jit
def _load_tile(ptr, base, stride_r, r0, R, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of a [R, d] matrix at ``ptr + base`` (base int64; rows
    ``stride_r`` apart, the last dim contiguous), zeros outside."""
    r = r0 + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + base + r[:, None] * stride_r + dd[None, :], mask=(r[:, None] < R) & (dd[None, :] < d), other=0.0)
    if F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits(q, k_ptr, k_base, stride_kn, n0, N, d, scale_log2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            F32: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr):
    """Base-2 logits [BLOCK_T, BLOCK_N] of one key tile (-inf past N), the tile and its rows.
    GEMV (one text query, BLOCK_T = 1): fp32 products and a row sum instead of a dot padded to 16
    queries (15/16 of it wasted work, and registers: fp32 FMA dots hold whole operand rows)."""
    k = _load_tile(k_ptr, k_base, stride_kn, n0, N, d, BLOCK_N, BLOCK_D, F32)
    n = n0 + tl.arange(0, BLOCK_N)
    if GEMV:
        x = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :] * scale_log2
    else:
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    x = tl.where((n < N)[None, :], x, float("-inf"))
    return x, k, n


@triton.jit
def _bases(pid, H, stride_qb, stride_qh, stride_kb, stride_kh):
    """int64 offsets of q[b, h] and k[b, h] for pid = b * H + h (q and k may be strided views)."""
    b = pid // H
    h = pid % H
    return b * stride_qb + h * stride_qh, b * stride_kb + h * stride_kh


@triton.jit
def _dot_operand(pg, IN_DTYPE: tl.constexpr, F32: tl.constexpr):
    """``pg`` rounded to the input dtype as the tensor-core dot takes it (also under the interpreter)."""
    pg = pg.to(IN_DTYPE)
    if F32:
        pg = pg.to(tl.float32)
    return pg


@triton.jit
def _relevance_fwd_kernel(
    q_ptr, k_ptr, w_ptr, part_ptr, lse_ptr, H, T, N, d,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, scale_log2,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    tile = tl.program_id(1).to(tl.int64)  # int64 rows: with BLOCK_T = 1 they are scalars
    b = pid // H
    t0 = tile * BLOCK_T
    q_base, k_base = _bases(pid, H, stride_qb, stride_qh, stride_kb, stride_kh)
    q = _load_tile(q_ptr, q_base, stride_qt, t0, T, d, BLOCK_T, BLOCK_D, F32)
    t = t0 + tl.arange(0, BLOCK_T)
    w = tl.load(w_ptr + b * T + t, mask=t < T, other=0.0)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    GEMV: tl.constexpr = BLOCK_T == 1
    part_row = (pid * tl.num_programs(1) + tile) * N
    for n0 in range(0, N, BLOCK_N):
        x, _, n = _logits(q, k_ptr, k_base, stride_kn, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION, GEMV)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m = m_new
        if GEMV:  # keep the logits (4 B a key, in the row written below) rather than read k again
            tl.store(part_ptr + part_row + n[None, :], x, mask=(n < N)[None, :])
    lse2 = m + tl.log2(l)
    tl.store(lse_ptr + pid * T + t, lse2 * 0.6931471805599453, mask=t < T)
    if GEMV:
        tl.debug_barrier()  # the second pass reads logits other threads of this program wrote
    for n0 in range(0, N, BLOCK_N):
        if GEMV:
            n = n0 + tl.arange(0, BLOCK_N)
            x = tl.load(part_ptr + part_row + n[None, :], mask=(n < N)[None, :], other=float("-inf"))
        else:
            x, _, n = _logits(q, k_ptr, k_base, stride_kn, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION,
                              GEMV)
        p = tl.exp2(x - lse2[:, None])
        tl.store(part_ptr + part_row + n, tl.sum(p * w[:, None], axis=0), mask=n < N)


@triton.jit
def _relevance_bwd_kernel(
    q_ptr, k_ptr, w_ptr, c_ptr, gs_ptr, lse_ptr, g_ptr, r_ptr, dq_ptr, dk_ptr,
    H, T, N, d, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, scale_log2, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr, PRECISION: tl.constexpr, WRITE_DK: tl.constexpr,
):
    """r and dq of one query tile; dk too when the tile holds every query (WRITE_DK), else r is
    stored for ``_relevance_bwd_dk_kernel``. dq and dk are contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_T
    b = pid // H
    q_base, k_base = _bases(pid, H, stride_qb, stride_qh, stride_kb, stride_kh)
    q = _load_tile(q_ptr, q_base, stride_qt, t0, T, d, BLOCK_T, BLOCK_D, F32)
    t = t0 + tl.arange(0, BLOCK_T)
    t_valid = t < T
    active = tl.load(w_ptr + b * T + t, mask=t_valid, other=0.0) != 0.0  # real text tokens
    lse2 = tl.load(lse_ptr + pid * T + t, mask=t_valid, other=0.0) * 1.4426950408889634
    gs = tl.load(gs_ptr + b)
    inv_gs = 1.0 / gs  # a power of two: exact
    GEMV: tl.constexpr = BLOCK_T == 1
    r = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        x, _, n = _logits(q, k_ptr, k_base, stride_kn, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION, GEMV)
        g = tl.load(g_ptr + b * N + n, mask=n < N, other=0.0)
        r += tl.sum(tl.exp2(x - lse2[:, None]) * g[None, :], axis=1)
    if not WRITE_DK:
        tl.store(r_ptr + pid * T + t, r, mask=t_valid)
    coef = tl.load(c_ptr + b) * scale * gs  # applied after the dots, in fp32
    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    dd = tl.arange(0, BLOCK_D)
    for n0 in range(0, N, BLOCK_N):
        x, k, n = _logits(q, k_ptr, k_base, stride_kn, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION, GEMV)
        g = tl.load(g_ptr + b * N + n, mask=n < N, other=0.0)
        pg = tl.exp2(x - lse2[:, None]) * ((g[None, :] - r[:, None]) * inv_gs)
        pg = tl.where(active[:, None], pg, 0.0)
        if GEMV:  # fp32 products, no rounding of pg: [BLOCK_N] x [BLOCK_N, BLOCK_D]
            pg_n = tl.sum(pg, axis=0)
            dq += tl.sum(pg_n[:, None] * k.to(tl.float32), axis=0)[None, :]
            if WRITE_DK:
                dk = pg_n[:, None] * q.to(tl.float32) * coef
        else:
            pg = _dot_operand(pg, q_ptr.dtype.element_ty, F32)
            dq += tl.dot(pg, k, input_precision=PRECISION)
            if WRITE_DK:
                dk = tl.dot(tl.trans(pg), q, input_precision=PRECISION) * coef
        if WRITE_DK:
            tl.store(dk_ptr + pid * N * d + n[:, None] * d + dd[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=(n[:, None] < N) & (dd[None, :] < d))
    dq = dq * coef
    tl.store(dq_ptr + pid * T * d + t[:, None] * d + dd[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=t_valid[:, None] & (dd[None, :] < d))


@triton.jit
def _relevance_bwd_dk_kernel(
    q_ptr, k_ptr, w_ptr, c_ptr, gs_ptr, lse_ptr, g_ptr, r_ptr, dk_ptr,
    H, T, N, d, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, scale_log2, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk of one key tile, accumulated over every query tile (T spans several tiles)."""
    pid = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    b = pid // H
    q_base, k_base = _bases(pid, H, stride_qb, stride_qh, stride_kb, stride_kh)
    k = _load_tile(k_ptr, k_base, stride_kn, n0, N, d, BLOCK_N, BLOCK_D, F32)
    n = n0 + tl.arange(0, BLOCK_N)
    n_valid = n < N
    g = tl.load(g_ptr + b * N + n, mask=n_valid, other=0.0)
    gs = tl.load(gs_ptr + b)
    inv_gs = 1.0 / gs
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        q = _load_tile(q_ptr, q_base, stride_qt, t0, T, d, BLOCK_T, BLOCK_D, F32)
        t = t0 + tl.arange(0, BLOCK_T)
        t_valid = t < T
        active = tl.load(w_ptr + b * T + t, mask=t_valid, other=0.0) != 0.0
        lse2 = tl.load(lse_ptr + pid * T + t, mask=t_valid, other=0.0) * 1.4426950408889634
        r = tl.load(r_ptr + pid * T + t, mask=t_valid, other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        x = tl.where(n_valid[None, :], x, float("-inf"))
        pg = tl.exp2(x - lse2[:, None]) * ((g[None, :] - r[:, None]) * inv_gs)
        pg = _dot_operand(tl.where(active[:, None], pg, 0.0), q_ptr.dtype.element_ty, F32)
        dk += tl.dot(tl.trans(pg), q, input_precision=PRECISION)
    dk = dk * (tl.load(c_ptr + b) * scale * gs)
    dd = tl.arange(0, BLOCK_D)
    tl.store(dk_ptr + pid * N * d + n[:, None] * d + dd[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=n_valid[:, None] & (dd[None, :] < d))


# ------------------------------------------------------------------------------------ launchers
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(T: int, d: int, precision: str = "tf32") -> dict:
    """Tiles from the problem: d padded to a power of two (>= 16 for tl.dot); T tiled by at most
    64 queries (32 at d = 256) so that registers and shared memory do not grow with T; one query
    is a GEMV (``BLOCK_T = 1``). Chosen with the compile check (no spills on sm_80 and sm_90,
    triton 3.6 and 3.8): 8 warps for the largest tiles (the backward's dq and dk accumulators
    spilled with 4 at d = 256); IEEE fp32 dots, on CUDA cores (FMA) with whole head-dim rows of
    both operands in registers, 16 x 16 tiles (32 queries x 64 keys spilled from d = 64)."""
    block_d = max(16, triton.next_power_of_2(d))
    if T == 1:  # one query: no dots (see _logits' GEMV); 8192 elements of k a tile, 4096 at d = 256
        return dict(BLOCK_T=1, BLOCK_N=max(16, (8192 if block_d <= 128 else 4096) // block_d), BLOCK_D=block_d,
                    num_warps=4)
    if precision == "ieee":
        return dict(BLOCK_T=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8)
    block_t = min(max(16, triton.next_power_of_2(T)), _MAX_BLOCK_T, max(16, _MAX_TILE_TD // block_d))
    block_n = 64 if block_t * block_d <= 64 * 64 else 32
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8 if block_t * block_d >= _MAX_TILE_TD else 4)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not fp32_dots_allow_tf32():
        return "ieee"
    return "tf32"


def _weights(q: torch.Tensor, q_mask) -> torch.Tensor:
    """fp32 [B, T]: 1 / (H * number of real tokens) for real tokens, 0 for the others."""
    B, H, T, _ = q.shape
    if q_mask is None:
        return torch.full((B, T), 1.0 / (H * T), dtype=torch.float32, device=q.device)
    m = q_mask.to(torch.float32)
    return m / (H * m.sum(dim=1, keepdim=True))


def _grad_scale(grad: torch.Tensor) -> torch.Tensor:
    """fp32 [B]: the smallest power of two >= max |grad[b]| (1 for an all-zero row); on device."""
    gmax = grad.abs().amax(dim=1)
    gmax = torch.where(torch.isfinite(gmax) & (gmax > 0), gmax, torch.ones_like(gmax))
    return torch.exp2(torch.ceil(torch.log2(gmax)))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Strided views (e.g. k[:, :, P:] of a fused qkv projection) are read in place: no copy.
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))


def relevance_scores_forward(q, k, scale, q_mask):
    """q [B,H,T,d], k [B,H,N,d] (any strides) -> (scores fp32 [B,N], lse fp32 [B,H,T])."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, H, T, d = q.shape
    N = k.shape[2]
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if B * H == 0 or N == 0:
        return torch.zeros((B, N), dtype=torch.float32, device=q.device), lse.fill_(float("-inf"))
    cfg = _config(T, d, _precision(q.dtype))
    tiles = triton.cdiv(T, cfg["BLOCK_T"])
    part = torch.empty((B, H * tiles, N), dtype=torch.float32, device=q.device)
    _relevance_fwd_kernel[(B * H, tiles)](
        q, k, _weights(q, q_mask), part, lse, H, T, N, d, *_strides(q, k), scale * _LOG2E,
        F32=_interpret(), PRECISION=_precision(q.dtype), **cfg,
    )
    return part.sum(dim=1), lse


def relevance_scores_backward(grad, q, k, lse, scale, q_mask):
    """Gradients (dq [B,H,T,d], dk [B,H,N,d], contiguous) in q's and k's dtypes."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, H, T, d = q.shape
    N = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * H == 0 or N == 0:
        return dq.zero_(), dk.zero_()
    cfg = _config(T, d, _precision(q.dtype))
    tiles = triton.cdiv(T, cfg["BLOCK_T"])
    grad = grad.to(torch.float32).contiguous()
    w = _weights(q, q_mask)
    c = w.amax(dim=1)  # 1 / (H * real tokens) of each sample
    gs = _grad_scale(grad)
    r = torch.empty((B, H, T), dtype=torch.float32, device=q.device) if tiles > 1 else lse
    common = dict(F32=_interpret(), PRECISION=_precision(q.dtype), **cfg)
    args = (q, k, w, c, gs, lse.contiguous(), grad, r)
    _relevance_bwd_kernel[(B * H, tiles)](
        *args, dq, dk, H, T, N, d, *_strides(q, k), scale * _LOG2E, scale, WRITE_DK=tiles == 1, **common
    )
    if tiles > 1:
        _relevance_bwd_dk_kernel[(B * H, triton.cdiv(N, cfg["BLOCK_N"]))](
            *args, dk, H, T, N, d, *_strides(q, k), scale * _LOG2E, scale, **common
        )
    return dq, dk


def compile_cases():
    """Every kernel x dtype x a representative set of the tiles ``_config`` picks (T = 1, a caption,
    several query tiles; head dims 64 to 256)."""
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        precision = _precision(dtype) if dtype == torch.float32 else "tf32"
        for T, d in ((1, 64), (32, 64), (16, 128), (64, 64), (256, 64), (32, 256), (256, 256)):
            cfg = _config(T, d, precision)
            opts = {"num_warps": cfg.pop("num_warps")}
            consts = dict(cfg, F32=False, PRECISION=precision)
            fwd_sig = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "w_ptr": "*fp32", "part_ptr": "*fp32",
                       "lse_ptr": "*fp32", "H": "i32", "T": "i32", "N": "i32", "d": "i32",
                       "stride_qb": "i32", "stride_qh": "i32", "stride_qt": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32", "scale_log2": "fp32"}
            yield _relevance_fwd_kernel, fwd_sig, consts, opts
            bwd_sig = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "w_ptr": "*fp32", "c_ptr": "*fp32",
                       "gs_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": "*fp32", "r_ptr": "*fp32",
                       "dq_ptr": f"*{name}", "dk_ptr": f"*{name}", "H": "i32", "T": "i32", "N": "i32",
                       "d": "i32", "stride_qb": "i32", "stride_qh": "i32", "stride_qt": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32", "scale_log2": "fp32", "scale": "fp32"}
            single = T <= cfg["BLOCK_T"]
            yield _relevance_bwd_kernel, bwd_sig, dict(consts, WRITE_DK=single), opts
            if not single:
                dk_sig = {a: t for a, t in bwd_sig.items() if a != "dq_ptr"}
                yield _relevance_bwd_dk_kernel, dk_sig, consts, opts
