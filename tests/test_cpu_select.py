"""The compiled CPU ``select_tokens`` / ``select_tokens_varlen``: fuzzed against the reference, and
the C++ entry points called directly with malformed inputs (they must raise, never crash).

The shared per-backend cases live in test_kernels_select.py; this file adds a hypothesis search
over sizes, ties, keep counts, fuse/order modes and dtypes.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bus_kernels as bk
from bus_kernels import _ext
from bus_kernels.ops import select as select_op
from bus_kernels.ops import select_varlen as varlen_op
from conftest import TOL, close_as, require_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _cpu():
    require_backend("cpu", select_op.IMPLEMENTED)
    require_backend("cpu", varlen_op.IMPLEMENTED)


def _inputs(seed, B, N, D, P, dtype, sdtype, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    if ties:  # a few distinct values, -0.0 beside +0.0, and negatives
        s = torch.randint(-1, 3, (B, N - P), generator=g).float()
        s = torch.where((s == 0) & (torch.rand(B, N - P, generator=g) < 0.5), -0.0, s)
    else:
        s = torch.randn(B, N - P, generator=g)
    return x, s.to(sdtype), torch.randn(B, N + 2, D, generator=g)


def _grads(backend, x, s, call):
    x = x.clone().requires_grad_()
    s = s.clone().requires_grad_()
    out = call(x, s, backend)
    return out, x, s


@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 3),
    N=st.integers(1, 70),
    D=st.sampled_from([1, 3, 8, 24, 33]),
    P=st.integers(0, 2),
    fuse=st.sampled_from(["sum", "mean", None]),
    order=st.sampled_from(["index", "score"]),
    dtype=st.sampled_from(DTYPES),
    sdtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    data=st.data(),
)
def test_select_tokens_fuzz(seed, B, N, D, P, fuse, order, dtype, sdtype, ties, data):
    if N - P < 1:
        P = N - 1
    k = data.draw(st.integers(1, N - P), label="k")
    x, s, graw = _inputs(seed, B, N, D, P, dtype, sdtype, ties)

    def call(x, s, backend):
        return bk.select_tokens(x, s, k, num_prefix=P, fuse=fuse, order=order, backend=backend)

    (tok, idx), xc, sc = _grads("cpu", x, s, call)
    (ref, ridx), xr, sr = _grads("torch", x, s, call)
    assert torch.equal(idx, ridx)
    assert tok.dtype == ref.dtype and tok.shape == ref.shape
    close_as(tok, ref, dtype, "tokens")
    grad = graw[:, : ref.shape[1]].to(dtype)
    gx, gs = torch.autograd.grad(tok, (xc, sc), grad)
    rgx, rgs = torch.autograd.grad(ref, (xr, sr), grad)
    assert gx.dtype == dtype and gs.dtype == sdtype
    close_as(gx, rgx, dtype, "grad_x")
    # grad_scores is a dot over D in fp32, rounded to the scores' dtype; scale the tolerance by D.
    tol = {key: val * max(1, D / 8) for key, val in TOL[torch.promote_types(dtype, sdtype)].items()}
    torch.testing.assert_close(gs.float(), rgs.float(), **tol)


@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 4),
    N=st.integers(1, 50),
    D=st.sampled_from([1, 8, 20]),
    P=st.integers(0, 2),
    fuse=st.sampled_from(["sum", "mean", None]),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    data=st.data(),
)
def test_select_tokens_varlen_fuzz(seed, B, N, D, P, fuse, dtype, ties, data):
    if N - P < 1:
        P = N - 1
    n = N - P
    keep = torch.tensor(data.draw(st.lists(st.integers(0, n), min_size=B, max_size=B), label="keep"))
    x, s, _ = _inputs(seed, B, N, D, P, dtype, torch.float32, ties)

    def call(x, s, backend):
        return bk.select_tokens_varlen(x, s, keep=keep, num_prefix=P, fuse=fuse, backend=backend)

    out, xc, sc = _grads("cpu", x, s, call)
    ref, xr, sr = _grads("torch", x, s, call)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.cu_seqlens, ref.cu_seqlens)
    close_as(out.tokens, ref.tokens, dtype, "tokens")
    grad = torch.randn(ref.tokens.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    gx, gs = torch.autograd.grad(out.tokens, (xc, sc), grad)
    rgx, rgs = torch.autograd.grad(ref.tokens, (xr, sr), grad)
    close_as(gx, rgx, dtype, "grad_x")
    tol = {key: val * max(1, D / 8) for key, val in TOL[dtype].items()}
    torch.testing.assert_close(gs, rgs, **tol)


# ---------------------------------------------------------------- direct calls, bad input
C = _ext.ops() if _ext.compiled() else None
x0, s0 = torch.randn(2, 9, 4), torch.rand(2, 8)


@pytest.mark.parametrize(
    "args, match",
    [
        ((x0[0], s0, 3, 1, "sum", "index"), "x must be"),
        ((x0.double(), s0, 3, 1, "sum", "index"), "x must be float32"),
        ((x0, s0.double(), 3, 1, "sum", "index"), "scores must be float32"),
        ((x0, s0[:, :5], 3, 1, "sum", "index"), "scores must be"),
        ((x0, s0, 0, 1, "sum", "index"), "k=0"),
        ((x0, s0, 9, 1, "sum", "index"), "k=9"),
        ((x0, s0, 3, 10, "sum", "index"), "num_prefix=10"),
        ((x0, s0, 3, -1, "sum", "index"), "num_prefix=-1"),
        ((x0, s0, 3, 1, "avg", "index"), "fuse must be"),
        ((x0, s0, 3, 1, "sum", "random"), "order must be"),
    ],
)
def test_select_tokens_rejects(args, match):
    with pytest.raises(RuntimeError, match=match):
        C.select_tokens(*args)


def test_select_tokens_backward_rejects():
    tok, idx = C.select_tokens(x0, s0, 3, 1, "sum", "index")
    g = torch.randn_like(tok)
    bad_idx = idx.clone()
    bad_idx[0, 0] = 0  # a prefix position
    with pytest.raises(RuntimeError, match="indices must be in"):
        C.select_tokens_backward(g, x0, s0, bad_idx, 1, "sum")
    bad_idx[0, 0] = 99
    with pytest.raises(RuntimeError, match="indices must be in"):
        C.select_tokens_backward(g, x0, s0, bad_idx, 1, "sum")
    with pytest.raises(RuntimeError, match="indices must be int64"):
        C.select_tokens_backward(g, x0, s0, idx.int(), 1, "sum")
    with pytest.raises(RuntimeError, match="grad must be"):
        C.select_tokens_backward(g[:, :-1], x0, s0, idx, 1, "sum")
    with pytest.raises(RuntimeError, match="grad must be"):
        C.select_tokens_backward(g.half(), x0, s0, idx, 1, "sum")
    gx, gs = C.select_tokens_backward(g, x0, s0, idx, 1, "sum")
    assert gx.shape == x0.shape and gs.shape == s0.shape


def test_select_tokens_varlen_rejects():
    keep = torch.tensor([2, 0])
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)  # P=1 + keep + fused
    tok, idx = C.select_tokens_varlen(x0, s0, keep, cu, 6, 1, "sum")
    assert tok.shape == (6, 4) and idx.shape == (2,)
    with pytest.raises(RuntimeError, match=r"keep\[1\]=9"):
        C.select_tokens_varlen(x0, s0, torch.tensor([2, 9]), cu, 6, 1, "sum")
    with pytest.raises(RuntimeError, match="sequence 0 must have 4 rows"):
        C.select_tokens_varlen(x0, s0, keep, torch.tensor([0, 3, 6], dtype=torch.int32), 6, 1, "sum")
    with pytest.raises(RuntimeError, match="must end at total=7"):
        C.select_tokens_varlen(x0, s0, keep, cu, 7, 1, "sum")
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32"):
        C.select_tokens_varlen(x0, s0, keep, cu.long(), 6, 1, "sum")
    with pytest.raises(RuntimeError, match="keep must be int64"):
        C.select_tokens_varlen(x0, s0, keep.int(), cu, 6, 1, "sum")
    with pytest.raises(RuntimeError, match="start at 0"):
        C.select_tokens_varlen(x0, s0, keep, torch.tensor([1, 5, 6], dtype=torch.int32), 6, 1, "sum")
    g = torch.randn_like(tok)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        C.select_tokens_varlen_backward(g, x0, s0, idx[:1], keep, cu, 1, "sum")
    with pytest.raises(RuntimeError, match="indices must be in"):
        C.select_tokens_varlen_backward(g, x0, s0, idx + 100, keep, cu, 1, "sum")
    with pytest.raises(RuntimeError, match="must end at total"):
        C.select_tokens_varlen_backward(g[:5], x0, s0, idx, keep, cu, 1, "sum")
