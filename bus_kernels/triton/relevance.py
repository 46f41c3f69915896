"""Triton kernels for ``relevance_scores``, forward and backward.

``s[b, n] = sum_{h,t} w[b,t] softmax_n(scale * <q[b,h,t], k[b,h,n]>)`` with ``w`` the mean over heads
and real text tokens. One program per (b, h) holds its T text queries in registers and streams
the N keys twice: a first pass for each query's log-sum-exp (online max/sum, base 2), a second
for the probabilities. ``k[b, h]`` (N * d elements, e.g. 577 * 64 * 2 B = 74 KB) is re-read from
L2, so HBM sees k once. Each program writes its head's fp32 partial row ``[N]``; the launcher sums
the H partials (H * N * 4 bytes per sample, 1/(d/2) of k: deterministic and without atomics).
The log-sum-exp is stored for the backward, which again uses one program per (b, h): a pass for
``r[t] = sum_n g[n] p[t, n]``, then a pass writing ``dk`` tiles and accumulating ``dq``:
``dlogit[t, n] = scale * w[t] * p[t, n] * (g[n] - r[t])``. The [B, H, T, N] matrix never exists.

Dots run on tensor cores in the input dtype with fp32 accumulation (fp32 inputs: IEEE unless
``torch.backends.cuda.matmul.allow_tf32``); softmax arithmetic is fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _load_queries(q_ptr, w_ptr, pid, b, T, d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr):
    t = tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + pid * T * d + t[:, None] * d + dd[None, :], mask=(t[:, None] < T) & (dd[None, :] < d), other=0.0)
    if F32:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + b * T + t, mask=t < T, other=0.0)
    return q, w


@triton.jit
def _logits(q, k_ptr, pid, n0, N, d, scale_log2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            F32: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits [BLOCK_T, BLOCK_N] of one key tile (-inf past N) and the tile itself."""
    n = n0 + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + pid * N * d + n[:, None] * d + dd[None, :], mask=(n[:, None] < N) & (dd[None, :] < d), other=0.0)
    if F32:
        k = k.to(tl.float32)
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    x = tl.where((n < N)[None, :], x, float("-inf"))
    return x, k, n


@triton.jit
def _relevance_fwd_kernel(
    q_ptr, k_ptr, w_ptr, part_ptr, lse_ptr, H, T, N, d, scale_log2,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    q, w = _load_queries(q_ptr, w_ptr, pid, b, T, d, BLOCK_T, BLOCK_D, F32)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        x, _, _ = _logits(q, k_ptr, pid, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m = m_new
    lse2 = m + tl.log2(l)
    t = tl.arange(0, BLOCK_T)
    tl.store(lse_ptr + pid * T + t, lse2 * 0.6931471805599453, mask=t < T)
    for n0 in range(0, N, BLOCK_N):
        x, _, n = _logits(q, k_ptr, pid, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION)
        p = tl.exp2(x - lse2[:, None])
        tl.store(part_ptr + pid * N + n, tl.sum(p * w[:, None], axis=0), mask=n < N)


@triton.jit
def _relevance_bwd_kernel(
    q_ptr, k_ptr, w_ptr, lse_ptr, g_ptr, dq_ptr, dk_ptr, H, T, N, d, scale_log2, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    q, w = _load_queries(q_ptr, w_ptr, pid, b, T, d, BLOCK_T, BLOCK_D, F32)
    t = tl.arange(0, BLOCK_T)
    lse2 = tl.load(lse_ptr + pid * T + t, mask=t < T, other=0.0) * 1.4426950408889634
    r = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        x, _, n = _logits(q, k_ptr, pid, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION)
        g = tl.load(g_ptr + b * N + n, mask=n < N, other=0.0)
        r += tl.sum(tl.exp2(x - lse2[:, None]) * g[None, :], axis=1)
    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    dd = tl.arange(0, BLOCK_D)
    for n0 in range(0, N, BLOCK_N):
        x, k, n = _logits(q, k_ptr, pid, n0, N, d, scale_log2, BLOCK_N, BLOCK_D, F32, PRECISION)
        g = tl.load(g_ptr + b * N + n, mask=n < N, other=0.0)
        dl = tl.exp2(x - lse2[:, None]) * (g[None, :] - r[:, None]) * (w * scale)[:, None]
        dl = dl.to(k.dtype)
        dq += tl.dot(dl, k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(dl), q, input_precision=PRECISION)
        tl.store(dk_ptr + pid * N * d + n[:, None] * d + dd[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=(n[:, None] < N) & (dd[None, :] < d))
    tl.store(dq_ptr + pid * T * d + t[:, None] * d + dd[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (dd[None, :] < d))


# ------------------------------------------------------------------------------------ launchers
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(T: int, d: int) -> dict:
    """Tiles from the problem: T and d padded to powers of two (>= 16 for tl.dot)."""
    block_t = max(16, triton.next_power_of_2(T))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if block_t * block_d <= 64 * 64 else 32
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _weights(q: torch.Tensor, q_mask) -> torch.Tensor:
    """fp32 [B, T]: 1 / (H * number of real tokens) for real tokens, 0 for the others."""
    B, H, T, _ = q.shape
    if q_mask is None:
        return torch.full((B, T), 1.0 / (H * T), dtype=torch.float32, device=q.device)
    m = q_mask.to(torch.float32)
    return m / (H * m.sum(dim=1, keepdim=True))


def relevance_scores_forward(q, k, scale, q_mask):
    """q [B,H,T,d], k [B,H,N,d] -> (scores fp32 [B,N], lse fp32 [B,H,T])."""
    q, k = q.contiguous(), k.contiguous()
    B, H, T, d = q.shape
    N = k.shape[2]
    part = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if B * H == 0 or N == 0:
        return part.sum(dim=1), lse.fill_(float("-inf"))
    cfg = _config(T, d)
    _relevance_fwd_kernel[(B * H,)](
        q, k, _weights(q, q_mask), part, lse, H, T, N, d, scale * _LOG2E,
        F32=_interpret(), PRECISION=_precision(q.dtype), **cfg,
    )
    return part.sum(dim=1), lse


def relevance_scores_backward(grad, q, k, lse, scale, q_mask):
    """Gradients (dq [B,H,T,d], dk [B,H,N,d]) in q's and k's dtypes."""
    q, k = q.contiguous(), k.contiguous()
    B, H, T, d = q.shape
    N = k.shape[2]
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    if B * H == 0 or N == 0:
        return dq.zero_(), dk.zero_()
    cfg = _config(T, d)
    _relevance_bwd_kernel[(B * H,)](
        q, k, _weights(q, q_mask), lse.contiguous(), grad.to(torch.float32).contiguous(), dq, dk,
        H, T, N, d, scale * _LOG2E, scale, F32=_interpret(), PRECISION=_precision(q.dtype), **cfg,
    )
    return dq, dk


def compile_cases():
    """Every kernel x dtype x a representative set of the tiles ``_config`` picks."""
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        precision = _precision(dtype) if dtype == torch.float32 else "tf32"
        for T, d in ((1, 64), (16, 128), (64, 64)):
            cfg = _config(T, d)
            opts = {"num_warps": cfg.pop("num_warps")}
            consts = dict(cfg, F32=False, PRECISION=precision)
            fwd_sig = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "w_ptr": "*fp32", "part_ptr": "*fp32",
                       "lse_ptr": "*fp32", "H": "i32", "T": "i32", "N": "i32", "d": "i32", "scale_log2": "fp32"}
            yield _relevance_fwd_kernel, fwd_sig, consts, opts
            bwd_sig = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "w_ptr": "*fp32", "lse_ptr": "*fp32",
                       "g_ptr": "*fp32", "dq_ptr": f"*{name}", "dk_ptr": f"*{name}", "H": "i32", "T": "i32",
                       "N": "i32", "d": "i32", "scale_log2": "fp32", "scale": "fp32"}
            yield _relevance_bwd_kernel, bwd_sig, consts, opts
