"""Turns a pytest-benchmark JSON into the tables of benchmarks/RESULTS.md.

    python benchmarks/report.py benchmarks/out/bench.json [--out benchmarks/RESULTS.md] [--stdout]

One table per benchmark group (op, mode, shape, dtype): every implementation's median time, its
achieved GB/s, TFLOP/s or images/s (from the work recorded by the benchmark) and its speed-up
over the group's reference row (the ``torch`` backend; the baseline model end to end), measured in
the same run. The header names the machine, the versions, the
commit and the date.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _header(data: dict) -> list[str]:
    mi, ci = data.get("machine_info", {}), data.get("commit_info", {})
    device = next((b["extra_info"].get("device") for b in data["benchmarks"]), "?")
    cpu = mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?"))
    lines = [
        f"- date: {data.get('datetime', '?')[:19]} UTC",
        f"- device: {device}" + (" (CPU timings)" if device == "cpu" else ""),
        f"- cpu: {cpu}, {mi.get('cpu', {}).get('count', '?')} logical cores",
        f"- python {mi.get('python_version', '?')}",
        f"- commit: {ci.get('id', '?')[:12]}{' (dirty tree)' if ci.get('dirty') else ''}",
    ]
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    lines.insert(2, f"- torch {first.get('torch', '?')}, triton {first.get('triton', '?')}")
    return lines


def _rate(extra: dict, seconds: float) -> str:
    if extra.get("images"):
        return f"{extra['images'] / seconds:.2f} img/s"
    if extra.get("flops"):
        return f"{extra['flops'] / seconds / 1e12:.2f} TFLOP/s"
    if extra.get("nbytes"):
        return f"{extra['nbytes'] / seconds / 1e9:.1f} GB/s"
    return ""


def render(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    out = ["# Benchmark results", "", *_header(data), ""]
    out += ["Speed-up: the group's reference row (the `torch` backend for kernels, the baseline model",
            "end to end) median / this median, measured in the same run.", ""]
    for group in sorted(groups):
        rows = groups[group]
        ref_row = next((r for r in rows if r["extra_info"].get("reference")), None)
        ref = ref_row["stats"]["median"] if ref_row else None
        ref_name = ref_row["extra_info"].get("impl") if ref_row else "reference"
        out += [f"### {group}", "", f"| impl | median ms | rate | speed-up vs {ref_name} |", "|---|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            med = r["stats"]["median"]
            speed = f"{ref / med:.2f}x" if ref else ""
            out.append(f"| {r['extra_info'].get('impl', r['name'])} | {med * 1e3:.3f} | {_rate(r['extra_info'], med)} | {speed} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--stdout", action="store_true", help="print instead of writing --out")
    args = ap.parse_args()
    data = json.loads(args.json.read_text())
    text = render(data)
    if args.stdout:
        print(text)
    else:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
