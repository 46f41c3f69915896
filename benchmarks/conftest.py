"""Shared set-up of the benchmark suites (pytest-benchmark).

Each benchmark records, next to pytest-benchmark's timings, what it measured in ``extra_info``:
op, backend (or the alternative it stands for), shape, dtype, and the bytes or FLOPs of the
work so that ``report.py`` can print GB/s or TFLOP/s and ratios against the reference measured
in the same run. GPU timings synchronise the device; CPU timings are labelled as such.
"""
from __future__ import annotations

import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # never time the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

import bus_kernels as bk  # noqa: E402

try:
    import triton

    TRITON_VERSION = triton.__version__
except ImportError:
    TRITON_VERSION = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
CPU_ROUND_BUDGET_S = 3.0


def fused_backends(implemented) -> list[str]:
    """Available non-reference backends that implement an op and run on DEVICE."""
    out = []
    for b in implemented:
        if b == "torch" or b not in bk.available_backends():
            continue
        if b == "cpu" and ON_GPU or b in ("cuda", "triton") and not ON_GPU:
            continue
        out.append(b)
    return out


def run(benchmark, fn, *, op: str, impl: str, shape: str, dtype: torch.dtype, mode: str,
        nbytes: float | None = None, flops: float | None = None, images: int | None = None,
        reference: bool | None = None, rounds: int | None = None, warmup: bool = True):
    """Times ``fn`` and records the work it does. ``impl``: a backend name or an alternative;
    ``reference``: the row the report divides by (default: the ``torch`` backend)."""
    if ON_GPU:
        def target():
            fn()
            torch.cuda.synchronize()
    else:
        target = fn
    took = None
    if warmup:
        t0 = time.perf_counter()
        target()  # warm-up: compilation, autotuning, allocator
        took = time.perf_counter() - t0
    if rounds is None:
        # GPU: 20 rounds. CPU: about CPU_ROUND_BUDGET_S of timed rounds, 1 to 5 (a 17 s call is
        # timed once, a 0.5 s call five times), which keeps the CPU suite within its time budget.
        rounds = 20 if ON_GPU else max(1, min(5, int(CPU_ROUND_BUDGET_S / max(took or 0.0, 1e-9))))
    benchmark.group = f"{op} {mode} {shape} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(
        op=op, impl=impl, shape=shape, dtype=str(dtype).replace("torch.", ""), mode=mode,
        device=torch.cuda.get_device_name() if ON_GPU else "cpu", nbytes=nbytes, flops=flops,
        images=images, reference=impl == "torch" if reference is None else reference,
        torch=torch.__version__, triton=TRITON_VERSION,
    )
    benchmark.extra_info["rounds"] = rounds
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
