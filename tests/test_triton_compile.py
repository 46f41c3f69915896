"""Every Triton kernel configuration compiles for sm_80 and sm_90 (no GPU needed)."""
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bus_kernels.triton as triton_pkg

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

MODULES = sorted(
    f"bus_kernels.triton.{m.name}" for m in pkgutil.iter_modules(triton_pkg.__path__) if not m.name.startswith("_")
)


@pytest.mark.parametrize("module", MODULES or [pytest.param(None, marks=pytest.mark.skip(reason="no Triton kernels yet"))])
def test_compiles_for_sm80_sm90(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    # One process per target: ptxas runs in parallel on the two targets.
    procs = [
        subprocess.Popen([sys.executable, str(script), "--cc", cc, module], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for cc in ("80", "90")
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out
        assert "compilations ok" in out and " 0 compilations" not in out, out
