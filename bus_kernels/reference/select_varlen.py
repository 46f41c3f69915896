"""Reference for ``select_tokens_varlen``: per-sample keep counts, packed without padding."""
from __future__ import annotations

import torch
from torch import Tensor

from .select import acc_dtype, fuse_backward, fuse_forward, rank_rows


def mass_keep(scores: Tensor, mass: float, min_keep: int) -> Tensor:
    """int64 [B]: per row, the size of the smallest top-ranked set whose share of the row's score
    sum reaches ``mass``, raised to ``min_keep``. Scores must be >= 0 with a positive row sum.

    Shares are computed in float64 from a running sum in rank order; the last share is exactly 1
    (it is the running sum divided by itself), so ``mass=1.0`` never keeps more than every token.
    """
    ranked = torch.sort(scores.double(), dim=1, descending=True, stable=True).values
    cum = ranked.cumsum(dim=1)
    share = cum / cum[:, -1:]
    # share is non-decreasing, so the smallest m with share[m-1] >= mass is count(share < mass) + 1.
    m = (share < mass).sum(dim=1) + 1
    n = scores.shape[1]
    return m.clamp(max=n).clamp(min=min_keep)


def _kept_mask(scores: Tensor, keep: Tensor) -> Tensor:
    """bool [B, n]: True where the column is among the row's top keep[b] by the contract's ranking."""
    B, n = scores.shape
    perm = rank_rows(scores)
    rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(n, device=scores.device).expand(B, n))
    return rank < keep[:, None]


def _rows(kept_mask: Tensor, keep: Tensor, cu_seqlens: Tensor, P: int):
    """Packed row numbers: (seq [K], col [K], kept_rows [K], prefix_rows [B,P], fused_rows [B]),
    kept entries ordered by sample, then by index."""
    starts = cu_seqlens[:-1].long()
    seq, col = kept_mask.nonzero(as_tuple=True)
    slot = kept_mask.cumsum(dim=1) - 1  # position of a kept column among its row's kept columns
    kept_rows = starts[seq] + P + slot[seq, col]
    prefix_rows = starts[:, None] + torch.arange(P, device=starts.device)
    fused_rows = starts + P + keep
    return seq, col, kept_rows, prefix_rows, fused_rows


def select_tokens_varlen(
    x: Tensor, scores: Tensor, keep: Tensor, cu_seqlens: Tensor, total: int, num_prefix: int, fuse: str
) -> tuple[Tensor, Tensor]:
    """x [B,N,D], scores [B,N-P], keep int64 [B], cu_seqlens int32 [B+1] ->
    (tokens [total, D] in x.dtype, indices int64 [keep.sum()])."""
    P = num_prefix
    B, N, D = x.shape
    kept_mask = _kept_mask(scores, keep)
    seq, col, kept_rows, prefix_rows, fused_rows = _rows(kept_mask, keep, cu_seqlens, P)
    out = x.new_empty((total, D))
    out[prefix_rows.reshape(-1)] = x[:, :P].reshape(B * P, D)
    out[kept_rows] = x[seq, col + P]
    if fuse != "none":
        acc = acc_dtype(x, scores)
        s_dropped = torch.where(kept_mask, 0, scores.to(acc))
        out[fused_rows] = fuse_forward(x[:, P:], s_dropped, fuse).to(x.dtype)
    return out, col + P


def select_tokens_varlen_backward(
    grad_tokens: Tensor,
    x: Tensor,
    scores: Tensor,
    indices: Tensor,
    keep: Tensor,
    cu_seqlens: Tensor,
    num_prefix: int,
    fuse: str,
) -> tuple[Tensor, Tensor]:
    """Gradients (grad_x [B,N,D] in x.dtype, grad_scores [B,N-P] in scores.dtype)."""
    P = num_prefix
    B, N, D = x.shape
    acc = acc_dtype(x, scores)
    g = grad_tokens.to(acc)
    seq = torch.repeat_interleave(torch.arange(B, device=x.device), keep, output_size=indices.numel())
    kept_mask = torch.zeros(scores.shape, dtype=torch.bool, device=x.device)
    kept_mask[seq, indices - P] = True
    seq, col, kept_rows, prefix_rows, fused_rows = _rows(kept_mask, keep, cu_seqlens, P)
    grad_x = torch.zeros((B, N, D), dtype=acc, device=x.device)
    grad_scores = torch.zeros(scores.shape, dtype=acc, device=x.device)
    if fuse != "none":
        s_dropped = torch.where(kept_mask, 0, scores.to(acc))
        gxs, grad_scores = fuse_backward(g[fused_rows], x[:, P:], s_dropped, ~kept_mask, fuse)
        grad_x[:, P:] = gxs
    grad_x[:, :P] = g[prefix_rows.reshape(-1)].reshape(B, P, D)
    grad_x[seq, col + P] = g[kept_rows]
    return grad_x.to(x.dtype), grad_scores.to(scores.dtype)
