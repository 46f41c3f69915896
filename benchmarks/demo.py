"""Runs every op once per available backend at ViT-like sizes and prints shapes and timings.

    python benchmarks/demo.py [--device cuda] [--batch 8]

Timings are medians of torch.utils.benchmark (CUDA-synchronised on GPU). On CPU they are CPU
timings, and the Triton interpreter is never used here.
"""
from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter is for tests, not for timings

import torch  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402

import bus_kernels as bk  # noqa: E402


def timeit(fn) -> float:
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, N, D, H, d, T = args.batch, 197, 384, 6, 64, 16
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    x, q, k = rnd(B, N, D), rnd(B, H, T, d), rnd(B, H, N - 1, d)
    q_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    print(f"bus-kernels {bk.__version__} | torch {torch.__version__} | device {dev} | dtype {dtype}")
    print(f"available backends: {bk.available_backends()}  (B={B}, N={N}, D={D}, H={H}, d={d}, T={T})\n")
    backends = [b for b in bk.available_backends() if b != "triton" or dev.type == "cuda"]
    scores = bk.relevance_scores(q, k, q_mask=q_mask)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    packed, cu, max_len = bk.pack(x, lengths)
    qa = packed.reshape(-1, H, D // H).contiguous()

    cases = {
        "relevance_scores": lambda be: bk.relevance_scores(q, k, q_mask=q_mask, backend=be),
        "select_tokens": lambda be: bk.select_tokens(x, scores, 0.7, backend=be).tokens,
        "select_tokens_varlen": lambda be: bk.select_tokens_varlen(x, scores, mass=0.7, backend=be).tokens,
        "varlen_attention": lambda be: bk.varlen_attention(qa, qa, qa, cu, max_len, backend=be),
        "pack": lambda be: bk.pack(x, lengths, backend=be).packed,
        "unpack": lambda be: bk.unpack(packed, cu, N, backend=be),
    }
    print(f"{'op':<22}{'backend':<9}{'output shape':<22}{'ms':>9}")
    for name, fn in cases.items():
        for be in backends:
            try:
                out = fn(be)
            except RuntimeError as exc:  # this backend has no kernel for the op yet
                if "has no kernel" in str(exc):
                    continue
                raise
            print(f"{name:<22}{be:<9}{str(tuple(out.shape)):<22}{timeit(lambda: fn(be)):>9.3f}")


if __name__ == "__main__":
    main()
