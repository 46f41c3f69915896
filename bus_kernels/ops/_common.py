"""Argument checks shared by the ops. Every message names the op, the argument and what was expected."""
from __future__ import annotations

import operator
import os
from typing import Iterable, Optional, Union

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


# ------------------------------------------------------------------------------ value checks
# Checks that read tensor values (finite scores, well-formed cu_seqlens, keep counts in range,
# empty q_mask rows) cost a device-to-host copy, i.e. a full stall of the GPU's launch queue, and
# break CUDA-graph capture. They are switched as a whole: set_value_checks(True/False), else
# $BUS_KERNELS_VALUE_CHECKS=0/1, else per device: on for CPU tensors (where a check is only a
# read of memory), off for CUDA tensors. Shape, dtype and device checks are always on.
_value_checks: Optional[bool] = None  # set_value_checks(); None: the environment, then per device


def _env_value_checks() -> Optional[bool]:
    env = os.environ.get("BUS_KERNELS_VALUE_CHECKS", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"BUS_KERNELS_VALUE_CHECKS={env!r} must be 0, 1 or auto")


_env_checks: Optional[bool] = _env_value_checks()


def set_value_checks(on: Optional[bool]) -> None:
    """Switch the checks that read tensor values (each one a device sync on a GPU).

    ``True``: always check (finite scores, well-formed ``cu_seqlens``, keep counts in range,
    ``q_mask`` rows with a real token, in the ops and in the CUDA kernels' wrappers); ``False``:
    never (the kernels still never touch memory outside their tensors, but malformed values give
    unspecified results); ``None``: back to ``$BUS_KERNELS_VALUE_CHECKS`` (``0``/``1``), else the
    default, on for CPU tensors and off for CUDA tensors. Shape, dtype and device checks are
    always on.
    """
    global _value_checks, _env_checks
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"set_value_checks: on must be True, False or None, got {on!r}")
    _value_checks = on
    _env_checks = _env_value_checks()
    _sync_extension_flag()


def value_checks_enabled(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ops on tensors of ``device`` run their value checks now (see :func:`set_value_checks`)."""
    if _value_checks is not None:
        return _value_checks
    if _env_checks is not None:
        return _env_checks
    return torch.device(device).type != "cuda"


def _sync_extension_flag() -> None:
    """The CUDA wrappers of the extension read their own copy of the switch (CUDA tensors)."""
    from .. import _ext

    if _ext.compiled() and hasattr(_ext.ops(), "set_value_checks"):
        try:
            _ext.ops().set_value_checks(value_checks_enabled("cuda"))
        except RuntimeError:  # an older build without the op
            pass


def check_finite(op: str, name: str, t: Tensor) -> None:
    """Value check (one device sync; only when value checks are on): run inside the op so it
    also guards compiled graphs."""
    if value_checks_enabled(t.device) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} must be finite, found NaN or inf")


def check_cu_seqlens(op: str, cu_seqlens: Tensor, total: int, max_seqlen: Optional[int] = None) -> None:
    """Value checks of a cu_seqlens tensor (one device sync; only when value checks are on):
    starts at 0, non-decreasing, ends at ``total`` and, when given, no sequence longer than
    ``max_seqlen``."""
    if not value_checks_enabled(cu_seqlens.device):
        return
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
