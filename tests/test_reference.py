"""The references against independent naive loops (tests/naive.py), and their gradients."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bus_kernels as bk
from bus_kernels import reference
from conftest import TOL

import naive


def rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def tied_scores(gen, B, n):
    """Scores drawn from 3 values so that ties are everywhere."""
    return torch.randint(0, 3, (B, n), generator=gen).float()


# ----------------------------------------------------------------------------- select_tokens
@pytest.mark.parametrize(
    "B,N,P,k", [(1, 7, 1, 1), (3, 7, 1, 6), (2, 37, 0, 5), (2, 37, 2, 35), (4, 197, 1, 138), (1, 1, 0, 1)]
)
@pytest.mark.parametrize("fuse", ["sum", "mean", None])
@pytest.mark.parametrize("order", ["index", "score"])
def test_select_matches_naive(gen, B, N, P, k, fuse, order):
    x, s = rand(gen, B, N, 16), rand(gen, B, N - P)
    tok, idx = bk.select_tokens(x, s, k, num_prefix=P, fuse=fuse, order=order, backend="torch")
    ntok, nidx = naive.select(x, s, k, P, fuse, order)
    assert torch.equal(idx, nidx)
    torch.testing.assert_close(tok.double(), ntok, **TOL[torch.float32])


@pytest.mark.parametrize("fuse", ["sum", "mean"])
@pytest.mark.parametrize("order", ["index", "score"])
def test_select_ties_lower_index_wins(gen, fuse, order):
    x, s = rand(gen, 3, 20, 8), tied_scores(gen, 3, 19)
    tok, idx = bk.select_tokens(x, s, 7, fuse=fuse, order=order, backend="torch")
    ntok, nidx = naive.select(x, s, 7, 1, fuse, order)
    assert torch.equal(idx, nidx)
    torch.testing.assert_close(tok.double(), ntok, **TOL[torch.float32])


def test_select_ratio_and_ceil(gen):
    x, s = rand(gen, 2, 31, 4), rand(gen, 2, 30)
    assert bk.select_tokens(x, s, 0.1).indices.shape == (2, 3)  # 0.1 * 30 = 3, not 4
    assert bk.select_tokens(x, s, 0.7).indices.shape == (2, 21)
    assert bk.select_tokens(x, s, 0.51).indices.shape == (2, 16)  # ceil(15.3)
    assert bk.select_tokens(x, s, 1.0).indices.shape == (2, 30)


def test_select_mean_zero_denominator(gen):
    x = rand(gen, 1, 5, 4)
    s = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    tok = bk.select_tokens(x, s, 2, fuse="mean").tokens
    assert torch.equal(tok[0, -1], torch.zeros(4))
    tok = bk.select_tokens(x, s, 4, fuse="mean").tokens  # nothing dropped
    assert torch.equal(tok[0, -1], torch.zeros(4))


def test_select_prefix_unchanged_and_bf16(gen):
    x, s = rand(gen, 2, 50, 32, dtype=torch.bfloat16), rand(gen, 2, 48)
    tok, idx = bk.select_tokens(x, s, 11, num_prefix=2, backend="torch")
    assert tok.dtype == torch.bfloat16 and torch.equal(tok[:, :2], x[:, :2])
    ntok, nidx = naive.select(x, s, 11, 2, "sum", "index")
    assert torch.equal(idx, nidx)
    torch.testing.assert_close(tok.double(), ntok, **TOL[torch.bfloat16])


@given(
    B=st.integers(1, 3),
    n=st.integers(1, 40),
    P=st.integers(0, 2),
    frac=st.floats(0.01, 1.0),
    fuse=st.sampled_from(["sum", "mean", None]),
    order=st.sampled_from(["index", "score"]),
    seed=st.integers(0, 2**16),
)
def test_select_property(B, n, P, frac, fuse, order, seed):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(n, round(frac * n)))
    x, s = rand(gen, B, n + P, 4), torch.randint(-3, 4, (B, n), generator=gen).float()
    tok, idx = bk.select_tokens(x, s, k, num_prefix=P, fuse=fuse, order=order)
    ntok, nidx = naive.select(x, s, k, P, fuse, order)
    assert tok.shape == (B, P + k + (fuse is not None), 4)
    assert torch.equal(idx, nidx)
    torch.testing.assert_close(tok.double(), ntok, **TOL[torch.float32])


# ----------------------------------------------------------------------- select_tokens_varlen
@pytest.mark.parametrize("P", [0, 1, 2])
@pytest.mark.parametrize("fuse", ["sum", "mean", None])
def test_varlen_keep_matches_naive(gen, P, fuse):
    B, n = 5, 23
    x, s = rand(gen, B, n + P, 8), rand(gen, B, n)
    keep = torch.tensor([0, 1, n, 7, 12])
    out = bk.select_tokens_varlen(x, s, keep=keep, num_prefix=P, fuse=fuse)
    ntok, ncu, nidx = naive.select_varlen(x, s, keep, P, fuse)
    assert torch.equal(out.cu_seqlens, ncu) and out.cu_seqlens.dtype == torch.int32
    assert torch.equal(out.indices, nidx) and torch.equal(out.keep, keep)
    assert out.max_seqlen == int((ncu[1:] - ncu[:-1]).max())
    torch.testing.assert_close(out.tokens.double(), ntok, **TOL[torch.float32])


def test_varlen_equals_fixed_when_keep_is_constant(gen):
    x, s = rand(gen, 3, 30, 8), tied_scores(gen, 3, 29)
    fixed = bk.select_tokens(x, s, 9)
    var = bk.select_tokens_varlen(x, s, keep=torch.full((3,), 9))
    assert torch.equal(var.tokens, fixed.tokens.reshape(-1, 8))
    assert torch.equal(var.indices, fixed.indices.reshape(-1))


@pytest.mark.parametrize("mass,min_keep", [(0.3, 1), (0.9, 1), (1.0, 1), (0.05, 4)])
def test_varlen_mass(gen, mass, min_keep):
    B, n = 4, 40
    x = rand(gen, B, n + 1, 8)
    s = torch.softmax(rand(gen, B, n) * 2, dim=1)
    out = bk.select_tokens_varlen(x, s, mass=mass, min_keep=min_keep)
    nkeep = naive.mass_keep(s, mass, min_keep)
    assert torch.equal(out.keep, nkeep)
    ntok, ncu, nidx = naive.select_varlen(x, s, nkeep, 1, "sum")
    assert torch.equal(out.cu_seqlens, ncu) and torch.equal(out.indices, nidx)
    torch.testing.assert_close(out.tokens.double(), ntok, **TOL[torch.float32])


def test_varlen_mass_one_keeps_smallest_set():
    s = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    out = bk.select_tokens_varlen(torch.randn(1, 5, 2), s, mass=1.0)
    assert out.keep.tolist() == [2] and out.indices.tolist() == [1, 3]


# ----------------------------------------------------------------------------- relevance
@pytest.mark.parametrize("B,H,T,N,d", [(1, 1, 1, 1, 8), (2, 3, 1, 7, 8), (2, 2, 5, 37, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_relevance_matches_naive(gen, B, H, T, N, d, masked):
    q, k = rand(gen, B, H, T, d), rand(gen, B, H, N, d)
    q_mask = None
    if masked:
        q_mask = torch.rand(B, T, generator=gen) < 0.6
        q_mask[:, 0] = True
    s = bk.relevance_scores(q, k, q_mask=q_mask)
    assert s.dtype == torch.float32 and s.shape == (B, N)
    torch.testing.assert_close(s.double(), naive.relevance(q, k, d**-0.5, q_mask), **TOL[torch.float32])
    torch.testing.assert_close(s.sum(1), torch.ones(B), **TOL[torch.float32])


def test_relevance_large_logits_and_bf16(gen):
    q, k = rand(gen, 2, 2, 3, 16) * 30, rand(gen, 2, 2, 19, 16) * 30
    s = bk.relevance_scores(q, k, scale=1.0)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s.double(), naive.relevance(q, k, 1.0, None), **TOL[torch.float32])
    sb = bk.relevance_scores(q.bfloat16(), k.bfloat16())
    assert sb.dtype == torch.float32
    torch.testing.assert_close(
        sb.double(), naive.relevance(q.bfloat16(), k.bfloat16(), 0.25, None), **TOL[torch.bfloat16]
    )


# ---------------------------------------------------------------------------- attention
def random_cu(gen, lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("lengths", [[5], [0, 3, 1, 0, 7], [1], [0]])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [None, "per_head", "per_key"])
def test_attention_matches_naive(gen, lengths, causal, bias):
    cu = random_cu(gen, lengths)
    total, H, d = int(cu[-1]), 2, 8
    q, k, v = (rand(gen, total, H, d) for _ in range(3))
    key_bias = None
    if bias == "per_head":
        key_bias = rand(gen, total, H)
    elif bias == "per_key":
        key_bias = rand(gen, total)
    out = bk.varlen_attention(q, k, v, cu, max(lengths) + 3, causal=causal, key_bias=key_bias)
    want = naive.attention(q, k, v, cu, d**-0.5, causal, key_bias)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])


def test_attention_all_masked_row_is_zero(gen):
    cu = torch.tensor([0, 3], dtype=torch.int32)
    q = rand(gen, 3, 1, 8)
    bias = torch.tensor([float("-inf"), 0.0, 0.0])
    out = bk.varlen_attention(q, q, q, cu, 3, causal=True, key_bias=bias)
    assert torch.equal(out[0], torch.zeros(1, 8)) and torch.isfinite(out).all()


def test_attention_matches_sdpa(gen):
    lengths = [4, 9, 1]
    cu = random_cu(gen, lengths)
    q, k, v = (rand(gen, 14, 3, 16, dtype=torch.float64) for _ in range(3))
    out = bk.varlen_attention(q, k, v, cu, 9, causal=True)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True
        ).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref, **TOL[torch.float64])


# ------------------------------------------------------------------------------- pack
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_pack_unpack_roundtrip(gen, backend):
    from conftest import require_backend

    require_backend(backend)
    x = rand(gen, 4, 6, 3, 5)
    lengths = [6, 0, 1, 4]
    packed, cu, L = bk.pack(x, lengths, backend=backend)
    assert cu.tolist() == [0, 6, 6, 7, 11] and L == 6 and packed.shape == (11, 3, 5)
    for b, n in enumerate(lengths):
        assert torch.equal(packed[cu[b] : cu[b] + n], x[b, :n])
    back = bk.unpack(packed, cu, 8, backend=backend)
    assert back.shape == (4, 8, 3, 5)
    for b, n in enumerate(lengths):
        assert torch.equal(back[b, :n], x[b, :n]) and not back[b, n:].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
def test_pack_cpu_kernel_any_dtype(gen, dtype):
    from conftest import require_backend

    require_backend("cpu")
    x = (torch.randn(3, 7, 3, generator=gen) * 5).to(dtype)
    lengths = torch.tensor([3, 7, 0])
    a = bk.pack(x, lengths, backend="cpu")
    b = bk.pack(x, lengths, backend="torch")
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(bk.unpack(a.packed, a.cu_seqlens, 9, backend="cpu"), bk.unpack(b.packed, b.cu_seqlens, 9, backend="torch"))


# ----------------------------------------------------------------------------- gradcheck
def f64(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("fuse", ["sum", "mean", None])
@pytest.mark.parametrize("order", ["index", "score"])
def test_gradcheck_select(gen, fuse, order):
    x, s = f64(gen, 2, 9, 3), f64(gen, 2, 8)
    fn = lambda x, s: bk.select_tokens(x, s, 3, fuse=fuse, order=order).tokens  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, s))


@pytest.mark.parametrize("fuse", ["sum", "mean"])
def test_gradcheck_select_varlen(gen, fuse):
    x = f64(gen, 3, 9, 3)
    s = torch.rand(3, 8, generator=gen, dtype=torch.float64).add(0.1).requires_grad_()
    keep = torch.tensor([0, 3, 8])
    assert torch.autograd.gradcheck(lambda x, s: bk.select_tokens_varlen(x, s, keep=keep, fuse=fuse).tokens, (x, s))
    assert torch.autograd.gradcheck(lambda x, s: bk.select_tokens_varlen(x, s, mass=0.5, num_prefix=1, fuse=fuse).tokens, (x, s))


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_relevance(gen, masked):
    q, k = f64(gen, 2, 2, 3, 4), f64(gen, 2, 2, 5, 4)
    q_mask = torch.tensor([[True, False, True], [True, True, True]]) if masked else None
    assert torch.autograd.gradcheck(lambda q, k: bk.relevance_scores(q, k, q_mask=q_mask), (q, k))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_dim", [0, 1, 2])
def test_gradcheck_attention(gen, causal, bias_dim):
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    q, k, v = f64(gen, 7, 2, 8), f64(gen, 7, 2, 8), f64(gen, 7, 2, 8)
    bias = None if bias_dim == 0 else f64(gen, *((7,) if bias_dim == 1 else (7, 2)))
    inputs = (q, k, v) if bias is None else (q, k, v, bias)

    def fn(q, k, v, b=None):
        return bk.varlen_attention(q, k, v, cu, 4, causal=causal, key_bias=b)

    # fast_mode: random projections of the Jacobian, so each check costs a few forward calls
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_pack_unpack(gen, backend):
    from conftest import require_backend

    require_backend(backend)
    x = f64(gen, 3, 5, 2)
    assert torch.autograd.gradcheck(lambda x: bk.pack(x, [2, 0, 5], backend=backend).packed, (x,))
    p = f64(gen, 7, 2)
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda p: bk.unpack(p, cu, 6, backend=backend), (p,))


def test_mean_fuse_gradient_is_finite_for_tiny_dropped_sum():
    """1/S overflows for |S| < 3e-39 although the gradient itself is representable: divide by S."""
    x = (torch.randn(1, 5, 3) * 1e-3).requires_grad_()
    s = torch.tensor([[1.0, 4e-40, 0.0, 6e-40]], requires_grad=True)
    tok = bk.select_tokens(x, s, 1, fuse="mean", backend="torch").tokens
    gx, gs = torch.autograd.grad(tok.sum(), (x, s))
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all()


def test_reference_functions_are_pure(gen):
    """Reference outputs never alias inputs (custom ops forbid it)."""
    x, s = rand(gen, 2, 5, 3), rand(gen, 2, 4)
    tok, _ = reference.select_tokens(x, s, 4, 1, "none", "index")
    assert tok.data_ptr() != x.data_ptr()
    assert math.isclose(float(reference.relevance_scores(rand(gen, 1, 1, 1, 8), rand(gen, 1, 1, 3, 8), 1.0, None)[0].sum()), 1.0, rel_tol=1e-6)


@given(
    keep=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    P=st.integers(0, 2),
    fuse=st.sampled_from(["sum", "mean", None]),
    seed=st.integers(0, 2**16),
)
def test_varlen_property(keep, P, fuse, seed):
    gen = torch.Generator().manual_seed(seed)
    B, n = len(keep), 12
    x, s = rand(gen, B, n + P, 4), torch.randint(0, 4, (B, n), generator=gen).float()
    keep_t = torch.tensor(keep)
    out = bk.select_tokens_varlen(x, s, keep=keep_t, num_prefix=P, fuse=fuse)
    ntok, ncu, nidx = naive.select_varlen(x, s, keep_t, P, fuse)
    assert torch.equal(out.cu_seqlens, ncu) and torch.equal(out.indices, nidx)
    torch.testing.assert_close(out.tokens.double(), ntok, **TOL[torch.float32])


@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    causal=st.booleans(),
    H=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_attention_property(lengths, causal, H, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = random_cu(gen, lengths)
    total = int(cu[-1])
    q, k, v = (rand(gen, total, H, 8) for _ in range(3))
    out = bk.varlen_attention(q, k, v, cu, max(lengths), causal=causal)
    torch.testing.assert_close(out.double(), naive.attention(q, k, v, cu, 8**-0.5, causal, None), **TOL[torch.float32])
