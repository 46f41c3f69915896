"""Compiles the Triton kernels that run at the mission shapes exactly as the JIT compiles them, for
sm_80 and sm_90, without a GPU, and reports registers, spills and shared memory per launch.

What "exactly" means. At run time ``JITFunction.run`` binds a launch's arguments with a binder
made by ``triton.runtime.jit.create_function_from_signature``: pointers whose address is a multiple
of 16 bytes and ints divisible by 16 get the ``tt.divisibility = 16`` attribute, ints equal to 1
become constants, then ``_pack_args`` turns that into ``(signature, constexprs, attrs)`` for
``ASTSource``. A check that builds ``ASTSource(fn, signature, constexprs)`` by hand compiles another
kernel (no vectorised or ``cp.async`` loads, different register allocation, shared memory
under-reported up to 2x). So this check never writes a signature:

1. it calls each public op, forward and backward, with ``backend="triton"`` on CPU tensors laid
   out as ``bus`` lays them out at the mission shapes (B=64, N=197/577 tokens, D=768, H=768/d),
   with ``JITFunction.run`` replaced by a recorder: the launchers choose tiles, warps and stages
   exactly as on a GPU, and each launch's ``(kernel, args, kwargs)`` is kept (kernel outputs stay
   unwritten; no host code reads them). ``select``'s grid sizing reads the SM count, which is set
   to the target's (108 on A100, 132 on H100/H200);
2. each launch is bound by the JIT's own binder for the target and packed by the JIT's own
   ``_pack_args`` (the two steps of ``JITFunction.run``), then ``triton.compile`` builds it for
   ``GPUTarget("cuda", cc, 32)``: the same cubin as on the device. Launches with the same
   specialisation are compiled once, as the JIT caches them; Triton's on-disk cache
   (``TRITON_CACHE_DIR``) makes a second run cheap;
3. per launch: registers and stack frame from ``cuobjdump -res-usage`` on the cubin (the stack
   frame is what ptxas spills to; Triton's ``n_spills`` is that local size / 4) and shared memory
   from the kernel's metadata.

Usage (needs no GPU, but real kernels: TRITON_INTERPRET must be unset)::

    python tests/triton_compile_check.py [--cc 80 90] [--ops relevance select varlen] [--json OUT]

prints one line per case and launch and exits 1 when a case breaks a limit (no spills, shared
memory within the target's opt-in limit). ``tests/test_triton_compile.py`` runs it once and
asserts per case.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

# Opt-in shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SM_COUNT = {80: 108, 90: 132}
CCS = (80, 90)
# A compile (mostly ptxas) slower than this counts as a failure: such a kernel also costs the GPU
# session its minutes at first launch, and one pathological case must not stall CI.
COMPILE_TIMEOUT_S = int(os.environ.get("BUS_COMPILE_TIMEOUT_S", "20"))

# Mission shapes: ViT-B/16 at 224 px (197 tokens) and 384 px (577), batch 64, width 768, one
# class token; text of 1 ([CLS]) to 256 tokens.
BATCH, WIDTH, PREFIX = 64, 768, 1
TOKENS = (197, 577)
HEAD_DIMS = (64, 128, 256)
TEXT_LENS = (1, 32, 256)
DTYPES = ("fp32", "fp16", "bf16")
OPS = ("relevance", "select", "varlen")


class Case(NamedTuple):
    """One workload: an op at one shape and dtype (d and T only where the op depends on them)."""

    op: str
    dtype: str
    N: int
    d: int = 0
    T: int = 0

    @property
    def name(self) -> str:
        extra = (f"-d{self.d}" if self.d else "") + (f"-T{self.T}" if self.T else "")
        return f"{self.op}-{self.dtype}-N{self.N}{extra}"


def cases(ops=OPS) -> list[Case]:
    """Every workload of the check, per dtype: relevance at N=577 for every d x T and at N=197 for
    d=64 (ViT-B/16 at 224 px; N only changes whether the JIT sees N divisible by 16); select at
    both N (its kernels see D=768 and N, not d or T); varlen attention at N=577 for every d and at
    N=197 for d=64."""
    out = []
    for dtype in DTYPES:
        for N in TOKENS:
            dims = HEAD_DIMS if N == max(TOKENS) else (64,)
            if "relevance" in ops:
                out += [Case("relevance", dtype, N, d, T) for d in dims for T in TEXT_LENS]
            if "select" in ops:
                out.append(Case("select", dtype, N))
            if "varlen" in ops:
                out += [Case("varlen", dtype, N, d) for d in dims]
    return out


# ------------------------------------------------------------------------------ the workloads
def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


_DEVICE = "cpu"  # "cuda" in --verify-runtime: the same workloads really run


def _new(*shape, dtype, requires_grad=False):
    """Values do not matter when nothing runs, and torch.empty costs nothing at B=64; on a GPU the
    kernels really run, on random data."""
    import torch

    make = torch.empty if _DEVICE == "cpu" else torch.randn
    return make(*shape, dtype=dtype, device=_DEVICE, requires_grad=requires_grad)


def _run_relevance(case: Case) -> None:
    """Forward and backward of relevance_scores as TSPS calls it: k a view of the fused qkv output
    without the prefix token, q [B, H, T, d] from a [B, T, H*d] projection, a q_mask for T > 1."""
    import torch

    import bus_kernels as bk

    dt, B, H, d, T, N = _torch_dtype(case.dtype), BATCH, WIDTH // case.d, case.d, case.T, case.N
    qkv = _new(B, N, 3, H, d, dtype=dt).permute(2, 0, 3, 1, 4)
    k = qkv[1][:, :, PREFIX:].requires_grad_(True)
    q = _new(B, T, H, d, dtype=dt).transpose(1, 2).requires_grad_(True)
    mask = None
    if T > 1:
        mask = torch.rand(B, T, device=_DEVICE) < 0.8
        mask[:, 0] = True
    s = bk.relevance_scores(q, k, scale=d**-0.5, q_mask=mask, backend="triton")
    s.backward(torch.ones_like(s))


def _select_inputs(case: Case):
    import torch

    dt, B, N = _torch_dtype(case.dtype), BATCH, case.N
    x = _new(B, N, WIDTH, dtype=dt, requires_grad=True)
    scores = torch.rand(B, N - PREFIX, device=_DEVICE).softmax(dim=1).requires_grad_(True)
    return x, scores


def _run_select(case: Case) -> None:
    """select_tokens (fixed keep 0.7, fuse="sum") and select_tokens_varlen (mass 0.8), forward and
    backward, as TSPS calls them; scores are fp32 like relevance_scores' output."""
    import torch

    import bus_kernels as bk

    x, scores = _select_inputs(case)
    keep = math.ceil(0.7 * (case.N - PREFIX))
    sel = bk.select_tokens(x, scores, keep, num_prefix=PREFIX, fuse="sum", backend="triton")
    sel.tokens.backward(torch.ones_like(sel.tokens))
    x, scores = _select_inputs(case)
    sel = bk.select_tokens_varlen(x, scores, mass=0.8, min_keep=1, num_prefix=PREFIX, fuse="sum", backend="triton")
    sel.tokens.backward(torch.ones_like(sel.tokens))


def _run_varlen(case: Case) -> None:
    """varlen_attention forward and backward on packed tokens as TSPS runs it: q, k, v views of one
    fused qkv output [total, 3, H, d], with the proportional key bias log(size) in q's dtype that
    every packed block gets (TSPS has fused tokens by then); then causal without a bias."""
    import torch

    import bus_kernels as bk

    dt, B, H, d = _torch_dtype(case.dtype), BATCH, WIDTH // case.d, case.d
    gen = torch.Generator().manual_seed(case.N * 1000 + case.d)
    n = case.N - PREFIX
    lengths = PREFIX + 1 + torch.randint(int(0.3 * n), int(0.9 * n) + 1, (B,), generator=gen)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    total, max_seqlen = int(cu[-1]), int(lengths.max())
    cu = cu.to(_DEVICE)
    qkv = _new(total, 3, H, d, dtype=dt, requires_grad=True)
    q, k, v = qkv.unbind(1)
    bias = torch.rand(total, device=_DEVICE).add(1).log().to(dt)
    out = bk.varlen_attention(q, k, v, cu, max_seqlen, scale=d**-0.5, key_bias=bias, backend="triton")
    out.backward(torch.ones_like(out))
    # key_bias and causal are compile-time constants of the kernels: the other variant the library
    # offers (causal, no bias: a text decoder's self-attention) is its own compilation.
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = bk.varlen_attention(q, k, v, cu, max_seqlen, scale=d**-0.5, causal=True, backend="triton")
    out.backward(torch.ones_like(out))


RUNNERS: dict[str, Callable[[Case], None]] = {
    "relevance": _run_relevance, "select": _run_select, "varlen": _run_varlen,
}


# ---------------------------------------------------------------------------- recording launches
class Launch(NamedTuple):
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording(cc: int) -> Iterator[list[Launch]]:
    """Within: Triton launches are recorded instead of run, the ops accept backend="triton" on CPU
    tensors (their launchers then run unchanged) and the SM count is sm_``cc``'s."""
    from triton.runtime.jit import JITFunction

    from bus_kernels import _backend
    import bus_kernels.triton.select as tselect

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))
        return None

    real_resolve = _backend.resolve

    def resolve(op, requested, device, implemented, *rest, **kw):
        if requested == "triton":
            return "triton"
        return real_resolve(op, requested, device, implemented, *rest, **kw)

    saved = [(JITFunction, "run", JITFunction.run), (_backend, "resolve", real_resolve)]
    JITFunction.run = record
    _backend.resolve = resolve
    if hasattr(tselect, "_target_programs"):  # grid sizing by SM count (4 waves)
        saved.append((tselect, "_target_programs", tselect._target_programs))
        tselect._target_programs = lambda device: 4 * SM_COUNT[cc]
    try:
        yield launches
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def record_case(case: Case, cc: int) -> list[Launch]:
    import torch

    torch.manual_seed(zlib.crc32(case.name.encode()))
    with recording(cc) as launches:
        RUNNERS[case.op](case)
    return launches


# ----------------------------------------------------------------------------------- compiling
def _cuobjdump() -> str:
    import triton

    try:
        return triton.knobs.nvidia.cuobjdump.path
    except Exception:  # older triton: the binary ships next to ptxas
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes, tmpdir: Path) -> dict:
    """{"regs", "stack", "local"} of the one function in ``cubin`` (cuobjdump -res-usage)."""
    path = tmpdir / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([_cuobjdump(), "-res-usage", str(path)], check=True, capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {out!r}")
    return {"regs": int(m[1]), "stack": int(m[2]), "local": int(m[4])}


def _compile_isolated(build: Callable[[], dict], seconds: int) -> dict:
    """``build()`` in a forked child (own process group) killed after ``seconds``: a compile that
    hangs in LLVM or ptxas costs at most that. Returns build's dict, or {"error": ...}."""
    import select
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, report, leave without running the parent's atexit handlers
        os.close(r)
        os.setpgid(0, 0)
        try:
            out = build()
        except BaseException as exc:  # noqa: BLE001 - any failure is the case's result
            out = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # the child and its ptxas
                return {"error": f"CompileTimeout: compile took more than {seconds} s (BUS_COMPILE_TIMEOUT_S)"}
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        return {"error": "compile process died without a result"}
    return json.loads(b"".join(chunks))


class Compiler:
    """Compiles launches as ``JITFunction.run`` would on a device of capability ``cc``, once per
    specialisation (the JIT's cache key), and keeps the resource figures."""

    def __init__(self, tmpdir: Path):
        self.tmpdir = tmpdir
        self.done: dict[tuple, dict] = {}
        self.compile_s = 0.0

    def compile(self, launch: Launch, cc: int) -> dict:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        kernel, kwargs = launch.kernel, dict(launch.kwargs)
        # As JITFunction.run: these two options come from the kernel and the knobs.
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        if hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*launch.args, **kwargs)
        key = (kernel.fn.__qualname__, cc, str(specialization), str(sorted(options.items())))
        if key in self.done:
            return self.done[key]
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
        names = kernel.arg_names
        rec = {
            "kernel": kernel.fn.__name__,
            "cc": cc,
            "constexprs": {names[k[0]]: str(v) for k, v in constexprs.items() if kernel.params[k[0]].is_constexpr},
            # runtime ints the JIT turned into constants (== 1) and args it marked 16-divisible
            "ones": [names[k[0]] for k in constexprs if not kernel.params[k[0]].is_constexpr],
            "divisible16": [names[k[0]] for k, v in attrs.items() if "tt.divisibility" in str(v)],
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
        }
        tmpdir = self.tmpdir

        def build() -> dict:
            src = ASTSource(kernel, signature, constexprs, attrs)
            compiled = triton.compile(src, target=target, options=options.__dict__)
            out = {"shared": int(compiled.metadata.shared), "hash": compiled.hash, "error": None}
            out.update(resource_usage(compiled.asm["cubin"], tmpdir))
            return out

        t0 = time.perf_counter()
        rec.update(_compile_isolated(build, COMPILE_TIMEOUT_S))
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.compile_s += rec["seconds"]
        self.done[key] = rec
        return rec


def problems(rec: dict) -> list[str]:
    """What is wrong with one compiled launch: a compile error, spills, too much shared memory."""
    if rec["error"]:
        return [f"compile error: {rec['error']}"]
    out = []
    spill = rec["stack"] + rec["local"]
    if spill:
        out.append(f"spills: {rec['regs']} registers + {spill} B stack/local per thread")
    if rec["shared"] > SMEM_LIMIT[rec["cc"]]:
        out.append(f"shared memory {rec['shared']} B > sm_{rec['cc']} limit {SMEM_LIMIT[rec['cc']]} B")
    return out


def describe(rec: dict) -> str:
    consts = ",".join(f"{k}={v}" for k, v in rec["constexprs"].items())
    res = "ERROR" if rec["error"] else f"regs={rec['regs']} stack={rec['stack']} smem={rec['shared']}"
    return f"{rec['kernel']}[{consts}] w{rec['num_warps']}s{rec['num_stages']}: {res} ({rec['seconds']}s)"


def _value_checks_off() -> None:
    """As on CUDA by default: the recorded inputs are uninitialised (torch.empty: nothing runs)."""
    import bus_kernels

    if hasattr(bus_kernels, "set_value_checks"):
        bus_kernels.set_value_checks(False)


def run_check(selected: list[Case], ccs=CCS, log=print) -> dict:
    """{case name: {"sm_80": [launch records], ...}} for every selected case."""
    import tempfile

    import torch

    torch.set_num_threads(1)  # host work is tiny next to the compiles; keep CI's 2nd core free
    _value_checks_off()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        compiler = Compiler(Path(tmp))
        for case in selected:
            results[case.name] = {}
            for cc in ccs:
                try:
                    recs = [compiler.compile(launch, cc) for launch in record_case(case, cc)]
                except Exception as exc:  # the op itself failed on the host: this case fails, not the run
                    recs = [{"kernel": "(recording the launches)", "cc": cc, "constexprs": {}, "ones": [],
                             "divisible16": ["-"], "num_warps": 0, "num_stages": 0, "seconds": 0,
                             "error": f"{type(exc).__name__}: {exc}"}]
                results[case.name][f"sm_{cc}"] = recs
                bad = [p for r in recs for p in problems(r)]
                log(f"{case.name} sm_{cc}: {len(recs)} launches, {'FAIL' if bad else 'ok'}")
                for r in recs:
                    log(f"    {describe(r)}" + "".join(f"\n      !! {p}" for p in problems(r)))
        log(f"compiled {len(compiler.done)} distinct kernels in {compiler.compile_s:.0f} s")
    return results


def verify_runtime(selected: list[Case], log=print) -> bool:
    """On a GPU: the check's kernels are the runtime's. Runs each workload for real (CUDA tensors,
    random data) and asserts that every kernel the JIT built has the hash (source, specialisation,
    options, target) of one this check compiled for the same launches; prints the runtime's
    registers and spills next to the check's."""
    import tempfile

    import torch

    global _DEVICE
    major, minor = torch.cuda.get_device_capability()
    cc, dev = 10 * major + minor, torch.cuda.current_device()
    _value_checks_off()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        compiler = Compiler(Path(tmp))
        for case in selected:
            launches = record_case(case, cc)
            predicted = {r.get("hash"): r for r in (compiler.compile(la, cc) for la in launches)}
            _DEVICE = "cuda"
            try:
                torch.manual_seed(0)
                RUNNERS[case.op](case)
                torch.cuda.synchronize()
            except Exception as exc:  # e.g. a kernel that does not compile: reported, next case
                ok = False
                log(f"{case.name}: the workload failed on the GPU: {type(exc).__name__}: {str(exc)[:300]}")
            finally:
                _DEVICE = "cpu"
            for kernel in {id(la.kernel): la.kernel for la in launches}.values():
                for ck in kernel.device_caches[dev][0].values():
                    ck._init_handles()
                    r = predicted.get(ck.hash)
                    name = ck.metadata.name
                    if r is None:
                        ok = False
                        log(f"{case.name}: runtime kernel {name} {ck.hash[:12]} (regs={ck.n_regs} spills={ck.n_spills}) "
                            "was NOT compiled by the check")
                    else:
                        log(f"{case.name}: {name} same kernel as the check; runtime regs={ck.n_regs} "
                            f"spills={ck.n_spills} smem={ck.metadata.shared}, check regs={r['regs']} stack={r['stack']}")
    return ok


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("triton_compile_check: unset TRITON_INTERPRET (compile checks need real kernels)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's bus_kernels
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cc", type=int, nargs="+", default=list(CCS), choices=list(CCS))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--only", nargs="+", default=[""], help="substrings of the case names to run (e.g. bf16-N577)")
    p.add_argument("--json", help="write {case: {sm_cc: [launch records]}} here")
    p.add_argument("--verify-runtime", action="store_true",
                   help="on a GPU: run the workloads and check that the JIT built the same kernels")
    a = p.parse_args(argv)
    selected = [c for c in cases(a.ops) if any(o in c.name for o in a.only)]
    if a.verify_runtime:
        ok = verify_runtime(selected, log=lambda s: print(s, flush=True))
        print(f"triton_compile_check --verify-runtime: {'ok' if ok else 'MISMATCH'}", flush=True)
        return 0 if ok else 1
    t0 = time.perf_counter()
    results = run_check(selected, tuple(a.cc), log=lambda s: print(s, flush=True))
    print(f"triton_compile_check: {len(selected)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    failed = any(problems(r) for per_cc in results.values() for recs in per_cc.values() for r in recs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
