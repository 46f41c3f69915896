"""Builds the host emulation of the CUDA kernels (csrc/cuda/*.cu) as a shared library for ctypes.

The .cu files are compiled by g++ as they are, against the shim headers of tests/cuda_emu/include
(see emu.h for the execution model), after two rewrites: the launch syntax
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::emu::launch(::emu::cfg(grid, block,
smem, stream), kernel, args)``, and each ``__shared__`` declaration a ``static`` one followed by a
call that poisons it when a block first reaches it. The library is cached under build/cuda_emu/ by a hash of every
input, so a test session compiles it once (~30 s on 2 cores).
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
SOURCES = ("select.cu", "relevance.cu", "pack.cu")  # of csrc/cuda; tests/cuda_emu/selftest.cu too
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-function", "-Wno-unused-variable"]

# The callee (a name with optional template arguments) and the launch configuration.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.S)


_SHARED = re.compile(r"__shared__\s+([^;{}()]+?)\s+(\w+)((?:\[[^\]]*\])*)\s*;")


def rewrite_shared(src: str) -> str:
    """``__shared__ T x[n];`` -> ``static T x[n]; ::emu::shared_mark(&x, sizeof(x));`` (poisoned)."""
    return _SHARED.sub(lambda m: f"static {m.group(1)} {m.group(2)}{m.group(3)}; "
                                 f"::emu::shared_mark(&{m.group(2)}, sizeof({m.group(2)}));", src)


def rewrite_launches(src: str) -> str:
    """``k<<<cfg>>>(args)`` -> ``::emu::launch(::emu::cfg(cfg), k, args)``."""

    def sub(m: re.Match) -> str:
        head = f"::emu::launch(::emu::cfg({m.group(2)}), {m.group(1)}"
        return head + ")" if m.group(3) else head + ", "

    return _LAUNCH.sub(sub, src)


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _inputs() -> list[Path]:
    files = sorted(HERE.rglob("*.h")) + sorted(HERE.rglob("*.cuh")) + sorted(HERE.glob("*.c*")) + [HERE / "build.py"]
    files += sorted(CUDA_SRC.glob("*.cu")) + sorted(CUDA_SRC.glob("*.cuh")) + sorted(CUDA_SRC.glob("*.h"))
    return files


def build(out_dir: Path | None = None) -> Path:
    """Compiles (if not cached) and returns the path of the emulation library."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    out_dir = Path(out_dir or ROOT / "build" / "cuda_emu")
    h = hashlib.sha256(" ".join(FLAGS).encode())
    for f in _inputs():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    lib = out_dir / f"libbus_cuda_emu_{h.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    gen = out_dir / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    units = []
    for path in [CUDA_SRC / name for name in SOURCES] + [HERE / "selftest.cu"]:
        unit = gen / (path.name + ".cpp")
        unit.write_text(f'#line 1 "{path}"\n' + rewrite_shared(rewrite_launches(path.read_text())))
        units.append(str(unit))
    tmp = lib.with_suffix(".tmp.so")
    cmd = [cxx, *FLAGS, f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CUDA_SRC}", *units, str(HERE / "entry.cpp"),
           "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    tmp.replace(lib)
    return lib


def load(out_dir: Path | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(out_dir)))
    lib.emu_message.restype = ctypes.c_char_p
    lib.emu_launches.restype = ctypes.c_int64
    lib.emu_select_partial_floats.restype = ctypes.c_int64
    return lib


if __name__ == "__main__":
    print(build())
