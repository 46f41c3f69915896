"""Kernel benchmarks: every op, every available backend, against the reference and against the
best alternative installed (torch.topk + gather; SDPA over the padded batch; torch's varlen
attention and flash-attn when present). Shapes follow the kernel issues: ViT widths, bf16 on GPU
(B = 256); on CPU fp32 and bf16 at B = 64, N = 197 and 577.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import bus_kernels as bk
from conftest import DEVICE, ON_GPU, fused_backends, run

# bf16 on a GPU; on CPU fp32 and bf16 (the CPU kernel issue's shapes: B = 64, N = 197 and 577).
DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32, torch.bfloat16]
SEL_B = 256 if ON_GPU else 64
SEL_N = [197, 577, 1025] if ON_GPU else [197, 577]
ATTN_B = 256 if ON_GPU else 64
ATTN_N = [197, 577]
D, H, HD = 768, 12, 64
# The reference attention materialises [B, H, L, L] fp32 tensors (~1 GB each at B64 N577): on CPU
# it is timed at N = 197 only; SDPA over the padded batch is the baseline there anyway.
ATTN_REF_MAX_N = 1025 if ON_GPU else 197


def _elt(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def _impl(module):
    return importlib.import_module(f"bus_kernels.ops.{module}").IMPLEMENTED


def _rand(gen, *shape, dtype, grad=False):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(grad)


# ------------------------------------------------------------------------- select_tokens
def topk_gather(x, scores, k, num_prefix=1):
    """The usual PyTorch formulation: topk + gather + weighted sum of the complement."""
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    kept = x[:, num_prefix:].gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
    w = scores.float().scatter(1, idx, 0.0)
    fused = torch.einsum("bn,bnd->bd", w, x[:, num_prefix:].float()).to(x.dtype)
    return torch.cat([x[:, :num_prefix], kept, fused[:, None]], dim=1)


SEL_IMPLS = ["torch", "topk_gather"] + fused_backends(_impl("select"))


@pytest.mark.parametrize("impl", SEL_IMPLS)
@pytest.mark.parametrize("keep", [0.5, 0.7])
@pytest.mark.parametrize("N", SEL_N)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_tokens(benchmark, gen, impl, keep, N, mode, dtype):
    x = _rand(gen, SEL_B, N, D, dtype=dtype, grad=mode != "fwd")
    s = torch.softmax(_rand(gen, SEL_B, N - 1, dtype=torch.float32), 1).requires_grad_(mode != "fwd")
    k = math.ceil(keep * (N - 1))
    if impl == "topk_gather":
        f = lambda: topk_gather(x, s, k)  # noqa: E731
    else:
        f = lambda: bk.select_tokens(x, s, keep, backend=impl).tokens  # noqa: E731
    out = f()
    if mode == "fwd":
        fn = f
    else:
        g = torch.randn_like(out)
        fn = lambda: torch.autograd.grad(f(), (x, s), g)  # noqa: E731
    # bytes: x read once + output written (+ grad read and grad_x written for the backward)
    nbytes = (x.numel() + out.numel()) * _elt(dtype) * (1 if mode == "fwd" else 2)
    run(benchmark, fn, op="select_tokens", impl=impl, shape=f"B{SEL_B} N{N} D{D} keep{keep}",
        dtype=dtype, mode=mode, nbytes=nbytes)


@pytest.mark.parametrize("impl", ["torch"] + fused_backends(_impl("select_varlen")))
@pytest.mark.parametrize("N", SEL_N[:2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_tokens_varlen_mass(benchmark, gen, impl, N, dtype):
    x = _rand(gen, SEL_B, N, D, dtype=dtype)
    s = torch.softmax(_rand(gen, SEL_B, N - 1, dtype=torch.float32) * 3, 1)
    out = bk.select_tokens_varlen(x, s, mass=0.7, backend=impl)
    nbytes = (x.numel() + out.tokens.numel()) * _elt(dtype)
    run(benchmark, lambda: bk.select_tokens_varlen(x, s, mass=0.7, backend=impl), op="select_tokens_varlen",
        impl=impl, shape=f"B{SEL_B} N{N} D{D} mass0.7", dtype=dtype, mode="fwd", nbytes=nbytes)


# ---------------------------------------------------------------------- relevance_scores
@pytest.mark.parametrize("impl", ["torch"] + fused_backends(_impl("relevance")))
@pytest.mark.parametrize("N", SEL_N)
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relevance_scores(benchmark, gen, impl, N, T, mode, dtype):
    q = _rand(gen, SEL_B, H, T, HD, dtype=dtype, grad=mode != "fwd")
    k = _rand(gen, SEL_B, H, N - 1, HD, dtype=dtype, grad=mode != "fwd")
    f = lambda: bk.relevance_scores(q, k, backend=impl)  # noqa: E731
    if mode == "fwd":
        fn = f
    else:
        g = torch.randn_like(f())
        fn = lambda: torch.autograd.grad(f(), (q, k), g)  # noqa: E731
    nbytes = (k.numel() + q.numel()) * _elt(dtype) * (1 if mode == "fwd" else 3)  # bwd: read k, q; write dk
    run(benchmark, fn, op="relevance_scores", impl=impl, shape=f"B{SEL_B} H{H} T{T} N{N} d{HD}",
        dtype=dtype, mode=mode, nbytes=nbytes)


# ---------------------------------------------------------------------- varlen_attention
def _sdpa_padded(q, k, v, cu, L):
    """SDPA over the zero-padded batch with a key-padding mask, then re-packed."""
    qp, kp, vp = (bk.unpack(t, cu, L).transpose(1, 2) for t in (q, k, v))
    lengths = (cu[1:] - cu[:-1]).long()
    mask = (torch.arange(L, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    return bk.pack(out.transpose(1, 2), lengths.tolist()).packed


def _attention_alternatives():
    alts = {"sdpa_padded": _sdpa_padded}
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        if ON_GPU:
            alts["torch_varlen"] = lambda q, k, v, cu, L: varlen_attn(q, k, v, cu, cu, L, L)
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        if ON_GPU:
            alts["flash_attn"] = lambda q, k, v, cu, L: flash_attn_varlen_func(q, k, v, cu, cu, L, L)
    except ImportError:
        pass
    return alts


ALTS = _attention_alternatives()


@pytest.mark.parametrize("impl", ["torch"] + fused_backends(_impl("varlen_attention")) + list(ALTS))
@pytest.mark.parametrize("N", ATTN_N)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_attention(benchmark, gen, impl, N, mode, dtype):
    if impl == "torch" and (N > ATTN_REF_MAX_N or dtype != DTYPES[0] and not ON_GPU):
        pytest.skip("the reference materialises [B, H, L, L]: timed at the smallest CPU case only")
    lengths = torch.randint(N // 2, N + 1, (ATTN_B,), generator=gen)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(DEVICE, torch.int32)
    total = int(lengths.sum())
    q, k, v = (_rand(gen, total, H, HD, dtype=dtype, grad=mode != "fwd") for _ in range(3))
    L = int(lengths.max())
    if impl in ALTS:
        f = lambda: ALTS[impl](q, k, v, cu, L)  # noqa: E731
    else:
        f = lambda: bk.varlen_attention(q, k, v, cu, L, backend=impl)  # noqa: E731
    if mode == "fwd":
        fn = f
    else:
        g = torch.randn_like(q)  # the output is [total, H, d] like q (no extra forward for its shape)
        fn = lambda: torch.autograd.grad(f(), (q, k, v), g)  # noqa: E731
    # Real (unpadded) work only: 2 matmuls of 2*L^2*d per head forward, 2.5x that backward.
    flops = 4.0 * float((lengths.double() ** 2).sum()) * H * HD * (1 if mode == "fwd" else 3.5)
    # The baseline is SDPA over the padded batch (what a user without varlen kernels runs).
    run(benchmark, fn, op="varlen_attention", impl=impl, shape=f"B{ATTN_B} N{N} H{H} d{HD} len~U[N/2,N]",
        dtype=dtype, mode=mode, flops=flops, reference=impl == "sdpa_padded")


# ---------------------------------------------------------------------------- pack/unpack
@pytest.mark.parametrize("impl", ["torch"] + fused_backends(_impl("pack")))
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_pack_unpack(benchmark, gen, impl, op):
    N, dtype = 577, DTYPES[0]
    x = _rand(gen, SEL_B, N, D, dtype=dtype)
    lengths = torch.randint(N // 2, N + 1, (SEL_B,), generator=gen)
    p = bk.pack(x, lengths)
    if op == "pack":
        fn = lambda: bk.pack(x, lengths.tolist(), backend=impl)  # noqa: E731
    else:
        fn = lambda: bk.unpack(p.packed, p.cu_seqlens, N, backend=impl)  # noqa: E731
    nbytes = 2 * p.packed.numel() * _elt(dtype)
    run(benchmark, fn, op=op, impl=impl, shape=f"B{SEL_B} N{N} D{D}", dtype=dtype, mode="fwd", nbytes=nbytes)


# ------------------------------------------------------------------------------- ceilings
# What the machine itself reaches, measured in the same run: the report states each kernel's
# GB/s against the copy bandwidth and its TFLOP/s against the matmul rate of the same dtype.
COPY_ELEMS = (1 << 28) if ON_GPU else (1 << 26)  # 1 GiB / 256 MiB of fp32: far beyond the caches
MM_N = 8192 if ON_GPU else 2048


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ceiling_copy(benchmark, gen, dtype):
    x = _rand(gen, COPY_ELEMS // 64, 64, dtype=dtype)
    y = torch.empty_like(x)
    run(benchmark, lambda: y.copy_(x), op="ceiling", impl="copy", shape=f"{x.numel() * _elt(dtype) >> 20} MiB",
        dtype=dtype, mode="fwd", nbytes=2 * x.numel() * _elt(dtype), reference=False)


# On a CPU without bf16 units (AVX2) torch's bf16 matmul is not a ceiling (2048^3 takes a minute):
# the fp32 matmul rate bounds bf16 work there too.
@pytest.mark.parametrize("dtype", DTYPES if ON_GPU else [torch.float32], ids=str)
def test_ceiling_matmul(benchmark, gen, dtype):
    a, b = (_rand(gen, MM_N, MM_N, dtype=dtype) for _ in range(2))
    run(benchmark, lambda: a @ b, op="ceiling", impl="matmul", shape=f"{MM_N}x{MM_N}x{MM_N}",
        dtype=dtype, mode="fwd", flops=2.0 * MM_N**3, reference=False)
