"""Pure-PyTorch ground truth for every op.

These functions are written to be read, not to be fast: each one states the contract of its op in
plain tensor algebra, computes in float32 (or float64 when given float64) and never fuses. Every
other backend is tested against them. They take already-validated arguments; the public entry
points in :mod:`bus_kernels` do the validation.
"""
from .pack import pack, unpack
from .relevance import relevance_scores, relevance_scores_backward
from .select import select_tokens, select_tokens_backward, rank_rows
from .select_varlen import mass_keep, select_tokens_varlen, select_tokens_varlen_backward
from .varlen_attention import varlen_attention, varlen_attention_backward

__all__ = [
    "pack",
    "unpack",
    "relevance_scores",
    "relevance_scores_backward",
    "rank_rows",
    "select_tokens",
    "select_tokens_backward",
    "mass_keep",
    "select_tokens_varlen",
    "select_tokens_varlen_backward",
    "varlen_attention",
    "varlen_attention_backward",
]
