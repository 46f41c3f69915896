"""Reference for ``select_tokens``: rank, keep the top-k, fuse the rest into one token."""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: fp16/bf16 accumulate in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def rank_rows(scores: Tensor) -> Tensor:
    """int64 [B, n]: column indices of each row by descending score, lower index first on ties.

    A stable descending sort keeps equal scores in their original (ascending index) order, which
    is exactly the contract's tie-break.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def fuse_forward(xs: Tensor, s_dropped: Tensor, fuse: str) -> Tensor:
    """Fused token [B, D] in the accumulation dtype.

    xs: [B, n, D] the rankable tokens; s_dropped: [B, n] scores with kept entries zeroed.
    sum: sum_j s_j x_j;  mean: that / sum_j s_j (zero when the denominator is 0).
    """
    acc = s_dropped.dtype
    fused = torch.einsum("bn,bnd->bd", s_dropped, xs.to(acc))
    if fuse == "mean":
        denom = s_dropped.sum(dim=1, keepdim=True)
        nonzero = denom != 0
        fused = torch.where(nonzero, fused / torch.where(nonzero, denom, 1), 0)
    return fused


def fuse_backward(
    grad_fused: Tensor, xs: Tensor, s_dropped: Tensor, dropped: Tensor, fuse: str
) -> tuple[Tensor, Tensor]:
    """(grad wrt xs [B,n,D], grad wrt scores [B,n]) of ``fuse_forward``, accumulation dtype.

    sum:  d/dx_j = s_j g,           d/ds_j = <g, x_j>           (dropped j only)
    mean: d/dx_j = (s_j / S) g,     d/ds_j = <g, x_j - f> / S   with f the fused token, S = sum s
    """
    acc = s_dropped.dtype
    g = grad_fused.to(acc)
    xs = xs.to(acc)
    gx = torch.einsum("bnd,bd->bn", xs, g)  # <g, x_j>
    if fuse == "sum":
        coef = s_dropped
        gs = gx
    else:
        # Divide by S (not multiply by 1/S, which overflows for tiny |S|); S == 0 gives 0.
        denom = s_dropped.sum(dim=1, keepdim=True)
        nonzero = denom != 0
        safe = torch.where(nonzero, denom, 1)
        coef = torch.where(nonzero, s_dropped / safe, 0)
        fused = torch.einsum("bn,bnd->bd", coef, xs)
        gs = torch.where(nonzero, (gx - (fused * g).sum(dim=1, keepdim=True)) / safe, 0)
    grad_xs = coef[..., None] * g[:, None, :]
    grad_s = torch.where(dropped, gs, 0)
    return grad_xs, grad_s


def select_tokens(
    x: Tensor, scores: Tensor, k: int, num_prefix: int, fuse: str, order: str
) -> tuple[Tensor, Tensor]:
    """x [B,N,D], scores [B,N-P] -> (tokens [B, P+k+(fuse!='none'), D] in x.dtype, indices int64 [B,k])."""
    P = num_prefix
    B, N, D = x.shape
    top = rank_rows(scores)[:, :k]  # descending score
    if order == "index":
        top = top.sort(dim=1).values
    indices = top + P
    kept = x.gather(1, indices[..., None].expand(B, k, D))
    parts = [x[:, :P], kept]
    if fuse != "none":
        acc = acc_dtype(x, scores)
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, top, False)
        s_dropped = torch.where(dropped, scores.to(acc), 0)
        parts.append(fuse_forward(x[:, P:], s_dropped, fuse).to(x.dtype)[:, None])
    return torch.cat(parts, dim=1), indices


def select_tokens_backward(
    grad_tokens: Tensor, x: Tensor, scores: Tensor, indices: Tensor, num_prefix: int, fuse: str
) -> tuple[Tensor, Tensor]:
    """Gradients (grad_x [B,N,D] in x.dtype, grad_scores [B,N-P] in scores.dtype)."""
    P = num_prefix
    B, N, D = x.shape
    k = indices.shape[1]
    acc = acc_dtype(x, scores)
    g = grad_tokens.to(acc)
    grad_x = torch.zeros((B, N, D), dtype=acc, device=x.device)
    grad_scores = torch.zeros(scores.shape, dtype=acc, device=x.device)
    if fuse != "none":
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, indices - P, False)
        s_dropped = torch.where(dropped, scores.to(acc), 0)
        gxs, grad_scores = fuse_backward(g[:, -1], x[:, P:], s_dropped, dropped, fuse)
        grad_x[:, P:] = gxs
    grad_x[:, :P] = g[:, :P]
    # Kept rows receive their output slot's gradient (a kept row has no fused contribution).
    grad_x.scatter_(1, indices[..., None].expand(B, k, D), g[:, P : P + k])
    return grad_x.to(x.dtype), grad_scores.to(scores.dtype)
