"""Reference for ``pack``/``unpack``: padded [B, L, ...] <-> packed [total, ...] (flash-attn layout)."""
from __future__ import annotations

import torch
from torch import Tensor


def row_coordinates(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For each packed row r: (sequence b, position in sequence), both int64 [total]."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total
    )
    pos = torch.arange(total, device=cu.device) - cu[seq]
    return seq, pos


def pack(x: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """x [B, L, ...] -> [total, ...]: row cu_seqlens[b] + i is x[b, i]."""
    seq, pos = row_coordinates(cu_seqlens, total)
    return x[seq, pos]


def unpack(packed: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """packed [total, ...] -> zero-padded [B, max_seqlen, ...]."""
    B = cu_seqlens.numel() - 1
    out = packed.new_zeros((B, max_seqlen) + tuple(packed.shape[1:]))
    seq, pos = row_coordinates(cu_seqlens, packed.shape[0])
    out[seq, pos] = packed
    return out
