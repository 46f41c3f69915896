"""Reference for ``varlen_attention``: each packed sequence attends only within itself.

Computed on a zero-padded [B, L, H, d] copy with an explicit mask: simple to read, and memory
O(B * H * L^2), which is the point of the fused kernels. A row whose every logit is -inf (possible
only through a -inf ``key_bias``) returns zeros, as flash-attn does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .pack import pack, unpack
from .select import acc_dtype


def _probs(q, k, cu_seqlens, scale, causal, key_bias, L):
    """(P [B, H, L, L], lse [B, H, L]) in the acc dtype on the padded layout: P the normalised
    attention probabilities, lse the log-sum-exp of each query's logits (-inf for none)."""
    acc = acc_dtype(q)
    qp = unpack(q, cu_seqlens, L).to(acc)  # [B, L, H, d]
    kp = unpack(k, cu_seqlens, L).to(acc)
    logits = torch.einsum("bihd,bjhd->bhij", qp, kp) * scale
    if key_bias is not None:
        bias = key_bias if key_bias.dim() == 2 else key_bias[:, None]
        bias = unpack(bias.to(acc).expand(-1, q.shape[1]), cu_seqlens, L)  # [B, L, H]
        logits = logits + bias.permute(0, 2, 1)[:, :, None, :]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    pos = torch.arange(L, device=q.device)
    allowed = (pos[None, :] < lengths[:, None])[:, None, None, :]  # keys inside the sequence
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0)
    p = torch.exp(logits - m)
    denom = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(denom)).squeeze(-1)
    return p / torch.where(denom > 0, denom, 1), lse


def _padded_len(cu_seqlens: Tensor) -> int:
    """The longest sequence, at least 1 so that reductions over keys never see an empty dim."""
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return max(longest, 1)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    scale: float,
    causal: bool,
    key_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """q, k, v [total, H, d] -> (out [total, H, d] in q.dtype, lse float32 [total, H])."""
    L = _padded_len(cu_seqlens)
    p, lse = _probs(q, k, cu_seqlens, scale, causal, key_bias, L)
    vp = unpack(v, cu_seqlens, L).to(p.dtype)
    out = torch.einsum("bhij,bjhd->bihd", p, vp)
    total = q.shape[0]
    lse = pack(lse.permute(0, 2, 1), cu_seqlens, total)
    return pack(out, cu_seqlens, total).to(q.dtype), lse


def varlen_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    scale: float,
    causal: bool,
    key_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(dq, dk, dv, d key_bias or None), each in its input's dtype.

    dv = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(P * dP));  dq = scale dS K;  dk = scale dS^T Q;
    d key_bias[j, h] = sum_i dS[h, i, j]  (summed over heads for a per-key bias).
    """
    L = _padded_len(cu_seqlens)
    p, _ = _probs(q, k, cu_seqlens, scale, causal, key_bias, L)
    acc = p.dtype
    do = unpack(grad_out, cu_seqlens, L).to(acc)
    qp, kp, vp = (unpack(t, cu_seqlens, L).to(acc) for t in (q, k, v))
    dv = torch.einsum("bhij,bihd->bjhd", p, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, vp)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = torch.einsum("bhij,bjhd->bihd", ds, kp) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, qp) * scale
    total = q.shape[0]
    grads = [pack(t, cu_seqlens, total).to(src.dtype) for t, src in ((dq, q), (dk, k), (dv, v))]
    dbias = None
    if key_bias is not None:
        db = pack(ds.sum(dim=2).permute(0, 2, 1), cu_seqlens, total)  # [total, H]
        dbias = (db if key_bias.dim() == 2 else db.sum(dim=1)).to(key_bias.dtype)
    return grads[0], grads[1], grads[2], dbias
