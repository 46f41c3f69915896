"""Loads the compiled extension ``bus_kernels._C`` if it was built, and reports what it holds.

The extension registers its kernels with the PyTorch dispatcher under the ``bus_kernels_C``
namespace (``TORCH_LIBRARY``), one CPU and, when built with CUDA, one CUDA kernel per op, so
``torch.ops.bus_kernels_C.<op>`` routes by the tensors' device. ``import bus_kernels`` works
without it; the ``"cpu"`` and ``"cuda"`` backends are then unavailable and one warning says why.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

NAMESPACE = "bus_kernels_C"
_PROBE_OP = f"{NAMESPACE}::pack"

_error: Optional[str] = None
try:
    importlib.import_module("bus_kernels._C")  # registers the ops as a side effect
except ImportError as exc:  # not built, or built against another torch
    _error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "bus_kernels: the compiled extension bus_kernels._C is not available "
        f"({_error}); the 'cpu' and 'cuda' backends are disabled. Build it with "
        "`pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


# Read once: these never change after import, and plain bools keep torch.compile tracing simple.
_COMPILED = _error is None and torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, "CPU")
_CUDA_COMPILED = _error is None and torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, "CUDA")


def compiled() -> bool:
    """True when ``bus_kernels._C`` loaded and registered its CPU kernels."""
    return _COMPILED


def cuda_compiled() -> bool:
    """True when the extension was built with its CUDA kernels (whether or not a GPU is present)."""
    return _CUDA_COMPILED


def kernels(op: str) -> tuple[str, ...]:
    """The compiled backends (``"cpu"``, ``"cuda"``) that registered a kernel for ``op``.

    Read from the dispatcher, so a schema without a kernel for a device never counts.
    """
    if _error is not None:
        return ()
    name = f"{NAMESPACE}::{op}"
    try:
        return tuple(
            backend
            for backend, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        )
    except RuntimeError:  # a stale build without this op's schema
        return ()


def load_error() -> Optional[str]:
    """Why the extension could not be loaded, or None."""
    return _error


def ops():
    """``torch.ops.bus_kernels_C``: the compiled kernels."""
    return getattr(torch.ops, NAMESPACE)
