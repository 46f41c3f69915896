"""Argument checks shared by the ops. Every message names the op, the argument and what was expected."""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted everywhere the reference runs (gradcheck); the fused kernels take the three above.
ANY_FLOAT = FLOAT_DTYPES + (torch.float64,)
FUSE_MODES = ("sum", "mean", None)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: Optional[int | tuple[int, ...]] = None,
    dtypes: Optional[tuple[torch.dtype, ...]] = None,
    device: Optional[torch.device] = None,
    layout: str = "",
) -> Tensor:
    """Type, rank, dtype and device checks; ``layout`` (e.g. ``"[B, N, D]"``) goes into the message."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name} must have {want} dims {layout}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {t.device}")
    return t


def check_int(op: str, name: str, value: object, lo: int, hi: Optional[int] = None) -> int:
    """An integer (Python or NumPy, not bool) in ``[lo, hi]``, returned as a Python int."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{op}: {name}={value} must be in {rng}")
    return value


def check_fuse(op: str, fuse: object) -> str:
    """Validates ``fuse`` and returns its op-level spelling (``"none"`` for ``None``)."""
    if fuse not in FUSE_MODES:
        raise ValueError(f"{op}: fuse={fuse!r} must be 'sum', 'mean' or None")
    return "none" if fuse is None else fuse


def check_finite(op: str, name: str, t: Tensor) -> None:
    """Value check (one device sync): run inside the op so it also guards compiled graphs."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} must be finite, found NaN or inf")


def check_cu_seqlens(op: str, cu_seqlens: Tensor, total: int, max_seqlen: Optional[int] = None) -> None:
    """Value checks of a cu_seqlens tensor (one device sync): starts at 0, non-decreasing, ends at
    ``total`` and, when given, no sequence longer than ``max_seqlen``."""
    cu = cu_seqlens.tolist()
    if not cu or cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {cu[:4]}...")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at total={total} (rows of the packed input), got {cu[-1]}")
    if max_seqlen is not None and lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{op}: max_seqlen={max_seqlen} is smaller than the longest sequence ({max(lengths)})")


def check_cu_seqlens_meta(op: str, cu_seqlens: object, device: torch.device) -> Tensor:
    """Type, rank, dtype and device of cu_seqlens (no sync; values are checked by the op)."""
    check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device, layout="[B+1]")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must have B+1 >= 1 entries, got none")
    return cu_seqlens
