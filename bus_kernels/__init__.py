"""bus-kernels: fused kernels for text-guided visual token pruning in Vision Transformers.

Public API (see README.md for shapes and semantics)::

    relevance_scores(q, k, *, scale=None, q_mask=None, backend=None) -> Tensor [B, N] float32
    select_tokens(x, scores, keep, *, num_prefix=1, fuse="sum", order="index", backend=None) -> Selection
    select_tokens_varlen(x, scores, *, keep=None, mass=None, min_keep=1, num_prefix=1, fuse="sum",
                         backend=None) -> VarlenSelection
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, scale=None, causal=False, key_bias=None,
                     backend=None) -> Tensor [total, H, d]
    pack(x, lengths) -> Packed(packed, cu_seqlens, max_seqlen);  unpack(packed, cu_seqlens, max_seqlen)
    available_backends(), set_backend(name), get_backend(), __version__
    set_value_checks(on), value_checks_enabled(device)   # checks that read tensor values (syncs)
"""
from ._backend import available_backends, get_backend, set_backend
from .ops._common import _sync_extension_flag, set_value_checks, value_checks_enabled
from .ops import (
    Packed,
    Selection,
    VarlenSelection,
    pack,
    relevance_scores,
    select_tokens,
    select_tokens_varlen,
    unpack,
    varlen_attention,
)

__version__ = "0.1.0"

_sync_extension_flag()  # the CUDA wrappers' copy of the value-check switch ($BUS_KERNELS_VALUE_CHECKS)

__all__ = [
    "Packed",
    "Selection",
    "VarlenSelection",
    "available_backends",
    "get_backend",
    "set_backend",
    "set_value_checks",
    "value_checks_enabled",
    "pack",
    "unpack",
    "relevance_scores",
    "select_tokens",
    "select_tokens_varlen",
    "varlen_attention",
    "__version__",
]
