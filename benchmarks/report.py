"""Turns a pytest-benchmark JSON into the tables of benchmarks/RESULTS.md.

    python benchmarks/report.py benchmarks/out/bench.json [more.json ...] [--out benchmarks/RESULTS.md] [--stdout]

One table per benchmark group (op, mode, shape, dtype): every implementation's median time, its
achieved GB/s, TFLOP/s or images/s (from the work recorded by the benchmark) and its speed-up
over the group's reference row (the ``torch`` backend; SDPA over the padded batch for
varlen_attention; the baseline model end to end), measured in the same run. The header names the machine, the versions, the
commit and the date. With matplotlib installed it also draws, from the end-to-end rows, the
BUS speed-up against the keep ratio and the throughput against the resolution (PNG files next to
the report). Several JSON files (e.g. a rerun of a few benchmarks) are merged. The end-to-end and
quality tables (the headline) are also printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
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


def _ceilings(data: dict) -> dict:
    """{("copy", None): GB/s, ("matmul", dtype): TFLOP/s} from the run's ceiling rows."""
    out = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("op") != "ceiling":
            continue
        sec = b["stats"]["median"]
        if e.get("impl") == "copy" and e.get("nbytes"):
            out[("copy", None)] = max(out.get(("copy", None), 0.0), e["nbytes"] / sec / 1e9)
        elif e.get("impl") == "matmul" and e.get("flops"):
            out[("matmul", e.get("dtype"))] = e["flops"] / sec / 1e12
    return out


def _of_ceiling(extra: dict, seconds: float, ceilings: dict) -> str:
    if extra.get("op") == "ceiling":
        return ""
    if extra.get("flops"):
        for key, label in ((("matmul", extra.get("dtype")), "matmul"), (("matmul", "float32"), "fp32 matmul")):
            if key in ceilings:
                return f" ({100 * extra['flops'] / seconds / 1e12 / ceilings[key]:.0f}% of {label})"
    if extra.get("nbytes") and ("copy", None) in ceilings:
        return f" ({100 * extra['nbytes'] / seconds / 1e9 / ceilings[('copy', None)]:.0f}% of copy)"
    return ""


def _rate(extra: dict, seconds: float) -> str:
    if extra.get("gflop_per_image") is not None:  # a FLOP count: the figure is the count, not the time
        return f"{extra['gflop_per_image']:.1f} GFLOP/img (ViT alone {extra.get('vit_gflop_per_image', 0):.1f})"
    if extra.get("i2t_r@1") is not None:
        text = f"{extra['images'] / seconds:.1f} img/s, i2t R@1 {extra['i2t_r@1']:.3f}, t2i R@1 {extra['t2i_r@1']:.3f}"
        seeds = extra.get("per_seed", {}).get("i2t_r@1")
        if seeds and len(seeds) > 1:  # the mean of several seeds: show each
            text += f" (mean of {len(seeds)} seeds; i2t R@1 per seed " + " / ".join(f"{v:.3f}" for v in seeds) + ")"
        return text
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
    out += ["Speed-up: the group's reference row (the `torch` backend for kernels, SDPA over the padded",
            "batch for varlen_attention, the baseline model end to end) median / this median, measured",
            "in the same run.", ""]
    ceilings = _ceilings(data)
    if ceilings:
        out += ["Ceilings measured in the same run (`ceiling` groups): a tensor copy for GB/s (bytes read +",
                "written), a square matmul per dtype for TFLOP/s (on a CPU the fp32 one only: without bf16 units",
                "it bounds bf16 work too); the percentages next to a kernel's rate are against them.", ""]
    for group in sorted(groups):
        rows = groups[group]
        ref_row = next((r for r in rows if r["extra_info"].get("reference")), None)
        ref = ref_row["stats"]["median"] if ref_row else None
        ref_name = ref_row["extra_info"].get("impl") if ref_row else "reference"
        out += [f"### {group}", "", f"| impl | median ms | rate | speed-up vs {ref_name} |", "|---|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            med = r["stats"]["median"]
            speed = f"{ref / med:.2f}x" if ref else ""
            if r["extra_info"].get("gflop_per_image") and ref_row and ref_row["extra_info"].get("gflop_per_image"):
                speed = f"{ref_row['extra_info']['gflop_per_image'] / r['extra_info']['gflop_per_image']:.2f}x FLOPs"
            rate = _rate(r["extra_info"], med) + _of_ceiling(r["extra_info"], med, ceilings)
            out.append(f"| {r['extra_info'].get('impl', r['name'])} | {med * 1e3:.3f} | {rate} | {speed} |")
        out.append("")
        for r in rows:
            out += _interleaved(r["extra_info"])
    return "\n".join(out)


def _interleaved(extra: dict) -> list[str]:
    """Per-model step times of an interleaved benchmark and the ratio of their medians."""
    times = extra.get("interleaved")
    if not times or len(times) != 2 or not all(times.values()):
        return []
    (a, ta), (b, tb) = times.items()
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = [x / y for x, y in zip(ta, tb)]
    lines = [f"| model (interleaved, {len(ta)} rounds) | step ms per round | median ms | rate |", "|---|---|---:|---:|"]
    for k, v in times.items():
        rate = f"{extra['images'] / 2 / med[k]:.2f} img/s" if extra.get("images") else ""
        lines.append(f"| {k} | {' / '.join(f'{t * 1e3:.0f}' for t in v)} | {med[k] * 1e3:.0f} | {rate} |")
    lines += ["", f"**{b} vs {a}, interleaved: {med[a] / med[b]:.2f}x** (ratio of medians; per round "
              + ", ".join(f"{p:.2f}x" for p in pairs) + ")", ""]
    return lines


def _e2e_points(data: dict) -> dict:
    """{impl: images/s} of the ViT-B/16 end-to-end rows (impl like 'bus-keep0.5@224')."""
    pts = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("op") == "e2e train step" and "ViT-B/16" in e.get("shape", "") and e.get("images"):
            pts[e["impl"]] = e["images"] / b["stats"]["median"]
    return pts


def plots(data: dict, outdir: Path) -> list[Path]:
    """Speed-up vs keep ratio and throughput vs resolution; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pts, written = _e2e_points(data), []
    base = pts.get("baseline@224")
    keeps = sorted((0.7 if name == "bus@224" else float(name[len("bus-keep"):-len("@224")]), v)
                   for name, v in pts.items() if name == "bus@224" or (name.startswith("bus-keep") and name.endswith("@224")))
    if base and len(keeps) >= 2:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([k for k, _ in keeps], [v / base for _, v in keeps], "o-", label="BUS (TSPS at 4/7/10 + PAD)")
        ax.axhline(1.0, color="gray", ls="--", label="baseline")
        ax.set(xlabel="keep ratio per TSPS layer", ylabel="train images/s vs baseline", title="ViT-B/16 @224, train step")
        ax.legend()
        fig.tight_layout()
        written.append(outdir / "speedup_vs_keep.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    res = {}
    for name, v in pts.items():
        model, _, r = name.partition("@")
        if r.isdigit():
            res.setdefault(model, []).append((int(r), v))
    # every model measured at a resolution other than 224 (with its 224 point when there is one)
    res = {m: rows for m, rows in res.items() if any(r != 224 for r, _ in rows)}
    if res:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for model, rows in sorted(res.items()):
            rows.sort()
            ax.plot([r for r, _ in rows], [v for _, v in rows], "o-", label=model)
        if base and "baseline" not in res:  # the cost BUS at a higher resolution is held against
            ax.axhline(base, color="gray", ls="--", label="baseline@224")
        ax.set(xlabel="image resolution (px)", ylabel="train images/s", title="ViT-B/16 train step")
        ax.legend()
        fig.tight_layout()
        written.append(outdir / "throughput_vs_resolution.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--stdout", action="store_true", help="print instead of writing --out")
    args = ap.parse_args()
    data = json.loads(args.json[0].read_text())
    for extra in args.json[1:]:  # later files replace rows of the same name
        more = json.loads(extra.read_text())["benchmarks"]
        names = {b["fullname"] for b in more}
        data["benchmarks"] = [b for b in data["benchmarks"] if b["fullname"] not in names] + more
    text = render(data)
    if args.stdout:
        print(text)
    else:
        pictures = plots(data, args.out.parent)
        if pictures:
            text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pictures) + "\n"
        args.out.write_text(merge_into(args.out.read_text() if args.out.exists() else None, text))
        print(headline(text))
        print(f"wrote {args.out}" + "".join(f", {p}" for p in pictures))


BEGIN, END = "<!-- report:begin (written by benchmarks/report.py) -->", "<!-- report:end -->"


def merge_into(existing: str | None, text: str) -> str:
    """The file report.py writes: ``text`` between the BEGIN/END markers of ``existing``, whose
    hand-written parts (the analysis around the tables) are kept; without markers (or without a
    file) the whole file is the report, wrapped in markers for the next run."""
    if existing is not None and BEGIN in existing and END in existing.split(BEGIN, 1)[1]:
        head, rest = existing.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the file has its own title
        return f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}"
    return f"{BEGIN}\n{text.strip()}\n{END}\n"


def headline(text: str) -> str:
    """The end-to-end and quality sections of a rendered report (what `make bench` prints)."""
    sections = text.split("\n### ")
    keep = [s for s in sections[1:] if s.startswith(("e2e train step", "paper train step", "quality"))]
    return "\n".join("### " + s.rstrip() + "\n" for s in keep)


if __name__ == "__main__":
    main()
