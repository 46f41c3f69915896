"""The Patch Abstraction Decoder (PAD): learnable queries that condense the kept patch tokens
into a short summary for the multimodal part of the model."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class PADBlock(nn.Module):
    """Pre-norm block: self-attention over the queries, cross-attention to the tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, q: Tensor, kv: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm2(q), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


class PAD(nn.Module):
    """Patch Abstraction Decoder.

    Args:
        dim: token width D.
        num_queries: length of the summary (default 64).
        depth: number of blocks (self-attention, cross-attention to the tokens, MLP).
        num_heads: attention heads.

    ``forward(tokens [B, L, D], key_padding_mask bool [B, L] (True = padding) or None)``
    returns the summary ``[B, num_queries, D]`` in the tokens' dtype.
    """

    def __init__(self, dim: int, *, num_queries: int = 64, depth: int = 2, num_heads: int = 8,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PAD: dim={dim} must be divisible by num_heads={num_heads}")
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(PADBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if tokens.dim() != 3:
            raise ValueError(f"PAD: tokens must be [B, L, D], got shape {tuple(tokens.shape)}")
        q = self.queries.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        for blk in self.blocks:
            q = blk(q, tokens, key_padding_mask)
        return self.norm(q)
