"""benchmarks/report.py: ratios, ceilings, the interleaved pair and the headline, on a made-up run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(group, impl, median, **extra):
    return {"group": group, "name": f"{group}-{impl}", "fullname": f"{group}::{impl}",
            "stats": {"median": median}, "extra_info": {"impl": impl, **extra}}


RUN = {
    "datetime": "2026-11-30T09:00:00", "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
    "commit_info": {"id": "0123456789abcdef", "dirty": False},
    "benchmarks": [
        _row("ceiling copy", "copy", 0.05, op="ceiling", nbytes=1e9, dtype="float32"),  # 20 GB/s
        _row("ceiling mm", "matmul", 0.5, op="ceiling", flops=5e10, dtype="float32"),  # 0.1 TFLOP/s
        _row("select", "torch", 0.04, op="select_tokens", nbytes=2e8, dtype="bfloat16", reference=True),
        _row("select", "cpu", 0.01, op="select_tokens", nbytes=2e8, dtype="bfloat16", reference=False),
        _row("attn", "sdpa_padded", 0.8, op="varlen_attention", flops=2e10, dtype="bfloat16", reference=True),
        _row("attn", "cpu", 0.4, op="varlen_attention", flops=2e10, dtype="bfloat16", reference=False),
        _row("e2e train step x", "baseline@224", 16.0, op="e2e train step", images=8, reference=True,
             shape="ViT-B/16 B8"),
        _row("e2e train step x", "bus@224", 12.0, op="e2e train step", images=8, reference=False,
             shape="ViT-B/16 B8"),
        _row("e2e train step interleaved", "pair", 28.0, op="e2e train step interleaved", images=16,
             reference=False, interleaved={"baseline@224": [16.0, 18.0, 17.0], "bus@224": [12.0, 12.5, 11.0]}),
        _row("quality q", "bus", 100.0, op="quality", images=28800, reference=False, **{"i2t_r@1": 0.25, "t2i_r@1": 0.2},
             per_seed={"i2t_r@1": [0.2, 0.25, 0.3]}),
    ],
}


def test_ratios_and_ceilings(report):
    text = report.render(RUN)
    assert "commit: 0123456789ab" in text and "Test CPU, 2 logical cores" in text
    # speed-up = reference median / row median, within the group
    assert "| cpu | 10.000 | 20.0 GB/s (100% of copy) | 4.00x |" in text
    assert "| torch | 40.000 | 5.0 GB/s (25% of copy) | 1.00x |" in text
    # bf16 attention on a run without a bf16 matmul ceiling: against the fp32 one
    assert "| cpu | 400.000 | 0.05 TFLOP/s (50% of fp32 matmul) | 2.00x |" in text
    assert "| bus@224 | 12000.000 | 0.67 img/s | 1.33x |" in text


def test_interleaved_pair_and_headline(report):
    text = report.render(RUN)
    # medians 17.0 and 12.0 s: 1.42x; per round 16/12, 18/12.5, 17/11
    assert "**bus@224 vs baseline@224, interleaved: 1.42x** (ratio of medians; per round 1.33x, 1.44x, 1.55x)" in text
    assert "| baseline@224 | 16000 / 18000 / 17000 | 17000 | 0.47 img/s |" in text
    assert "mean of 3 seeds; i2t R@1 per seed 0.200 / 0.250 / 0.300" in text
    head = report.headline(text)
    assert "### e2e train step x" in head and "### quality q" in head and "interleaved: 1.42x" in head
    assert "select" not in head and "ceiling" not in head


def test_merge_and_write(report, tmp_path, monkeypatch):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(RUN))
    rerun = dict(RUN, benchmarks=[_row("select", "cpu", 0.02, op="select_tokens", nbytes=2e8, dtype="bfloat16",
                                       reference=False)])
    b.write_text(json.dumps(rerun))
    out = tmp_path / "RESULTS.md"
    monkeypatch.setattr("sys.argv", ["report.py", str(a), str(b), "--out", str(out)])
    report.main()
    text = out.read_text()
    assert "| cpu | 20.000 |" in text and "| cpu | 10.000 |" not in text  # the rerun's row replaces the first
    assert "| torch | 40.000 |" in text


def test_write_keeps_the_hand_written_parts(report, tmp_path, monkeypatch):
    """A RESULTS.md with markers keeps its analysis; only the marked tables are replaced."""
    a = tmp_path / "a.json"
    a.write_text(json.dumps(RUN))
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Results\n\nanalysis before\n\n{report.BEGIN}\nold tables\n{report.END}\n\nanalysis after\n")
    monkeypatch.setattr("sys.argv", ["report.py", str(a), "--out", str(out)])
    report.main()
    text = out.read_text()
    assert text.startswith("# Results\n\nanalysis before\n") and text.endswith("analysis after\n")
    assert "old tables" not in text and "| torch | 40.000 |" in text
    assert text.count("# Benchmark results") == 0  # the report's own title is dropped inside a file
    monkeypatch.setattr("sys.argv", ["report.py", str(a), "--out", str(out)])
    report.main()  # a second run replaces its own block again
    assert out.read_text() == text
