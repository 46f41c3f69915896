"""The Triton kernels that run at the mission shapes compile for sm_80 and sm_90 as the JIT compiles
them (its own specialisation: 16-byte-divisible pointers and ints, ``== 1`` constants), without
spills and within the target's shared memory. No GPU needed; see ``triton_compile_check.py``.

One subprocess (real kernels need TRITON_INTERPRET unset) compiles every case once; each test
then checks one case on one target, so a failure names the op, dtype, N, d, T and target.
Cases listed in ``KNOWN_FAILURES`` (none today) are strict xfails: they turn into failures
(XPASS) the moment a fix lands, and the line must then be removed.
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

# Cases that fail, per triton version (minor) and target, with the figures measured: each is a
# strict xfail, so a fixed case XPASSes and fails the run until its line is removed here. Empty
# since issue 13's tile work (2026-12-03): every case passes on sm_80 and sm_90 under triton 3.8
# and on sm_90 under the device's triton 3.6 (the README's Checks section has the before/after
# figures). A case that starts failing gets a line here only with its figures and a reason.
KNOWN_FAILURES: dict[tuple[str, int], dict[str, str]] = {}


def _triton_minor() -> str:
    from importlib.metadata import version

    return ".".join(version("triton").split(".")[:2])


def _params():
    out = []
    minor = _triton_minor() if importlib.util.find_spec("triton") else ""
    for case in check.cases():
        for cc in CCS:
            reason = KNOWN_FAILURES.get((minor, cc), {}).get(case.name)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
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
