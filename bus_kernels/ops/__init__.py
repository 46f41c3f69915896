"""One module per op: contract docstring, validation, backend dispatch, custom op and autograd."""
from .pack import Packed, pack, unpack
from .relevance import relevance_scores
from .select import Selection, select_tokens
from .select_varlen import VarlenSelection, select_tokens_varlen
from .varlen_attention import varlen_attention

__all__ = [
    "Packed",
    "Selection",
    "VarlenSelection",
    "pack",
    "unpack",
    "relevance_scores",
    "select_tokens",
    "select_tokens_varlen",
    "varlen_attention",
]
