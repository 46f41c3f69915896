"""benchmarks/gpu_check.sh --dry-run works on CPU: its plan, environment report and the scripts it
calls; and gpu_bench.py's padding helpers match the library's unpack."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bus_kernels as bk

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("build", "tests", "syncs", "memcheck", "racecheck", "bench", "e2e", "compilecheck")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _dry_run(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=root, env=env,
                          text=True, capture_output=True, timeout=600)


def test_dry_run_prints_the_plan_and_exits_0(tmp_path):
    proc = _dry_run(ROOT, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # every stage, in the order of value, with its timeout and command, and nothing run
    positions = [out.index(f"== {name} (timeout ") for name in STAGES]
    assert positions == sorted(positions), out
    assert "setup.py build_ext --inplace" in out
    assert "--tool memcheck" in out and "--tool racecheck" in out and "gpu_bench.py bench" in out
    assert "-k interleaved" in out and "gpu_pytest_syncs" in out
    # the environment report: tools present or missing, imports, scripts parse
    for tool in ("nvcc", "compute-sanitizer", "ncu", "cuobjdump"):
        assert f"tool {tool}:" in out
    assert "import torch:" in out and "import bus_kernels: ok" in out
    assert "script benchmarks/gpu_bench.py: parses" in out
    # the budgets add up to one device call (<= 9 min) and the log and summary are written
    stages = (tmp_path / "stages.tsv").read_text().splitlines()
    assert [s.split("\t")[0] for s in stages] == list(STAGES)
    assert sum(int(s.split("\t")[2]) for s in stages) <= 525
    assert "gpu_check summary" in (tmp_path / "log.txt").read_text()


def test_dry_run_fails_when_a_called_script_is_broken(tmp_path):
    """A copy of the tree whose gpu_bench.py does not parse: the dry run must say so and fail."""
    root = tmp_path / "tree"
    (root / "benchmarks").mkdir(parents=True)
    (root / "tests").mkdir()
    for rel in ("benchmarks/gpu_check.sh", "benchmarks/gpu_pytest_syncs.py", "benchmarks/test_bench_e2e.py",
                "benchmarks/conftest.py", "tests/triton_compile_check.py", "setup.py"):
        shutil.copy(ROOT / rel, root / rel)
    shutil.copytree(ROOT / "bus_kernels", root / "bus_kernels")
    shutil.copytree(ROOT / "bus", root / "bus")
    (root / "benchmarks" / "gpu_bench.py").write_text("def broken(:\n")
    proc = _dry_run(root, tmp_path / "out")
    assert proc.returncode != 0, proc.stdout
    assert "preflight FAILED" in proc.stdout
    assert "script benchmarks/gpu_bench.py: parses" not in proc.stdout
    assert not [ln for ln in proc.stdout.splitlines() if "script " in ln and "MISSING" in ln]  # only gpu_bench.py


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_padding_helpers_match_unpack():
    """The padded-SDPA baseline gets exactly the packed rows, and -inf on padding keys."""
    gb = _gpu_bench()
    lengths, cu, max_len = gb.packed_lengths(5, 37, torch.device("cpu"), seed=3)
    assert int(lengths.min()) >= 2 and max_len == int(lengths.max()) and int(cu[-1]) == int(lengths.sum())
    t = torch.randn(int(cu[-1]), 3, 8)
    padded = gb._pad(t, cu, max_len)  # [B, H, L, d]
    ref = bk.unpack(t.reshape(t.shape[0], -1), cu, max_len, backend="torch").reshape(5, max_len, 3, 8)
    assert torch.equal(padded, ref.transpose(1, 2))
    bias = torch.randn(int(cu[-1]))
    m = gb._pad_bias(bias, cu, max_len, torch.float32)[:, 0, 0]
    for b in range(5):
        n = int(lengths[b])
        assert torch.equal(m[b, :n], bias[int(cu[b]):int(cu[b]) + n])
        assert torch.isinf(m[b, n:]).all()


def test_summary_reports_stages_syncs_ratios_and_the_e2e_pair(tmp_path, capsys):
    """The table gpu_check.sh prints last, from made-up stage results."""
    import json

    gb = _gpu_bench()
    (tmp_path / "stages.tsv").write_text("build\tok\t61\t\ntests\tfail:1\t130\t\n")
    (tmp_path / "syncs.json").write_text(json.dumps([
        {"op": "select_tokens", "backend": "triton", "fwd": 0, "bwd": 0, "budget": 0, "ok": True, "error": ""},
        {"op": "pack", "backend": "cuda", "fwd": 2, "bwd": 0, "budget": 0, "ok": False, "error": ""}]))
    rows = [{"op": "varlen_attention", "impl": impl, "shape": "B64 N577", "mode": "fwd", "ms": ms}
            for impl, ms in (("triton", 1.0), ("cuda", 1.5), ("sdpa-padded", 2.0), ("torch.varlen_attn", 0.8))]
    rows.append({"op": "select_tokens", "impl": "triton", "shape": "B64 N577", "mode": "fwd", "ms": 0.1,
                 "GBps": 3000.0, "pct_copy": 75.0})
    meta = {"gpu": "H200", "torch": "2.11", "triton": "3.6", "ceilings": {"copy_GBps": 4000.0, "bf16_matmul_TFLOPs": 700.0}}
    (tmp_path / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    inter = {"baseline@224": [0.30, 0.20, 0.21, 0.19], "bus@224": [0.2, 0.16, 0.15, 0.17]}
    (tmp_path / "e2e.json").write_text(json.dumps({"benchmarks": [{"extra_info": {"interleaved": inter}}]}))
    gb.summary(tmp_path)
    out = capsys.readouterr().out
    assert "tests        fail:1" in out and "build        ok" in out
    assert "OVER budget: pack/cuda 2+0" in out
    assert "triton is sdpa-padded 2.00x, torch.varlen_attn 0.80x" in out  # best of ours: triton 1.0 ms
    assert "75.0" in out
    assert "speedup 1.24x" in out  # medians 0.21 / 0.17
