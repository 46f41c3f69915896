"""Backend names, availability and the default choice.

A backend is one implementation family: ``"torch"`` (the pure-PyTorch reference, any device),
``"triton"`` (Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"cuda"`` and ``"cpu"`` (compiled kernels from ``bus_kernels._C``). ``"auto"`` picks, per op and
per call, the fastest available one that implements the op for the tensors' device.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Optional

import torch

from . import _ext

BACKENDS = ("torch", "triton", "cuda", "cpu")
_CHOICES = BACKENDS + ("auto",)
# Preference of "auto" per device type; the first available one that implements the op wins.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# (op, backend) pairs "auto" never picks, though they run when asked for by name. The CUDA
# relevance kernel is fp32 CUDA-core math that reads the keys in both forward kernels and
# recomputes the logits in each of its five kernels: by a roofline count at the mission shapes
# (B=64, H=12, N=577, d=64, bf16 on an H200) it reads twice Triton's bytes at T=1 (Triton keeps
# the one query's logits), and at T=32 its fp32 FMAs alone (3.6 GFLOP forward, ~54 us at the fp32
# peak) take 2-4x the time Triton's tensor-core kernel needs to stream the keys; cuBLAS (the
# "torch" path) uses tensor cores too. Counted, not timed: no GPU has run it yet.
_AUTO_SKIP = {("relevance_scores", "cuda")}

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_default: Optional[str] = None  # set_backend(); None defers to $BUS_KERNELS_BACKEND, then "auto"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_unavailable(name: str) -> Optional[str]:
    """None if the backend can run on this machine, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if not (torch.cuda.is_available() or _interpret()):
            return "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run Triton kernels on CPU)"
        return None
    if name == "cpu":
        return None if _ext.compiled() else f"the extension is not built ({_ext.load_error()})"
    if name == "cuda":
        if not _ext.compiled():
            return f"the extension is not built ({_ext.load_error()})"
        if not _ext.cuda_compiled():
            return "the extension was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def available_backends() -> list[str]:
    """Backends that can run on this machine, e.g. ``['torch', 'cpu']`` on a CPU-only install."""
    return [b for b in BACKENDS if _why_unavailable(b) is None]


def set_backend(name: Optional[str]) -> None:
    """Set the default backend of every op (``None`` restores ``$BUS_KERNELS_BACKEND``/``"auto"``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a backend that cannot run here.
    """
    global _default
    if name is not None:
        _check_name(name, "set_backend")
        if name != "auto" and (why := _why_unavailable(name)) is not None:
            raise RuntimeError(f"set_backend: backend {name!r} is not available: {why}")
    _default = name


def get_backend() -> str:
    """The default backend: ``set_backend``'s, else ``$BUS_KERNELS_BACKEND``, else ``"auto"``."""
    if _default is not None:
        return _default
    return os.environ.get("BUS_KERNELS_BACKEND", "auto") or "auto"


def _check_name(name: object, op: str) -> None:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{op}: backend={name!r} must be one of {_CHOICES}")


def resolve(
    op: str,
    requested: Optional[str],
    device: torch.device,
    implemented: Iterable[str],
    dtype: Optional[torch.dtype] = None,
) -> str:
    """The concrete backend to run ``op`` with on ``device`` for inputs of ``dtype``.

    ``implemented``: the backends that have a kernel for this op. The fused backends take
    fp32/fp16/bf16; float64 (gradcheck) runs on ``"torch"``. Raises ``RuntimeError`` saying why
    when an explicitly requested backend cannot run these tensors.
    """
    name = get_backend() if requested is None else requested
    _check_name(name, op)
    implemented = tuple(implemented)
    fused_ok = dtype != torch.float64
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            if (
                cand in implemented
                and (op, cand) not in _AUTO_SKIP
                and (cand == "torch" or fused_ok)
                and _why_unavailable(cand) is None
                and _runs_on(cand, device)
            ):
                return cand
        return "torch"
    if name not in implemented:
        raise RuntimeError(
            f"{op}: backend {name!r} has no kernel for this op yet (implemented: {', '.join(implemented)})"
        )
    why = _why_unavailable(name)
    if why is not None:
        raise RuntimeError(f"{op}: backend {name!r} is not available: {why}")
    if not _runs_on(name, device):
        raise RuntimeError(f"{op}: backend {name!r} cannot run on {device.type} tensors")
    if name != "torch" and not fused_ok:
        raise RuntimeError(f"{op}: backend {name!r} takes fp32/fp16/bf16 inputs; float64 runs on 'torch'")
    return name


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    # triton: real GPUs, or CPU tensors through the interpreter (tests only).
    return device.type == "cuda" or (device.type == "cpu" and _interpret())


def fp32_dots_allow_tf32() -> bool:
    """Whether fp32 dots may use TF32, as PyTorch's own fp32 matmuls would now.

    Reads the current API first (``torch.backends.cuda.matmul.fp32_precision``, which reports
    ``"none"`` when it inherits ``torch.backends.fp32_precision``): once either is set, reading
    the legacy ``allow_tf32`` raises a RuntimeError about mixing the two APIs. Torch versions
    without ``fp32_precision`` fall back to ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    for prec in (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if prec == "tf32":
            return True
        if prec == "ieee":
            return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed legacy/new settings that the reads above did not resolve
        return False
