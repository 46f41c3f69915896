"""The compiled CUDA kernels of select_tokens, select_tokens_varlen and relevance_scores.

Complements tests/test_kernels_select.py and tests/test_kernels_relevance.py (which run their cases
on every fused backend, "cuda" included) with what is specific to the CUDA kernels: rows longer
than a thread block and than Triton's 4096-token limit, N not a power of two, k = 1 and k = n,
ties including -0.0 next to +0.0, the scalar gather path (D * elem_size not a multiple of 16, or a
misaligned data pointer), several D tiles, varlen keep 0 and n, direct ``torch.ops.bus_kernels_C``
calls with malformed inputs, and bitwise reproducibility. Everything but the registration check
needs a GPU and skips cleanly without one.
"""
import pytest
import torch

import bus_kernels as bk
from bus_kernels import _ext
from bus_kernels import reference as ref
from conftest import TOL, close_as, require_backend, select_scores

OPS = (
    "select_tokens",
    "select_tokens_backward",
    "select_tokens_varlen",
    "select_tokens_varlen_backward",
    "relevance_scores",
    "relevance_scores_backward",
)


@pytest.mark.skipif(not _ext.compiled(), reason="extension not built")
def test_cuda_ops_registered_when_built_with_cuda():
    """Runs without a GPU: an extension built with CUDA registers a CUDA kernel for each op."""
    if not _ext.cuda_compiled():
        pytest.skip("extension built without CUDA")
    for op in OPS:
        assert "cuda" in _ext.kernels(op), f"no CUDA kernel registered for bus_kernels_C::{op}"


gpu = pytest.mark.gpu


@pytest.fixture
def dev():
    return require_backend("cuda", bk.ops.select.IMPLEMENTED)


def _check_select(dev, gen, x, s, keep, **kw):
    """select_tokens on 'cuda' vs 'torch': exact indices, tokens and both gradients within TOL."""
    outs = {}
    for backend in ("cuda", "torch"):
        # detach (not clone): keeps x's storage offset, which the misaligned-pointer test needs
        xt = x.detach().requires_grad_(True)
        st = s.detach().requires_grad_(True)
        tok, idx = bk.select_tokens(xt, st, keep, backend=backend, **kw)
        outs[backend] = (tok, idx, xt, st)
    (tok, idx, xt, st), (rtok, ridx, xr, sr) = outs["cuda"], outs["torch"]
    assert idx.dtype == torch.int64 and torch.equal(idx, ridx)
    assert tok.dtype == x.dtype and tok.shape == rtok.shape
    close_as(tok, rtok, x.dtype, "tokens")
    grad = torch.randn(rtok.shape, generator=gen).to(x.dtype).to(dev)
    gx, gs = torch.autograd.grad(tok, (xt, st), grad)
    rgx, rgs = torch.autograd.grad(rtok, (xr, sr), grad)
    assert gx.dtype == x.dtype and gs.dtype == s.dtype
    close_as(gx, rgx, x.dtype, "grad_x")
    close_as(gs, rgs, s.dtype, "grad_scores")


# (B, N, D, num_prefix, keep, fuse, order, x dtype, scores dtype, scores kind)
LONG_CASES = [
    (2, 5001, 8, 1, 1, "sum", "index", torch.float32, torch.float32, "rand"),  # > 4096 tokens, k = 1
    (2, 5001, 8, 1, 5000, "mean", "score", torch.float32, torch.float32, "ties"),  # k = n
    (1, 4099, 16, 2, 2049, "mean", "score", torch.bfloat16, torch.float32, "ties"),  # many score-order tiles
    (3, 1000, 24, 1, 333, "sum", "index", torch.float16, torch.float16, "ties"),
    (2, 777, 64, 1, 300, None, "score", torch.bfloat16, torch.bfloat16, "rand"),
    (2, 300, 8, 1, 150, "sum", "score", torch.float32, torch.float32, "zeros"),
    (2, 257, 1024, 1, 64, "sum", "index", torch.bfloat16, torch.bfloat16, "rand"),  # several D tiles
]


@gpu
@pytest.mark.parametrize("B,N,D,P,keep,fuse,order,dtype,sdtype,kind", LONG_CASES)
def test_long_rows_ties_and_k_extremes(dev, gen, B, N, D, P, keep, fuse, order, dtype, sdtype, kind):
    x = torch.randn(B, N, D, generator=gen).to(dtype).to(dev)
    s = select_scores(gen, B, N - P, kind, sdtype).to(dev)
    _check_select(dev, gen, x, s, keep, num_prefix=P, fuse=fuse, order=order)


@gpu
@pytest.mark.parametrize(
    "D,dtype",
    [(36, torch.bfloat16), (20, torch.float16), (3, torch.float32), (1, torch.bfloat16), (7, torch.float32)],
)
@pytest.mark.parametrize("fuse", ["sum", "mean"])
def test_scalar_gather_path(dev, gen, D, dtype, fuse):
    """D * elem_size not a multiple of 16: element-wise loads and stores."""
    x = torch.randn(3, 41, D, generator=gen).to(dtype).to(dev)
    s = select_scores(gen, 3, 40, "ties", torch.float32).to(dev)
    _check_select(dev, gen, x, s, 11, fuse=fuse, order="score")


@gpu
def test_misaligned_pointer_takes_the_scalar_path(dev, gen):
    """A contiguous x whose data pointer is not 16-byte aligned (storage offset of one element)."""
    B, N, D = 2, 33, 16
    flat = torch.randn(B * N * D + 1, generator=gen).to(torch.bfloat16).to(dev)
    x = flat[1:].view(B, N, D)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    s = select_scores(gen, B, N - 1, "rand", torch.float32).to(dev)
    _check_select(dev, gen, x, s, 9, fuse="mean")


@gpu
def test_non_contiguous_inputs(dev, gen):
    x = torch.randn(2, 24, 37, generator=gen).to(dev).transpose(1, 2)  # [2, 37, 24], not contiguous
    s = torch.rand(36, 2, generator=gen).to(dev).t()
    _check_select(dev, gen, x, s, 10, fuse="sum", order="score")


@gpu
@pytest.mark.parametrize("fuse", ["sum", "mean", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_keep_zero_and_all(dev, gen, fuse, dtype):
    B, N, D, P = 5, 603, 36, 1
    n = N - P
    x = torch.randn(B, N, D, generator=gen).to(dtype).to(dev)
    s = select_scores(gen, B, n, "ties", dtype).to(dev)
    keep = torch.tensor([0, n, 1, 0, 301], dtype=torch.int64, device=dev)
    outs = {}
    for backend in ("cuda", "torch"):
        xt = x.detach().clone().requires_grad_(True)
        st = s.detach().clone().requires_grad_(True)
        outs[backend] = (bk.select_tokens_varlen(xt, st, keep=keep, num_prefix=P, fuse=fuse, backend=backend), xt, st)
    (out, xt, st), (r, xr, sr) = outs["cuda"], outs["torch"]
    assert torch.equal(out.cu_seqlens, r.cu_seqlens) and torch.equal(out.indices, r.indices)
    close_as(out.tokens, r.tokens, dtype, "tokens")
    grad = torch.randn(r.tokens.shape, generator=gen).to(dtype).to(dev)
    for a, b, what in zip(
        torch.autograd.grad(out.tokens, (xt, st), grad), torch.autograd.grad(r.tokens, (xr, sr), grad), ("gx", "gs")
    ):
        close_as(a, b, dtype, what)


@gpu
def test_select_is_bitwise_reproducible(dev, gen):
    x = torch.randn(4, 2001, 40, generator=gen).to(dev)
    s = select_scores(gen, 4, 2000, "ties", torch.float32).to(dev)
    g = None
    results = []
    for _ in range(2):
        xt = x.detach().clone().requires_grad_(True)
        st = s.detach().clone().requires_grad_(True)
        tok, idx = bk.select_tokens(xt, st, 700, fuse="mean", order="score", backend="cuda")
        if g is None:
            g = torch.randn(tok.shape, generator=gen).to(dev)
        results.append((tok, idx) + torch.autograd.grad(tok, (xt, st), g))
        keep = torch.tensor([0, 2000, 5, 999], device=dev)
        v = bk.select_tokens_varlen(x, s, keep=keep, fuse="sum", backend="cuda")
        results[-1] += (v.tokens, v.indices)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@gpu
def test_relevance_is_bitwise_reproducible(dev, gen):
    q = torch.randn(2, 3, 11, 72, generator=gen).to(dev, torch.bfloat16).requires_grad_()
    k = torch.randn(2, 3, 301, 72, generator=gen).to(dev, torch.bfloat16).requires_grad_()
    g = torch.randn(2, 301, generator=gen).to(dev)
    runs = []
    for _ in range(2):
        s = bk.relevance_scores(q, k, backend="cuda")
        runs.append((s,) + torch.autograd.grad(s, (q, k), g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("B,H,T,N,d", [(2, 2, 20, 300, 130), (1, 4, 1, 577, 64), (3, 1, 9, 31, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_relevance_larger_shapes(dev, B, H, T, N, d, dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, T, d, generator=gen).to(dev, dtype).requires_grad_()
    k = torch.randn(B, H, N, d, generator=gen).to(dev, dtype).requires_grad_()
    mask = torch.rand(B, T, generator=gen) < 0.6
    mask[:, 0] = True
    mask = mask.to(dev)
    s = bk.relevance_scores(q, k, q_mask=mask, backend="cuda")
    r = bk.relevance_scores(q, k, q_mask=mask, backend="torch")
    torch.testing.assert_close(s, r, **TOL[torch.float32 if dtype == torch.float32 else torch.float16])
    torch.testing.assert_close(s.sum(dim=1), torch.ones(B, device=dev), **TOL[torch.float16])
    g = torch.randn(B, N, generator=gen).to(dev)
    for a, b in zip(torch.autograd.grad(s, (q, k), g), torch.autograd.grad(r, (q, k), g)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@gpu
def test_empty_problems(dev):
    ops = torch.ops.bus_kernels_C
    q = torch.randn(2, 1, 3, 8, device=dev)
    s, lse = ops.relevance_scores(q, torch.randn(2, 1, 0, 8, device=dev), 0.5, None)
    assert s.shape == (2, 0) and torch.equal(lse, torch.full((2, 1, 3), float("-inf"), device=dev))
    dq, dk = ops.relevance_scores_backward(torch.randn(2, 0, device=dev), q, torch.randn(2, 1, 0, 8, device=dev), lse, 0.5, None)
    assert torch.count_nonzero(dq) == 0 and dk.shape == (2, 1, 0, 8)
    ref_s, ref_lse = ref.relevance_scores(q.cpu(), torch.randn(2, 1, 0, 8), 0.5, None)
    assert torch.equal(lse.cpu(), ref_lse)
    x, sc = torch.randn(0, 5, 4, device=dev), torch.rand(0, 4, device=dev)
    tok, idx = ops.select_tokens(x, sc, 2, 1, "sum", "index")
    assert tok.shape == (0, 4, 4) and idx.shape == (0, 2)


def _raises(fn, *args, match=None):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


@gpu
def test_direct_calls_with_malformed_inputs_raise(dev):
    ops = torch.ops.bus_kernels_C
    x = torch.randn(2, 9, 16, device=dev)
    s = torch.rand(2, 8, device=dev)
    sel = ops.select_tokens
    _raises(sel, x[0], s, 3, 1, "sum", "index", match="x must be")
    _raises(sel, x, s[:, :7], 3, 1, "sum", "index", match="scores must be")
    _raises(sel, x, s, 0, 1, "sum", "index", match="k=0")
    _raises(sel, x, s, 9, 1, "sum", "index", match="k=9")
    _raises(sel, x, s, 3, 10, "sum", "index", match="num_prefix")
    _raises(sel, x, s, 3, -1, "sum", "index", match="num_prefix")
    _raises(sel, x, s, 3, 1, "max", "index", match="fuse")
    _raises(sel, x, s, 3, 1, "sum", "random", match="order")
    _raises(sel, x.double(), s, 3, 1, "sum", "index", match="float64")
    _raises(sel, x, s.cpu(), 3, 1, "sum", "index")
    _raises(sel, x, s.int(), 3, 1, "sum", "index")

    tok, idx = sel(x, s, 3, 1, "sum", "index")
    bwd = ops.select_tokens_backward
    _raises(bwd, tok[:, :-1], x, s, idx, 1, "sum", match="grad must be")
    _raises(bwd, tok, x, s, idx.int(), 1, "sum", match="indices must be int64")
    _raises(bwd, tok, x, s, idx[:1], 1, "sum", match="indices must be")
    _raises(bwd, tok, x, s, torch.zeros(2, 9, dtype=torch.long, device=dev), 1, "sum", match="indices must be")
    _raises(bwd, tok.cpu(), x, s, idx, 1, "sum")
    # Out-of-range index values are ignored by the kernel (no out-of-bounds access), not trusted.
    bad = idx.clone()
    bad[0, 0] = 10**6
    gx, gs = bwd(tok, x, s, bad, 1, "sum")
    torch.cuda.synchronize()
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all()

    keep = torch.tensor([2, 8], device=dev)
    cu = torch.tensor([0, 4, 14], dtype=torch.int32, device=dev)
    vl = ops.select_tokens_varlen
    vl(x, s, keep, cu, 14, 1, "sum")  # well formed
    # Shapes, dtypes and devices are always checked (no sync).
    _raises(vl, x, s, keep, cu.long(), 14, 1, "sum", match="int32")
    _raises(vl, x, s, keep.int(), cu, 14, 1, "sum", match="int64")
    _raises(vl, x, s, keep[:1], cu, 14, 1, "sum", match="keep must be")
    _raises(vl, x, s, keep, cu[:2], 14, 1, "sum", match="B\\+1")
    _raises(vl, x, s, keep, cu, 3, 1, "sum", match="total=3 is smaller")
    malformed = [  # values: checked (a host copy) only with value checks on
        ((x, s, torch.tensor([2, 9], device=dev), torch.tensor([0, 4, 15], dtype=torch.int32, device=dev), 15, 1, "sum"), "keep"),
        ((x, s, torch.tensor([-1, 8], device=dev), torch.tensor([0, 1, 11], dtype=torch.int32, device=dev), 11, 1, "sum"), "keep"),
        ((x, s, keep, torch.tensor([0, 5, 15], dtype=torch.int32, device=dev), 15, 1, "sum"), "cu_seqlens length"),
        ((x, s, keep, torch.tensor([1, 5, 15], dtype=torch.int32, device=dev), 15, 1, "sum"), "start at 0"),
        ((x, s, keep, cu, 13, 1, "sum"), "total"),
        ((x, s, torch.tensor([-50, 8], device=dev), torch.tensor([0, -47, -37], dtype=torch.int32, device=dev), 6, 1, "sum"), "keep"),
    ]
    bk.set_value_checks(True)
    try:
        for args, match in malformed:
            _raises(vl, *args, match=match)
    finally:
        bk.set_value_checks(None)
    assert not ops.value_checks()  # the default on CUDA: no host copy, and no out-of-bounds access either
    for args, _ in malformed:
        vl(*args)
    torch.cuda.synchronize()
    tok, idx = vl(x, s, keep, cu, 14, 1, "sum")
    vb = ops.select_tokens_varlen_backward
    _raises(vb, tok[:-1], x, s, idx, keep, cu, 1, "sum", match="indices must be")
    _raises(vb, tok, x, s, idx[:-1], keep, cu, 1, "sum", match="indices must be")
    _raises(vb, tok[:, :3], x, s, idx, keep, cu, 1, "sum", match="grad must be")
    bk.set_value_checks(True)
    try:
        _raises(vb, tok[:-2], x, s, idx, keep, cu, 1, "none", match="cu_seqlens length")
    finally:
        bk.set_value_checks(None)

    q = torch.randn(2, 3, 4, 8, device=dev)
    k = torch.randn(2, 3, 10, 8, device=dev)
    rel = ops.relevance_scores
    _raises(rel, q[0], k, 0.5, None, match="q must be")
    _raises(rel, q, k[:, :2], 0.5, None, match="k must be")
    _raises(rel, q, k[..., :4], 0.5, None, match="k must be")
    _raises(rel, q, k.half(), 0.5, None, match="dtype")
    _raises(rel, q.double(), k.double(), 0.5, None, match="float64")
    _raises(rel, q, k.cpu(), 0.5, None)
    _raises(rel, q, k, 0.5, torch.ones(2, 5, dtype=torch.bool, device=dev), match="q_mask")
    _raises(rel, q, k, 0.5, torch.ones(2, 4, device=dev), match="q_mask must be bool")
    s_, lse = rel(q, k, 0.5, None)
    rb = ops.relevance_scores_backward
    g = torch.randn(2, 10, device=dev)
    _raises(rb, g[:, :9], q, k, lse, 0.5, None, match="grad must be")
    _raises(rb, g, q, k, lse[:, :2], 0.5, None, match="lse must be")
    _raises(rb, g, q, k, lse.double(), 0.5, None, match="lse must be float32")
    _raises(rb, g, q, k, lse.cpu(), 0.5, None)


@gpu
def test_nan_scores_rank_first_in_direct_calls(dev):
    """+NaN and -NaN (sign bit set, e.g. 0 * -inf) both rank above +inf, ties by index, as
    torch.sort and the reference rank them; the order key ranked -NaN last."""
    ops = torch.ops.bus_kernels_C
    s = torch.rand(3, 40) + 0.5
    neg_nan = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)  # 0xffc00000
    s[0, 7], s[0, 30] = float("nan"), neg_nan
    s[1, 2], s[1, 39] = neg_nan, float("inf")
    s[2, 5] = float("-inf")
    x = torch.randn(3, 41, 16)
    for order in ("index", "score"):
        want = ref.select_tokens(x, s, 4, 1, "none", order)[1]
        got = ops.select_tokens(x.to(dev), s.to(dev), 4, 1, "none", order)[1]
        assert torch.equal(got.cpu(), want), order
    keep = torch.tensor([2, 1, 3])
    cu = torch.tensor([0, 4, 7, 12], dtype=torch.int32)
    want = ref.select_tokens_varlen(x, s, keep, cu, 12, 1, "sum")[1]
    got = ops.select_tokens_varlen(x.to(dev), s.to(dev), keep.to(dev), cu.to(dev), 12, 1, "sum")[1]
    assert torch.equal(got.cpu(), want)


@gpu
def test_pack_more_than_65535_sequences(dev):
    """B went on grid.y (at most 65535): the launch failed for larger batches."""
    B = 70_001
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 3, (B,), generator=g)
    x = torch.randn(B, 2, 3, generator=g)
    packed = bk.pack(x.to(dev), lengths.to(dev), backend="cuda")
    want = bk.pack(x, lengths, backend="torch")
    assert torch.equal(packed.packed.cpu(), want.packed) and torch.equal(packed.cu_seqlens.cpu(), want.cu_seqlens)
    back = bk.unpack(packed.packed, packed.cu_seqlens, 2, backend="cuda")
    assert torch.equal(back.cpu(), bk.unpack(want.packed, want.cu_seqlens, 2, backend="torch"))


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_hot_path_makes_no_host_sync_on_the_gpu(dev, backend):
    """With the default value checks (off on CUDA) the hot path never waits for the GPU:
    torch.cuda.set_sync_debug_mode("error") raises on any synchronising call."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 3, 32, generator=g).to(dev).requires_grad_()
    k = torch.randn(4, 2, 50, 32, generator=g).to(dev).requires_grad_()
    mask = torch.tensor([[True, False, True]] * 4, device=dev)
    x = torch.randn(4, 51, 64, generator=g).to(dev).requires_grad_()
    keep = torch.tensor([3, 0, 50, 7], device=dev)
    total, longest = 4 * 2 + 60, 52
    lengths = torch.tensor([5, 0, 9, 2], device=dev)
    qa = torch.randn(20, 2, 32, generator=g).to(dev).requires_grad_()
    cu = torch.tensor([0, 5, 5, 14, 20], dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = bk.relevance_scores(q, k, q_mask=mask, backend=backend)
        tok = bk.select_tokens(x, s, 9, backend=backend).tokens  # x: [CLS] + the 50 scored keys
        var = bk.select_tokens_varlen(x, s, keep=keep, total=total, max_seqlen=longest, backend=backend)
        loss = tok.float().square().sum() + var.tokens.float().square().sum()
        if backend == "triton":
            loss = loss + bk.varlen_attention(qa, qa, qa, cu, 9, backend=backend).float().square().sum()
        else:
            loss = loss + bk.pack(x, lengths, total=16, max_seqlen=9, backend=backend).packed.float().square().sum()
            loss = loss + bk.unpack(qa, cu, 9, backend=backend).float().square().sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(q.grad).all() and torch.isfinite(x.grad).all()
