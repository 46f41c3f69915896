"""Bad input raises ValueError/TypeError naming the argument: never a crash, never a wrong answer."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bus_kernels as bk

x = torch.randn(2, 9, 4)
s = torch.randn(2, 8)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bk.select_tokens(x[0], s, 3), ValueError, "x must have 3 dims"),
        (lambda: bk.select_tokens(x.numpy(), s, 3), TypeError, "x must be a torch.Tensor"),
        (lambda: bk.select_tokens(x.long(), s, 3), TypeError, "x must be a floating"),
        (lambda: bk.select_tokens(x, s.long(), 3), TypeError, "scores must be"),
        (lambda: bk.select_tokens(x, s[:, :7], 3), ValueError, r"scores must be \[B=2, N - num_prefix=8\]"),
        (lambda: bk.select_tokens(x, s, 0), ValueError, r"keep=0 must be in \[1, 8\]"),
        (lambda: bk.select_tokens(x, s, 9), ValueError, r"keep=9 must be in \[1, 8\]"),
        (lambda: bk.select_tokens(x, s, 0.0), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: bk.select_tokens(x, s, 1.5), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: bk.select_tokens(x, s, True), TypeError, "keep must be an int"),
        (lambda: bk.select_tokens(x, s, "3"), TypeError, "keep must be an int"),
        (lambda: bk.select_tokens(x, s, 3, num_prefix=10), ValueError, "num_prefix=10"),
        (lambda: bk.select_tokens(x, s, 3, fuse="max"), ValueError, "fuse='max'"),
        (lambda: bk.select_tokens(x, s, 3, order="random"), ValueError, "order='random'"),
        (lambda: bk.select_tokens(x, s, 3, backend="tpu"), ValueError, "backend='tpu'"),
        (lambda: bk.select_tokens(x, torch.full_like(s, float("nan")), 3), ValueError, "scores must be finite"),
        (lambda: bk.select_tokens(x, s.clone().index_fill_(1, torch.tensor([2]), float("inf")), 3), ValueError, "finite"),
        (lambda: bk.select_tokens(x[:, :1], s[:, :0], 1), ValueError, "no tokens to rank"),
        (lambda: bk.select_tokens_varlen(x, s), ValueError, "exactly one of keep="),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2]), mass=0.5), ValueError, "exactly one"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 9])), ValueError, r"keep\[b\] must be in \[0, N - num_prefix = 8\]"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, -1])), ValueError, "keep"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2, 3])), ValueError, r"keep must be \[B=2\]"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1.0, 2.0])), TypeError, "keep must be int64"),
        (lambda: bk.select_tokens_varlen(x, s.abs(), mass=0.0), ValueError, r"mass=0.0 must be a float in \(0, 1\]"),
        (lambda: bk.select_tokens_varlen(x, s.abs(), mass=1.2), ValueError, "mass"),
        (lambda: bk.select_tokens_varlen(x, s.abs(), mass=0.5, min_keep=9), ValueError, "min_keep=9"),
        (lambda: bk.select_tokens_varlen(x, s, mass=0.5), ValueError, "non-negative scores"),
        (lambda: bk.select_tokens_varlen(x, torch.zeros_like(s), mass=0.5), ValueError, "positive sum"),
        (lambda: bk.select_tokens_varlen(x, s * float("nan"), keep=torch.tensor([1, 1])), ValueError, "finite"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2]), total=9, max_seqlen=4), ValueError, "total=9 must be the number of packed rows, sum.* = 7"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2]), total=9), ValueError, "total=9 must be"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2]), total=1), ValueError, r"total=1 must be in"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2]), total=7, max_seqlen=3), ValueError, "max_seqlen=3 is smaller than the longest sequence \\(4\\)"),
        (lambda: bk.select_tokens_varlen(x, s, keep=torch.tensor([1, 2]), max_seqlen=3), ValueError, "max_seqlen=3 is smaller"),
    ],
)
def test_select_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


q = torch.randn(2, 3, 4, 8)
k = torch.randn(2, 3, 10, 8)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bk.relevance_scores(q[0], k), ValueError, "q must have 4 dims"),
        (lambda: bk.relevance_scores(q.long(), k), TypeError, "q must be"),
        (lambda: bk.relevance_scores(q, k.half()), TypeError, "k must be float32"),
        (lambda: bk.relevance_scores(q, k[:, :2]), ValueError, r"k must be \[B=2, H=3, N, d=8\]"),
        (lambda: bk.relevance_scores(q[:, :, :0], k), ValueError, "T >= 1"),
        (lambda: bk.relevance_scores(q, k, q_mask=torch.ones(2, 4)), TypeError, "q_mask must be bool"),
        (lambda: bk.relevance_scores(q, k, q_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"q_mask must be \[B=2, T=4\]"),
        (lambda: bk.relevance_scores(q, k, q_mask=torch.tensor([[True] * 4, [False] * 4])), ValueError, "at least one True"),
    ],
)
def test_relevance_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


qa = torch.randn(10, 2, 8)
cu = torch.tensor([0, 4, 10], dtype=torch.int32)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bk.varlen_attention(qa[0], qa, qa, cu, 6), ValueError, "q must have 3 dims"),
        (lambda: bk.varlen_attention(qa, qa.half(), qa, cu, 6), TypeError, "k must be float32"),
        (lambda: bk.varlen_attention(qa, qa, qa[:9], cu, 6), ValueError, "v must have q's shape"),
        (lambda: bk.varlen_attention(qa[..., :6], qa[..., :6], qa[..., :6], cu, 6), ValueError, "multiple of 8"),
        (lambda: bk.varlen_attention(qa, qa, qa, cu.long(), 6), TypeError, "cu_seqlens must be int32"),
        (lambda: bk.varlen_attention(qa, qa, qa, torch.tensor([1, 4, 10], dtype=torch.int32), 6), ValueError, "start at 0"),
        (lambda: bk.varlen_attention(qa, qa, qa, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6), ValueError, "non-decreasing"),
        (lambda: bk.varlen_attention(qa, qa, qa, torch.tensor([0, 4, 9], dtype=torch.int32), 6), ValueError, "end at total=10"),
        (lambda: bk.varlen_attention(qa, qa, qa, cu, 5), ValueError, "max_seqlen=5 is smaller"),
        (lambda: bk.varlen_attention(qa, qa, qa, cu, -1), ValueError, "max_seqlen=-1"),
        (lambda: bk.varlen_attention(qa, qa, qa, cu, 6, key_bias=torch.randn(10, 3)), ValueError, r"key_bias must be \[total=10, H=2\]"),
        (lambda: bk.varlen_attention(qa, qa, qa, cu, 6, key_bias=torch.ones(10, dtype=torch.long)), TypeError, "key_bias must be"),
        (lambda: bk.varlen_attention(qa, qa, qa, cu, 6, causal=1), TypeError, "causal must be a bool"),
        (lambda: bk.unpack(qa, torch.tensor([0, 4, 11], dtype=torch.int32), 7), ValueError, "end at total=10"),
        (lambda: bk.unpack(qa, cu, 5), ValueError, "max_seqlen=5 is smaller"),
        (lambda: bk.pack(qa, [2, 3] + [0] * 8), ValueError, r"lengths\[1\]=3 must be in \[0, 2\]"),
        (lambda: bk.pack(qa, [1]), ValueError, "lengths must have B=10"),
        (lambda: bk.pack(qa, torch.tensor([1.0] * 10)), TypeError, "lengths must be an integer"),
        (lambda: bk.pack(qa, torch.tensor([1] * 9)), ValueError, "lengths must have B=10 entries, got 9"),
        (lambda: bk.pack(qa, torch.tensor([1] * 9 + [3])), ValueError, r"lengths\[9\]=3 must be in \[0, 2\]"),
        (lambda: bk.pack(qa, torch.tensor([1] * 10), total=11, max_seqlen=2), ValueError, "total=11 must be sum"),
        (lambda: bk.pack(qa, [1] * 10, total=9), ValueError, "total=9 must be sum"),
        (lambda: bk.pack(qa, torch.tensor([2] + [1] * 9), max_seqlen=1), ValueError, "max_seqlen=1 is smaller"),
    ],
)
def test_attention_and_pack_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_device_mismatch_is_named():
    meta = torch.randn(2, 8, device="meta")
    with pytest.raises(ValueError, match="scores must be on cpu"):
        bk.select_tokens(x, meta, 3)


@pytest.mark.skipif(not bk._ext.compiled(), reason="extension not built")
@given(
    lengths=st.lists(st.integers(-3, 12), min_size=1, max_size=5),
    total_shift=st.integers(-2, 2),
    L=st.integers(0, 10),
)
def test_cpu_kernel_rejects_malformed_cu_seqlens_directly(lengths, total_shift, L):
    """Called straight through torch.ops (no Python validation), the C++ side raises, never crashes."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    packed = torch.randn(max(cu[-1] + total_shift, 0), 3)
    ok = all(0 <= n <= L for n in lengths) and cu[-1] == packed.shape[0]
    ops = bk._ext.ops()
    if ok:
        out = ops.unpack(packed, cu_t, L)
        assert torch.equal(ops.pack(out, cu_t, packed.shape[0]), packed)
    else:
        with pytest.raises(RuntimeError, match="bus_kernels_C::unpack"):
            ops.unpack(packed, cu_t, L)
