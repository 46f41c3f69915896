"""pytest plugin used by ``gpu_check.sh``: every test runs under
``torch.cuda.set_sync_debug_mode("warn")``; the synchronising CUDA calls it reports are counted
per test and summed per test module at the end (``-p benchmarks.gpu_pytest_syncs``).

The counts include the tests' own syncs (comparisons with references read results on the host);
``gpu_bench.py syncs`` counts the library's syncs per op call, against issue 13's budgets.
"""
from __future__ import annotations

import collections
import json
import os
import warnings
from pathlib import Path

import pytest

_COUNTS: collections.Counter = collections.Counter()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    import torch

    if not torch.cuda.is_available():
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _COUNTS[item.nodeid] += sum("synchroniz" in str(w.message) for w in caught)


def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    per_module = collections.Counter()
    for nodeid, n in _COUNTS.items():
        per_module[nodeid.split("::")[0]] += n
    tr = terminalreporter
    tr.write_sep("-", "synchronising CUDA calls (set_sync_debug_mode('warn'), tests included)")
    for mod, n in per_module.most_common():
        tr.write_line(f"{n:7d}  {mod}")
    tr.write_line("top tests: " + ", ".join(f"{k.split('::', 1)[-1]}={v}" for k, v in _COUNTS.most_common(5)))
    out = os.environ.get("OUT")
    if out:
        Path(out, "test_syncs.json").write_text(json.dumps(dict(_COUNTS), indent=1))
