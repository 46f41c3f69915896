"""Compiles every shipped Triton kernel configuration for real GPUs, without a GPU.

Each module ``bus_kernels.triton.<op>`` exposes ``compile_cases()``, yielding
``(kernel, signature, constexprs, options)`` for every dtype x tile config it can launch
(``options``: ``num_warps``/``num_stages``). This script compiles each case with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for cc 80 and 90 and fails on a
compile error or on shared memory beyond the device's limit.

It must run without TRITON_INTERPRET (the interpreter replaces kernels by Python functions), so
the test suite runs it in subprocesses, one per target so that they compile in parallel:
``python tests/triton_compile_check.py [--cc 80] MODULE [MODULE...]``.
"""
from __future__ import annotations

import importlib
import os
import sys

# Opt-in shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def check_module(name: str, ccs=(80, 90)) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(name)
    count = 0
    for kernel, signature, constexprs, options in mod.compile_cases():
        for cc in ccs:
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(options))
            except Exception as exc:  # report which case failed, then fail
                raise RuntimeError(f"{name}: {kernel.__name__} {constexprs} {options} failed for sm_{cc}: {exc}") from exc
            shared = compiled.metadata.shared
            if shared > SMEM_LIMIT[cc]:
                raise RuntimeError(
                    f"{name}: {kernel.__name__} {constexprs} {options} needs {shared} B of shared memory "
                    f"on sm_{cc} (limit {SMEM_LIMIT[cc]})"
                )
            count += 1
    return count


def main(argv: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("triton_compile_check: unset TRITON_INTERPRET (compile checks need real kernels)")
    ccs = (80, 90)
    if argv[:1] == ["--cc"]:
        ccs, argv = (int(argv[1]),), argv[2:]
    for name in argv:
        print(f"{name}: {check_module(name, ccs)} compilations ok")


if __name__ == "__main__":
    main(sys.argv[1:])
