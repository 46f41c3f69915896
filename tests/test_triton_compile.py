"""The Triton kernels that run at the mission shapes compile for sm_80 and sm_90 as the JIT compiles
them (its own specialisation: 16-byte-divisible pointers and ints, ``== 1`` constants), without
spills and within the target's shared memory. No GPU needed; see ``triton_compile_check.py``.

One subprocess (real kernels need TRITON_INTERPRET unset) compiles every case once; each test
then checks one case on one target, so a failure names the op, dtype, N, d, T and target.
Cases that fail today because of a kernel defect being fixed elsewhere are strict xfails: they
turn into failures (XPASS) the moment the fix lands, and the mark must then be removed.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

SCRIPT = Path(__file__).with_name("triton_compile_check.py")
_spec = importlib.util.spec_from_file_location("triton_compile_check", SCRIPT)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

# BUS_COMPILE_CCS="90" restricts the targets (e.g. the device-version stage of .ci/run).
CCS = tuple(int(c) for c in os.environ.get("BUS_COMPILE_CCS", "80 90").replace(",", " ").split())

# Kernels each op must launch at the mission shapes (a case that records none of them is broken).
EXPECTED = {
    "relevance": {"_relevance_fwd_kernel", "_relevance_bwd_kernel"},
    "select": {"_select_rank_kernel", "_select_gather_kernel", "_select_bwd_kernel"},
    "varlen": {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"},
}

# Cases that fail at the time of writing, per triton version (minor) and target; the reason
# quotes the figures measured then. Most are the subject of issue 13's kernel work (relevance:
# tile T so that BLOCK_T <= 64; varlen attention: no spills). Strict: a fixed case XPASSes and
# fails the run until its line is removed here.
KNOWN_FAILURES: dict[tuple[str, int], dict[str, str]] = {
    ('3.8', 90): {
        'relevance-bf16-N197-d64-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 96 B stack',
        'relevance-bf16-N577-d128-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 1040 B stack',
        'relevance-bf16-N577-d256-T1': 'relevance spills: bwd 255 regs + 168 B stack',
        'relevance-bf16-N577-d256-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 4232 B stack; bwd shared memory 327936 B > sm_90 limit 232448 B',
        'relevance-bf16-N577-d64-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 104 B stack',
        'relevance-fp16-N197-d64-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 160 B stack',
        'relevance-fp16-N577-d128-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 1008 B stack',
        'relevance-fp16-N577-d256-T1': 'relevance spills: bwd 255 regs + 160 B stack',
        'relevance-fp16-N577-d256-T256': 'issue 13 #4, BLOCK_T=256: bwd compile > time limit',
        'relevance-fp16-N577-d64-T256': 'issue 13 #4, BLOCK_T=256: bwd 255 regs + 104 B stack',
        'relevance-fp32-N197-d64-T256': 'issue 13 #4, BLOCK_T=256: fwd 255 regs + 3368 B stack; bwd compile > time limit',
        'relevance-fp32-N197-d64-T32': 'relevance spills: fwd 255 regs + 248 B stack; bwd 255 regs + 240 B stack',
        'relevance-fp32-N577-d128-T1': 'relevance spills: fwd 255 regs + 488 B stack; bwd 255 regs + 200 B stack',
        'relevance-fp32-N577-d128-T256': 'issue 13 #4, BLOCK_T=256: fwd compile > time limit; bwd compile > time limit',
        'relevance-fp32-N577-d128-T32': 'relevance spills: fwd 168 regs + 2048 B stack; bwd 255 regs + 1936 B stack',
        'relevance-fp32-N577-d256-T1': 'relevance spills: fwd 168 regs + 3336 B stack; bwd compile > time limit',
        'relevance-fp32-N577-d256-T256': 'issue 13 #4, BLOCK_T=256: fwd compile > time limit; bwd compile > time limit',
        'relevance-fp32-N577-d256-T32': 'relevance spills: fwd 168 regs + 2336 B stack; bwd 255 regs + 736 B stack',
        'relevance-fp32-N577-d64-T256': 'issue 13 #4, BLOCK_T=256: fwd 255 regs + 1304 B stack; bwd compile > time limit',
        'relevance-fp32-N577-d64-T32': 'relevance spills: fwd 255 regs + 248 B stack; bwd 255 regs + 176 B stack',
        'varlen-bf16-N577-d256': 'varlen spills: fwd 255 regs + 48 B stack; bwd_dkdv 255 regs + 56 B stack',
        'varlen-fp16-N577-d256': 'varlen spills: fwd 255 regs + 40 B stack; bwd_dkdv 255 regs + 72 B stack',
        'varlen-fp32-N577-d128': 'varlen spills: bwd_dkdv 255 regs + 888 B stack',
        'varlen-fp32-N577-d256': 'varlen spills: fwd 255 regs + 168 B stack; bwd_dkdv compile > time limit',
    },
    ('3.8', 80): {
        'relevance-bf16-N577-d256-T32': 'relevance spills: bwd 255 regs + 8 B stack',
        'relevance-fp16-N577-d256-T32': 'relevance spills: bwd 255 regs + 8 B stack',
        'relevance-fp32-N197-d64-T256': 'issue 13 #4, BLOCK_T=256: fwd 32 regs + 7616 B stack; bwd 32 regs + 18616 B stack',
        'relevance-fp32-N197-d64-T32': 'relevance spills: fwd 255 regs + 176 B stack; bwd 32 regs + 8352 B stack',
        'relevance-fp32-N577-d128-T1': 'relevance spills: bwd 168 regs + 1344 B stack',
        'relevance-fp32-N577-d128-T256': 'issue 13 #4, BLOCK_T=256: fwd 32 regs + 12096 B stack; bwd compile > time limit',
        'relevance-fp32-N577-d128-T32': 'relevance spills: fwd 48 regs + 3560 B stack; bwd 255 regs + 2128 B stack',
        'relevance-fp32-N577-d256-T1': 'relevance spills: bwd compile > time limit',
        'relevance-fp32-N577-d256-T256': 'issue 13 #4, BLOCK_T=256: fwd compile > time limit; bwd compile > time limit',
        'relevance-fp32-N577-d256-T32': 'relevance spills: bwd compile > time limit',
        'relevance-fp32-N577-d64-T256': 'issue 13 #4, BLOCK_T=256: fwd 255 regs + 1448 B stack; bwd compile > time limit',
        'relevance-fp32-N577-d64-T32': 'relevance spills: fwd 255 regs + 72 B stack; bwd 32 regs + 8424 B stack',
        'varlen-bf16-N197-d64': 'varlen spills: fwd 255 regs + 16 B stack; bwd_dkdv 255 regs + 224 B stack; bwd_dq 255 regs + 8 B stack',
        'varlen-bf16-N577-d256': 'varlen spills: fwd 255 regs + 64 B stack; bwd_dkdv 255 regs + 120 B stack',
        'varlen-bf16-N577-d64': 'varlen spills: fwd 255 regs + 16 B stack; bwd_dkdv 255 regs + 224 B stack; bwd_dq 255 regs + 8 B stack',
        'varlen-fp16-N197-d64': 'varlen spills: fwd 255 regs + 16 B stack; bwd_dkdv 255 regs + 224 B stack; bwd_dq 255 regs + 8 B stack',
        'varlen-fp16-N577-d256': 'varlen spills: fwd 255 regs + 64 B stack; bwd_dkdv 255 regs + 120 B stack',
        'varlen-fp16-N577-d64': 'varlen spills: fwd 255 regs + 16 B stack; bwd_dkdv 255 regs + 224 B stack; bwd_dq 255 regs + 8 B stack',
        'varlen-fp32-N577-d128': 'varlen spills: fwd 255 regs + 64 B stack; bwd_dkdv 255 regs + 128 B stack; bwd_dq 255 regs + 72 B stack',
        'varlen-fp32-N577-d256': 'varlen spills: fwd 255 regs + 136 B stack; bwd_dkdv compile > time limit',
    },
    ('3.6', 90): {
        'relevance-fp32-N197-d64-T1': 'relevance spills (after the T tiling, CI 2026-12-03): bwd BLOCK_T=16 168 regs + 8 B stack',
        'relevance-bf16-N577-d256-T1': 'relevance spills: bwd 255 regs + 184 B stack',
        'relevance-fp16-N577-d256-T1': 'relevance spills: bwd 255 regs + 184 B stack',
        'relevance-fp32-N197-d64-T256': 'issue 13 #4, BLOCK_T=256: fwd compile > time limit; bwd compile > time limit',
        'relevance-fp32-N197-d64-T32': 'relevance spills: fwd 255 regs + 232 B stack; bwd 255 regs + 264 B stack',
        'relevance-fp32-N577-d128-T256': 'issue 13 #4, BLOCK_T=256: fwd compile > time limit; bwd compile > time limit',
        'relevance-fp32-N577-d128-T32': 'relevance spills: fwd 32 regs + 5736 B stack; bwd 255 regs + 1920 B stack',
        'relevance-fp32-N577-d256-T1': 'relevance spills: bwd compile > time limit',
        'relevance-fp32-N577-d256-T256': 'issue 13 #4, BLOCK_T=256: fwd compile > time limit; bwd compile > time limit',
        'relevance-fp32-N577-d256-T32': 'relevance spills: bwd compile > time limit',
        'relevance-fp32-N577-d64-T256': 'issue 13 #4, BLOCK_T=256: fwd 255 regs + 1272 B stack; bwd compile > time limit',
        'relevance-fp32-N577-d64-T32': 'relevance spills: fwd 255 regs + 192 B stack; bwd 255 regs + 176 B stack',
        'varlen-bf16-N197-d64': 'varlen spills: bwd_dkdv 255 regs + 32 B stack',
        'varlen-bf16-N577-d256': 'varlen spills: fwd 255 regs + 40 B stack; bwd_dkdv 255 regs + 64 B stack',
        'varlen-bf16-N577-d64': 'varlen spills: bwd_dkdv 255 regs + 32 B stack',
        'varlen-fp16-N197-d64': 'varlen spills: bwd_dkdv 255 regs + 32 B stack',
        'varlen-fp16-N577-d256': 'varlen spills: fwd 255 regs + 40 B stack; bwd_dkdv 255 regs + 64 B stack',
        'varlen-fp16-N577-d64': 'varlen spills: bwd_dkdv 255 regs + 32 B stack',
        'varlen-fp32-N577-d128': 'varlen spills: bwd_dkdv 255 regs + 896 B stack',
        'varlen-fp32-N577-d256': 'varlen spills: fwd 255 regs + 168 B stack; bwd_dkdv 168 regs + 2304 B stack',
    },
}


def _triton_minor() -> str:
    from importlib.metadata import version

    return ".".join(version("triton").split(".")[:2])


def _params():
    out = []
    minor = _triton_minor() if importlib.util.find_spec("triton") else ""
    for case in check.cases():
        for cc in CCS:
            reason = KNOWN_FAILURES.get((minor, cc), {}).get(case.name)
            # Not strict: the table was measured on the kernels before the T-tiling and strided-k
            # changes merged; cases those fixed show as XPASS (pytest -rX) and their lines should go.
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            out.append(pytest.param(case.name, cc, marks=marks, id=f"{case.name}-sm{cc}"))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--json", str(out), "--cc", *map(str, CCS)]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=2700)
    if not out.exists():  # the check itself broke (not a kernel over a limit): show why
        pytest.fail(f"{' '.join(cmd)} wrote no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    sys.stdout.write(proc.stdout)  # the per-launch figures, shown with -s or on failure
    return json.loads(out.read_text())


@pytest.mark.parametrize("name,cc", _params())
def test_no_spills_and_shared_memory_within_limit(results, name, cc):
    recs = results[name][f"sm_{cc}"]
    op = name.split("-")[0]
    bad = [f"{check.describe(r)}: {p}" for r in recs for p in check.problems(r)]
    assert not bad, f"{name} on sm_{cc}:\n" + "\n".join(bad)
    launched = {r["kernel"] for r in recs}
    assert EXPECTED[op] <= launched, f"{name}: expected launches of {sorted(EXPECTED[op])}, recorded {sorted(launched)}"


def test_launches_are_specialised_like_the_jit(results):
    """The binder marked what the runtime marks: every launch has 16-divisible arguments (the
    tensors' base pointers are 16-byte aligned here, as the CUDA caching allocator's are), and
    ints equal to 1 (num_prefix) became constants. A hand-written ASTSource has neither."""
    ones = set()
    for name, per_cc in results.items():
        for recs in per_cc.values():
            for r in recs:
                assert r["divisible16"], f"{name}: {r['kernel']} has no 16-divisible argument"
                ones.update(r["ones"])
    assert ones, "no int argument equal to 1 was specialised to a constant"
