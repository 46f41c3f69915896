"""Reference for ``relevance_scores``: mean over heads and text tokens of softmax_n(scale * q.k)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _token_weights(q: Tensor, q_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """[B, T] weights w[b, t] = mask[b, t] / (H * count_b): the mean over heads and real tokens."""
    B, H, T, _ = q.shape
    if q_mask is None:
        return torch.full((B, T), 1.0 / (H * T), dtype=dtype, device=q.device)
    m = q_mask.to(dtype)
    return m / (H * m.sum(dim=1, keepdim=True))


def _logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    dt = _compute_dtype(q)
    return torch.einsum("bhtd,bhnd->bhtn", q.to(dt), k.to(dt)) * scale


def _probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    return torch.softmax(_logits(q, k, scale), dim=-1)


def relevance_scores(
    q: Tensor, k: Tensor, scale: float, q_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """q [B,H,T,d], k [B,H,N,d] -> (scores [B,N], lse [B,H,T]): float32 (float64 for float64
    inputs). lse is each softmax's log-normaliser, kept for the fused kernels' backward."""
    logits = _logits(q, k, scale)  # [B, H, T, N]
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[..., None])
    w = _token_weights(q, q_mask, p.dtype)  # [B, T]
    return torch.einsum("bhtn,bt->bn", p, w), lse


def relevance_scores_backward(
    grad: Tensor, q: Tensor, k: Tensor, scale: float, q_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Gradients of ``relevance_scores`` w.r.t. q and k, in their dtypes.

    s = sum_{h,t} w[t] P[h,t,:]  =>  dP[h,t,n] = w[t] g[n]
    dL = P * (dP - sum_n dP * P)  (softmax backward),  dq = scale dL k,  dk = scale dL^T q
    """
    p = _probs(q, k, scale)
    dt = p.dtype
    w = _token_weights(q, q_mask, dt)
    g = grad.to(dt)
    # dP = w[t] * g[n]; the row term sum_n dP*P = w[t] * <g, P[h,t,:]>.
    row = torch.einsum("bhtn,bn->bht", p, g)
    dlogits = p * (g[:, None, None, :] - row[..., None]) * w[:, None, :, None] * scale
    dq = torch.einsum("bhtn,bhnd->bhtd", dlogits, k.to(dt))
    dk = torch.einsum("bhtn,bhtd->bhnd", dlogits, q.to(dt))
    return dq.to(q.dtype), dk.to(k.dtype)
