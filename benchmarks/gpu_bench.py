"""The measuring parts of ``benchmarks/gpu_check.sh`` (one GPU session, see ../shared/GPU.md).

    python3 benchmarks/gpu_bench.py bench    --out DIR   # kernels at the mission shapes
    python3 benchmarks/gpu_bench.py syncs    --out DIR   # host syncs per op call (sync debug mode)
    python3 benchmarks/gpu_bench.py sanitize             # small shapes, every op and backend, fwd+bwd
    python3 benchmarks/gpu_bench.py summary  --out DIR   # the table gpu_check.sh prints last
    python3 benchmarks/gpu_bench.py plan                 # what bench/syncs would run (no GPU needed)

``bench``: B=64, N=197/577 tokens, D=768, H=12, d=64, T=1/32 text tokens, bf16, forward and
backward of every op on every GPU backend and the references (padded SDPA, torch's
``nn.attention.varlen`` where present). Times are medians of ``triton.testing.do_bench`` (CUDA
events, after warm-up; it clears L2 between repetitions, so every run reads its inputs from HBM).
Each row gets the bytes and FLOPs the op must move/do at least, hence GB/s and % of the copy
bandwidth measured in the same run, and TFLOP/s and % of the measured bf16 matmul rate.
Results go to ``DIR/bench.json`` (rows as data) and print as a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # never time or sanitize the interpreter

MISSION = dict(B=64, D=768, H=12, d=64, tokens=(197, 577), text=(1, 32), prefix=1, keep=0.7, mass=0.8)
BUDGET = {  # host syncs per call allowed by issue 13 (default configuration, CUDA tensors)
    "relevance_scores": 0, "select_tokens": 0, "select_tokens_varlen(mass)": 1,
    "select_tokens_varlen(keep)": 1, "varlen_attention": 0, "pack": 0, "unpack": 0,
}


def _torch():
    import torch

    return torch


# ------------------------------------------------------------------------------------ inputs
def relevance_inputs(B, N, T, dtype, device, *, H=MISSION["H"], d=MISSION["d"], P=MISSION["prefix"]):
    """q [B,H,T,d] and k [B,H,N-P,d] laid out as TSPS passes them (k: view of the fused qkv)."""
    torch = _torch()
    qkv = torch.randn(B, N, 3, H, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    k = qkv[1][:, :, P:]
    q = torch.randn(B, T, H, d, device=device, dtype=dtype).transpose(1, 2)
    mask = None
    if T > 1:
        mask = torch.rand(B, T, device=device) < 0.8
        mask[:, 0] = True
    return q, k, mask


def select_inputs(B, N, dtype, device, *, D=MISSION["D"], P=MISSION["prefix"]):
    torch = _torch()
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    scores = torch.rand(B, N - P, device=device).softmax(dim=1)
    return x, scores


def packed_lengths(B, N, device, *, keep=MISSION["keep"], P=MISSION["prefix"], seed=0):
    """Sequence lengths after a TSPS selection at ``keep`` (+-20%), prefix and fused token included."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    n = N - P
    lo, hi = max(1, int(0.8 * keep * n)), min(n, int(1.2 * keep * n))
    lengths = P + 1 + torch.randint(lo, hi + 1, (B,), generator=g)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return lengths.to(device), cu.to(device), int(lengths.max())


# ------------------------------------------------------------------------------------- bench
_SMOKE = False  # --smoke: CPU, tiny batch, one untimed-quality call per row (checks the code runs)


def _do_bench(fn) -> float:
    if _SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _ceilings(device) -> dict:
    """Copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) measured now, on this device."""
    torch = _torch()
    size = 2**20 if _SMOKE else 512 * 2**20  # 512 MiB: far above L2
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    copy = 2 * src.numel() / ms / 1e6
    m = 256 if _SMOKE else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms_mm = _do_bench(lambda: a @ b)
    del src, dst
    return {"copy_GBps": copy, "bf16_matmul_TFLOPs": 2 * m**3 / ms_mm / 1e9}


def _row(op, impl, shape, mode, ms, nbytes=None, flops=None, ceil=None):
    r = {"op": op, "impl": impl, "shape": shape, "mode": mode, "ms": ms}
    if nbytes:
        r["GBps"] = nbytes / ms / 1e6
        r["pct_copy"] = 100 * r["GBps"] / ceil["copy_GBps"]
    if flops:
        r["TFLOPs"] = flops / ms / 1e9
        r["pct_matmul"] = 100 * r["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
    return r


def _ops_module(name: str):
    """bus_kernels.ops.<name> (the package re-exports functions under some of these names)."""
    import importlib

    return importlib.import_module(f"bus_kernels.ops.{name}")


def _backends(op_implemented) -> list[str]:
    import bus_kernels as bk

    cands = ("cpu", "torch") if _SMOKE else ("triton", "cuda", "torch")
    return [b for b in cands if b in op_implemented and b in bk.available_backends()]


def _grad_fn(make_out, inputs):
    """A closure timing only the backward: the forward graph is rebuilt outside the timed call."""
    torch = _torch()
    out = make_out()
    g = torch.randn_like(out)

    def bwd():
        for t in inputs:
            t.grad = None
        out.backward(g, retain_graph=True)

    return bwd


def bench(out_dir: Path, quick: bool = False) -> list[dict]:
    torch = _torch()
    import torch.nn.functional as F

    import bus_kernels as bk
    rel_op, sel_op, va_op = (_ops_module(m) for m in ("relevance", "select", "varlen_attention"))

    dev, dt = torch.device("cpu" if _SMOKE else "cuda"), torch.bfloat16
    B, D, H, d, P = MISSION["B"], MISSION["D"], MISSION["H"], MISSION["d"], MISSION["prefix"]
    if _SMOKE:
        B = 2
    es = torch.finfo(dt).bits // 8
    ceil = _ceilings(dev)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    rows: list[dict] = []

    def add(r):
        rows.append(r)
        extra = "".join(f" {k}={r[k]:.1f}" for k in ("GBps", "pct_copy", "TFLOPs") if k in r)
        print(f"{r['op']:<22} {r['impl']:<18} {r['shape']:<22} {r['mode']:<4} {r['ms']:8.3f} ms{extra}", flush=True)

    for N in MISSION["tokens"][-1:] if quick else MISSION["tokens"]:
        n = N - P
        # relevance_scores: reads k (and q), writes [B, n] fp32; one QK^T of work forward.
        for T in MISSION["text"]:
            q, k, mask = relevance_inputs(B, N, T, dt, dev)
            shape = f"B{B} N{N} T{T} H{H} d{d}"
            kb, qb = B * H * n * d * es, B * H * T * d * es
            for be in _backends(rel_op.IMPLEMENTED):
                fn = lambda: bk.relevance_scores(q, k, q_mask=mask, backend=be)  # noqa: E731
                add(_row("relevance_scores", be, shape, "fwd", _do_bench(fn), kb + qb + B * n * 4,
                         2 * B * H * T * n * d, ceil))
                qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
                bwd = _grad_fn(lambda: bk.relevance_scores(qg, kg, q_mask=mask, backend=be), (qg, kg))
                add(_row("relevance_scores", be, shape, "bwd", _do_bench(bwd), 2 * (kb + qb) + B * n * 4,
                         3 * 2 * B * H * T * n * d, ceil))
        # select_tokens (fixed keep, fuse="sum"): reads x and scores, writes P + keep + 1 rows.
        x, scores = select_inputs(B, N, dt, dev)
        keep = math.ceil(MISSION["keep"] * n)
        shape = f"B{B} N{N} D{D} keep{keep}"
        rows_out = P + keep + 1
        fwd_bytes = B * N * D * es + B * n * 4 + B * rows_out * D * es
        for be in _backends(sel_op.IMPLEMENTED):
            fn = lambda: bk.select_tokens(x, scores, keep, num_prefix=P, backend=be)  # noqa: E731
            add(_row("select_tokens", be, shape, "fwd", _do_bench(fn), fwd_bytes, None, ceil))
            xg, sg = x.detach().requires_grad_(), scores.detach().requires_grad_()
            bwd = _grad_fn(lambda: bk.select_tokens(xg, sg, keep, num_prefix=P, backend=be).tokens, (xg, sg))
            add(_row("select_tokens", be, shape, "bwd", _do_bench(bwd), B * rows_out * D * es + 2 * B * N * D * es, None, ceil))
            fnv = lambda: bk.select_tokens_varlen(x, scores, mass=MISSION["mass"], num_prefix=P, backend=be)  # noqa: E731
            add(_row("select_tokens_varlen", be, f"B{B} N{N} D{D} mass0.8", "fwd", _do_bench(fnv), fwd_bytes, None, ceil))
        # varlen_attention on the packed tokens after a keep-0.7 selection, with log(size) key bias.
        lengths, cu, max_len = packed_lengths(B, N, dev)
        total = int(cu[-1])
        qkv = torch.randn(total, 3, H, d, device=dev, dtype=dt)
        q, k, v = qkv.unbind(1)
        bias = torch.rand(total, device=dev).add(1).log().to(dt)
        shape = f"B{B} N{N}->L~{int(lengths.float().mean())} H{H} d{d}"
        sq = float((lengths.double() ** 2).sum())
        flops = 4 * sq * H * d
        io = 4 * total * H * d * es
        for be in _backends(va_op.IMPLEMENTED):
            fn = lambda: bk.varlen_attention(q, k, v, cu, max_len, key_bias=bias, backend=be)  # noqa: E731
            add(_row("varlen_attention", be, shape, "fwd", _do_bench(fn), io, flops, ceil))
            qkvg = qkv.detach().requires_grad_()
            qg, kg, vg = qkvg.unbind(1)
            bwd = _grad_fn(lambda: bk.varlen_attention(qg, kg, vg, cu, max_len, key_bias=bias, backend=be), (qkvg,))
            add(_row("varlen_attention", be, shape, "bwd", _do_bench(bwd), 2 * io, 2.5 * flops, ceil))
        # The alternatives: padded SDPA (no mask: its cheapest form; with the key-padding+bias
        # mask: what a correct padded model runs) and torch's own varlen attention.
        qp, kp, vp = (_pad(t, cu, max_len) for t in (q, k, v))
        pad_flops = 4 * B * max_len**2 * H * d
        add(_row("varlen_attention", "sdpa-padded", shape, "fwd",
                 _do_bench(lambda: F.scaled_dot_product_attention(qp, kp, vp)), io, flops, ceil))
        am = _pad_bias(bias, cu, max_len, dt)
        add(_row("varlen_attention", "sdpa-padded+mask", shape, "fwd",
                 _do_bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=am)), io, flops, ceil))
        qpg, kpg, vpg = (t.detach().requires_grad_() for t in (qp, kp, vp))
        bwd = _grad_fn(lambda: F.scaled_dot_product_attention(qpg, kpg, vpg, attn_mask=am), (qpg, kpg, vpg))
        add(_row("varlen_attention", "sdpa-padded+mask", shape, "bwd", _do_bench(bwd), 2 * io, 2.5 * flops, ceil))
        rows[-1]["padded_flops"] = pad_flops
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None:
            try:
                fn = lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len)  # noqa: E731
                add(_row("varlen_attention", "torch.varlen_attn", shape, "fwd", _do_bench(fn), io, flops, ceil))
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                bwd = _grad_fn(lambda: varlen_attn(qg, kg, vg, cu, cu, max_len, max_len), (qg, kg, vg))
                add(_row("varlen_attention", "torch.varlen_attn", shape, "bwd", _do_bench(bwd), 2 * io, 2.5 * flops, ceil))
            except Exception as exc:  # not every build has its kernel (flash/cuDNN)
                print(f"torch.nn.attention.varlen.varlen_attn: {type(exc).__name__}: {exc}"[:300], flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "gpu": "CPU smoke run" if _SMOKE else torch.cuda.get_device_name(), "ceilings": ceil,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def _pad(t, cu, max_len):
    """[total, H, d] -> [B, H, max_len, d] zero-padded (the layout padded SDPA needs)."""
    torch = _torch()
    B = cu.numel() - 1
    out = t.new_zeros(B, max_len, *t.shape[1:])
    lengths = (cu[1:] - cu[:-1]).long()
    rows = torch.arange(max_len, device=t.device)[None, :] < lengths[:, None]
    out[rows] = t
    return out.transpose(1, 2)


def _pad_bias(bias, cu, max_len, dtype):
    """Additive mask [B, 1, 1, max_len]: the key bias on real keys, -inf on padding."""
    torch = _torch()
    B = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()
    rows = torch.arange(max_len, device=bias.device)[None, :] < lengths[:, None]
    m = torch.full((B, max_len), float("-inf"), device=bias.device, dtype=dtype)
    m[rows] = bias.to(dtype)
    return m[:, None, None, :]


# ------------------------------------------------------------------------------------- syncs
class SyncCounter:
    """Counts the synchronising CUDA calls torch reports under set_sync_debug_mode("warn")."""

    def __enter__(self):
        torch = _torch()
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch = _torch()
        torch.cuda.set_sync_debug_mode("default")
        self._cm.__exit__(*exc)
        return False

    @property
    def count(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self.caught)


def count_syncs(out_dir: Path | None) -> bool:
    """Host syncs per call of each op (forward, backward) on each GPU backend; True when all are
    within issue 13's budgets."""
    torch = _torch()
    import bus_kernels as bk

    dev, dt = torch.device("cuda"), torch.bfloat16
    B, N, P = 8, 197, MISSION["prefix"]
    q, k, mask = relevance_inputs(B, N, 32, dt, dev)
    x, scores = select_inputs(B, N, dt, dev)
    lengths, cu, max_len = packed_lengths(B, N, dev)
    total = int(cu[-1])
    qkv = torch.randn(total, 3, MISSION["H"], MISSION["d"], device=dev, dtype=dt)
    keep_t = torch.full((B,), 100, device=dev, dtype=torch.int64)
    xp = torch.randn(total, MISSION["D"], device=dev, dtype=dt)
    leaf = lambda t, g: t.detach().requires_grad_(g)  # noqa: E731
    cases = {
        "relevance_scores": (lambda be, g: bk.relevance_scores(leaf(q, g), k, q_mask=mask, backend=be), "relevance_scores"),
        "select_tokens": (lambda be, g: bk.select_tokens(leaf(x, g), scores, 130, num_prefix=P, backend=be).tokens,
                          "select_tokens"),
        "select_tokens_varlen(mass)": (lambda be, g: bk.select_tokens_varlen(
            leaf(x, g), scores, mass=0.8, num_prefix=P, backend=be).tokens, "select_tokens_varlen"),
        "select_tokens_varlen(keep)": (lambda be, g: bk.select_tokens_varlen(
            leaf(x, g), scores, keep=keep_t, num_prefix=P, backend=be).tokens, "select_tokens_varlen"),
        "varlen_attention": (lambda be, g: bk.varlen_attention(*leaf(qkv, g).unbind(1), cu, max_len, backend=be),
                             "varlen_attention"),
        "pack": (lambda be, g: bk.pack(leaf(x, g), lengths.clamp(max=N), backend=be).packed, "pack"),
        "unpack": (lambda be, g: bk.unpack(leaf(xp, g), cu, max_len, backend=be), "pack"),
    }
    ok, rows = True, []
    for name, (fn, op) in cases.items():
        impl = _ops_module(_OP_MODULE[op]).IMPLEMENTED
        for be in [b for b in ("triton", "cuda") if b in impl and b in bk.available_backends()]:
            try:
                fn(be, True).sum().backward()  # warm-up: compile, allocator
                torch.cuda.synchronize()
                with SyncCounter() as c_fwd:
                    out = fn(be, True)
                with SyncCounter() as c_bwd:
                    out.backward(torch.ones_like(out))
                fwd, bwd = c_fwd.count, c_bwd.count
                err = ""
            except Exception as exc:  # reported per row; the stage fails
                fwd = bwd = -1
                err = f"{type(exc).__name__}: {exc}"[:200]
            within = fwd >= 0 and fwd + bwd <= BUDGET[name]
            ok &= within
            rows.append({"op": name, "backend": be, "fwd": fwd, "bwd": bwd, "budget": BUDGET[name],
                         "ok": within, "error": err})
            status = "ok" if within else "OVER" if fwd >= 0 else "ERROR"
            print(f"syncs {name:<28} {be:<7} fwd {fwd:3d} bwd {bwd:3d} budget {BUDGET[name]}  {status} {err}", flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "syncs.json").write_text(json.dumps(rows, indent=1))
    return ok


_OP_MODULE = {"relevance_scores": "relevance", "select_tokens": "select", "select_tokens_varlen": "select_varlen",
              "varlen_attention": "varlen_attention", "pack": "pack"}


# ---------------------------------------------------------------------------------- sanitize
def sanitize() -> None:
    """Every op, forward and backward, on every GPU backend at small odd shapes (fast under
    compute-sanitizer): memcheck finds out-of-bounds and misaligned accesses, racecheck shared
    memory hazards. Values are not checked here (the test suite does that)."""
    torch = _torch()
    import bus_kernels as bk

    dev = torch.device("cuda")
    for dt in (torch.bfloat16, torch.float32):
        B, N, P, D, H, d = 3, 37, 1, 48, 2, 40
        q, k, mask = relevance_inputs(B, N, 5, dt, dev, H=H, d=d)
        x, scores = select_inputs(B, N, dt, dev, D=D)
        lengths, cu, max_len = packed_lengths(B, N, dev)
        total = int(cu[-1])
        for be in ("triton", "cuda"):
            if be not in bk.available_backends():
                continue
            q.requires_grad_(), x.requires_grad_()
            for name, fn in (
                ("relevance_scores", lambda: bk.relevance_scores(q, k, q_mask=mask, backend=be)),
                ("select_tokens", lambda: bk.select_tokens(x, scores, 17, num_prefix=P, backend=be).tokens),
                ("select_tokens_varlen", lambda: bk.select_tokens_varlen(x, scores, mass=0.8, num_prefix=P, backend=be).tokens),
                ("varlen_attention", lambda: bk.varlen_attention(
                    *torch.randn(total, 3, H, d, device=dev, dtype=dt, requires_grad=True).unbind(1), cu, max_len,
                    key_bias=torch.randn(total, device=dev, dtype=dt), backend=be)),
                ("pack", lambda: bk.pack(x, lengths.clamp(max=N), backend=be).packed),
            ):
                try:
                    out = fn()
                    out.backward(torch.randn_like(out))
                    torch.cuda.synchronize()
                    print(f"sanitize {name} {be} {dt}: ran", flush=True)
                except (RuntimeError, NotImplementedError) as exc:
                    msg = str(exc).splitlines()[0][:160]
                    if "has no kernel" in msg or "not available" in msg:
                        continue
                    print(f"sanitize {name} {be} {dt}: {type(exc).__name__}: {msg}", flush=True)
                    raise


# ----------------------------------------------------------------------------------- summary
def summary(out_dir: Path) -> None:
    """The last thing gpu_check.sh prints: stage results, then the headline figures."""
    stages = out_dir / "stages.tsv"
    print("\n================ gpu_check summary ================")
    if stages.exists():
        print(f"{'stage':<12} {'status':<9} {'seconds':>7}  note")
        for line in stages.read_text().splitlines():
            name, status, secs, *note = line.split("\t") + [""]
            print(f"{name:<12} {status:<9} {secs:>7}  {note[0]}")
    sy = out_dir / "syncs.json"
    if sy.exists():
        over = [f"{r['op']}/{r['backend']} {r['fwd']}+{r['bwd']}" for r in json.loads(sy.read_text()) if not r["ok"]]
        print("host syncs: " + ("all within budget" if not over else "OVER budget: " + ", ".join(over)))
    bj = out_dir / "bench.json"
    if bj.exists():
        data = json.loads(bj.read_text())
        c = data["meta"]["ceilings"]
        print(f"{data['meta']['gpu']}  torch {data['meta']['torch']}  triton {data['meta'].get('triton')}  "
              f"copy {c['copy_GBps']:.0f} GB/s  bf16 mm {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
        print(f"{'op':<22} {'impl':<18} {'shape':<24} {'mode':<4} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8}")
        for r in data["rows"]:
            print(f"{r['op']:<22} {r['impl']:<18} {r['shape']:<24} {r['mode']:<4} {r['ms']:8.3f} "
                  f"{r.get('GBps', float('nan')):7.0f} {r.get('pct_copy', float('nan')):6.1f} {r.get('TFLOPs', float('nan')):8.1f}")
        _ratios(data["rows"])
    e2e = out_dir / "e2e.json"
    if e2e.exists():
        for b in json.loads(e2e.read_text()).get("benchmarks", []):
            inter = b.get("extra_info", {}).get("interleaved")
            if inter:
                med = {k: sorted(v)[len(v) // 2] for k, v in inter.items() if v}
                line = "  ".join(f"{k} {1e3 * t:.1f} ms" for k, t in med.items())
                if len(med) == 2:
                    a, b2 = list(med.values())
                    line += f"  speedup {a / b2:.2f}x"
                print(f"e2e train step B64 bf16 (median, interleaved): {line}")


def _ratios(rows) -> None:
    """varlen attention: ours vs the alternatives (issue 13 targets: >= 0.9x the best installed
    varlen kernel, >= 1.3x padded SDPA), forward, per shape."""
    by = {}
    for r in rows:
        if r["op"] == "varlen_attention" and r["mode"] == "fwd":
            by.setdefault(r["shape"], {})[r["impl"]] = r["ms"]
    for shape, t in by.items():
        ours = min((t[b], b) for b in ("triton", "cuda") if b in t) if any(b in t for b in ("triton", "cuda")) else None
        if ours is None:
            continue
        parts = [f"{alt} {t[alt] / ours[0]:.2f}x" for alt in ("sdpa-padded", "sdpa-padded+mask", "torch.varlen_attn") if alt in t]
        print(f"varlen_attention {shape}: {ours[1]} is " + ", ".join(parts) + " faster (>1 = ours faster)")


# -------------------------------------------------------------------------------------- plan
def plan() -> None:
    """What bench and syncs would run; imports the library (no GPU needed)."""
    import bus_kernels as bk

    print("gpu_bench plan:", json.dumps(MISSION))
    print("  backends here:", bk.available_backends(), "(on the GPU: triton, cuda, torch)")
    print("  bench: relevance_scores fwd/bwd x N x T; select_tokens fwd/bwd; select_tokens_varlen fwd;"
          " varlen_attention fwd/bwd vs sdpa-padded(+mask), torch.varlen_attn")
    print("  syncs budgets:", json.dumps(BUDGET))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("bench", "syncs", "sanitize", "summary", "plan"))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    p.add_argument("--quick", action="store_true", help="bench: only N=577")
    p.add_argument("--smoke", action="store_true", help="bench on CPU at batch 2 (tests that the code runs)")
    a = p.parse_args(argv)
    global _SMOKE
    _SMOKE = a.smoke
    out = Path(a.out)
    if a.what == "plan":
        plan()
        return 0
    if a.what == "summary":
        summary(out)
        return 0
    torch = _torch()
    if a.what == "bench" and a.smoke:
        bench(out, a.quick)
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_bench {a.what}: needs a CUDA GPU", file=sys.stderr)
        return 2
    if a.what == "bench":
        bench(out, a.quick)
        return 0
    if a.what == "syncs":
        return 0 if count_syncs(out) else 1
    sanitize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
