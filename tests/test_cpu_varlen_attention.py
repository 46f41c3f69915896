"""The compiled CPU kernel of ``varlen_attention`` (``csrc/cpu/varlen_attention.cpp``).

A hypothesis fuzz against the reference (``backend="torch"``), direct calls of
``torch.ops.bus_kernels_C.varlen_attention`` / ``_backward`` with malformed inputs (Python's
validation is bypassed there, so the C++ checks are all that stands between a bad tensor and an
out-of-bounds read), and sequences longer than the kernel's query and key tiles (128 and 256).
Tolerances are those of ``test_kernels_varlen_attention.py``.
"""
import pytest
import torch
from conftest import TOL, assert_exp_range, require_backend
from hypothesis import given
from hypothesis import strategies as st
from test_kernels_varlen_attention import _assert_close

import bus_kernels
from bus_kernels.ops.varlen_attention import IMPLEMENTED

NAMES = ("out", "dq", "dk", "dv", "dbias")


@pytest.fixture(autouse=True, scope="module")
def _cpu_backend():
    require_backend("cpu", IMPLEMENTED)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(seed, lens, H, d, dtype, bias_mode, masked=0.0):
    """q, k, v, key bias (a share `masked` of its entries -inf), upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, H, d, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    kb = None
    if bias_mode is not None:
        kb = torch.randn((total, H) if bias_mode == "per_head" else (total,), generator=gen)
        kb = kb.masked_fill(torch.rand(kb.shape, generator=gen) < masked, float("-inf")).requires_grad_()
    grad = torch.randn(total, H, d, generator=gen).to(dtype)
    return q, k, v, kb, grad


def _run(backend, q, k, v, kb, grad, cu, max_seqlen, causal):
    out = bus_kernels.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, key_bias=kb, backend=backend)
    inputs = [q, k, v] + ([kb] if kb is not None else [])
    return [out] + list(torch.autograd.grad(out, inputs, grad))


def _compare(lens, H, d, dtype, causal, bias_mode, seed, slack=0, masked=0.0):
    q, k, v, kb, grad = _inputs(seed, lens, H, d, dtype, bias_mode, masked)
    cu = _cu(lens)
    max_seqlen = max(lens) + slack
    want = _run("torch", q, k, v, kb, grad, cu, max_seqlen, causal)
    got = _run("cpu", q, k, v, kb, grad, cu, max_seqlen, causal)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        if g.numel():  # _assert_close's relative bound needs a maximum
            _assert_close(g, w, dtype, name)


lengths = st.lists(st.one_of(st.integers(0, 2), st.integers(0, 40), st.integers(120, 140)), min_size=1, max_size=4)


@given(
    lens=lengths,
    H=st.integers(1, 3),
    d=st.sampled_from([8, 16, 24, 64]),
    causal=st.booleans(),
    bias_mode=st.sampled_from([None, "per_head", "per_key"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    slack=st.integers(0, 3),
    masked=st.sampled_from([0.0, 0.0, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_matches_reference(lens, H, d, causal, bias_mode, dtype, slack, masked, seed):
    _compare(lens, H, d, dtype, causal, bias_mode, seed, slack, masked if bias_mode else 0.0)


@pytest.mark.parametrize(
    "lens,H,causal,bias_mode,dtype",
    [
        ([300], 1, False, "per_key", torch.float32),  # one head only: the forward splits its queries
        ([300], 1, True, None, torch.float32),
        ([300, 5, 0, 129], 2, False, "per_head", torch.float32),
        ([300, 5, 0, 129], 2, True, "per_key", torch.float32),
        ([300, 1, 257], 2, True, "per_head", torch.bfloat16),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_longer_than_tiles(lens, H, causal, bias_mode, dtype):
    """300 and 257 keys: several query tiles, two key tiles (the online-softmax rescale)."""
    _compare(lens, H, 64, dtype, causal, bias_mode, seed=7)


def test_threads_agree():
    """Each task runs whole on one thread whatever the thread count (and however the forward
    splits a head's queries into tasks), so results are bitwise equal across thread counts."""
    lens, H = [300, 200, 0, 7], 1
    q, k, v, kb, grad = _inputs(3, lens, H, 32, torch.float32, "per_key")
    cu = _cu(lens)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_run("cpu", q, k, v, kb, grad, cu, 300, True))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, g, w in zip(NAMES, other, results[0]):
            assert torch.equal(g, w), name


# ------------------------------------------------------------------------------ exp's range
# The kernel's vectorised exp (csrc/cpu/vec8.h, vexp) at the edges of its range: exp(-inf) = 0 for
# -inf-masked keys (a clamp alone would give 1e-38 there, and a fully masked row a uniform softmax
# instead of zeros), accurate down to ln(FLT_MIN) ~ -87.34, at most the true value below it, never
# garbage from an out-of-range exponent. relevance_scores shares it (test_cpu_relevance.py).
EDGE_BIAS = [0.0, -3.0, -10.0, -50.0, -87.0, -87.2, -87.3, -87.5, -88.0, -100.0, -150.0, -1e4, -1e30, float("-inf")]


@pytest.mark.parametrize("causal", [False, True])
def test_exp_range_of_masked_and_very_negative_logits(causal):
    """q = 0 makes every logit the key bias exactly, and one-hot v rows make out[i, h, j] the
    probability of key j, so each probability is checked on its own against the float64 reference.
    Sequences: the edge logits, a wholly masked one, one whose first key is masked (with causal,
    its first query sees no key), the edge logits reversed."""
    n = len(EDGE_BIAS)
    seqs = [EDGE_BIAS, [float("-inf")] * 3, [float("-inf"), 0.0, -90.0], EDGE_BIAS[::-1]]
    lens = [len(b) for b in seqs]
    total, H, d = sum(lens), 2, 16
    cu = _cu(lens)
    gen = torch.Generator().manual_seed(11)
    q = torch.zeros(total, H, d)
    k = torch.randn(total, H, d, generator=gen)
    v = torch.zeros(total, H, d)
    for b in range(len(lens)):
        for j in range(lens[b]):
            v[int(cu[b]) + j, :, j] = 1.0
    bias = torch.tensor([x for b in seqs for x in b])
    grad = torch.randn(total, H, d, generator=gen)
    got = _run("cpu", *(t.clone().requires_grad_() for t in (q, k, v, bias)), grad, cu, n, causal)
    want = _run("torch", *(t.double().requires_grad_() for t in (q, k, v, bias)), grad.double(), cu, n, causal)
    assert torch.isfinite(got[0]).all()
    assert_exp_range(got[0], want[0])
    masked_rows = torch.arange(int(cu[1]), int(cu[2]))
    assert (got[0][masked_rows] == 0).all()
    if causal:  # the first query of the third sequence sees only its masked first key
        assert (got[0][int(cu[2])] == 0).all()
    _, lse = torch.ops.bus_kernels_C.varlen_attention(q, k, v, cu, n, 0.25, causal, bias)
    assert (lse[masked_rows] == float("-inf")).all()
    for name, g, w in zip(NAMES[1:], got[1:], want[1:]):
        assert torch.isfinite(g).all(), name
        _assert_close(g, w.float(), torch.float32, name)


# --------------------------------------------------------------------------- malformed input
TOTAL, H, D = 8, 2, 16


def _good():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(TOTAL, H, D, generator=gen) for _ in range(3))
    return dict(q=q, k=k, v=v, cu=_cu([3, 0, 5]), max_seqlen=5, scale=0.25, causal=False,
                key_bias=torch.randn(TOTAL, H, generator=gen))


def _forward(**change):
    a = {**_good(), **change}
    return torch.ops.bus_kernels_C.varlen_attention(
        a["q"], a["k"], a["v"], a["cu"], a["max_seqlen"], a["scale"], a["causal"], a["key_bias"]
    )


def _backward(**change):
    a = _good()
    out, lse = _forward()
    a = {**a, "grad": torch.randn_like(out), "out": out, "lse": lse, **change}
    return torch.ops.bus_kernels_C.varlen_attention_backward(
        a["grad"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["cu"], a["max_seqlen"], a["scale"],
        a["causal"], a["key_bias"],
    )


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


BAD_FORWARD = [
    ("q rank 2", dict(q=torch.randn(TOTAL, H * D)), r"q must be \[total, H, d\]"),
    ("k shape", dict(k=torch.randn(TOTAL, H + 1, D)), r"k must have q's shape"),
    ("v rows", dict(v=torch.randn(TOTAL - 1, H, D)), r"v must have q's shape"),
    ("v dtype", dict(v=torch.randn(TOTAL, H, D, dtype=torch.float64)), r"v must have q's dtype"),
    ("q float64", {n: torch.randn(TOTAL, H, D, dtype=torch.float64) for n in "qkv"}, r"float32, float16 or bfloat16"),
    ("q int", {n: torch.ones(TOTAL, H, D, dtype=torch.int32) for n in "qkv"}, r"float32, float16 or bfloat16"),
    ("cu int64", dict(cu=torch.tensor([0, 3, 3, 8])), r"cu_seqlens must be int32"),
    ("cu 2-D", dict(cu=_i32([[0, 3], [3, 8]])), r"cu_seqlens must be 1-D"),
    ("cu empty", dict(cu=_i32([])), r"cu_seqlens must be 1-D"),
    ("cu start", dict(cu=_i32([1, 3, 8])), r"must start at 0"),
    ("cu decreasing", dict(cu=_i32([0, 5, 3, 8])), r"non-decreasing"),
    ("cu short of total", dict(cu=_i32([0, 3, 7])), r"must end at total=8"),
    ("cu past total", dict(cu=_i32([0, 3, 9]), max_seqlen=9), r"must end at total=8"),
    ("cu far past total", dict(cu=_i32([0, 3, 2**31 - 1])), r"has length"),
    ("max_seqlen small", dict(max_seqlen=4), r"sequence 2 has length 5 > 4"),
    ("max_seqlen negative", dict(max_seqlen=-1), r"max_seqlen must be >= 0"),
    ("bias heads", dict(key_bias=torch.randn(TOTAL, H + 1)), r"key_bias must be \[total=8, H=2\] or \[total=8\]"),
    ("bias rows", dict(key_bias=torch.randn(TOTAL + 1)), r"key_bias must be \[total=8, H=2\] or \[total=8\]"),
    ("bias rank 3", dict(key_bias=torch.randn(TOTAL, H, 1)), r"key_bias must be \[total=8, H=2\] or \[total=8\]"),
    ("bias int", dict(key_bias=torch.ones(TOTAL, dtype=torch.int64)), r"key_bias must be a float tensor"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in BAD_FORWARD], ids=[c[0] for c in BAD_FORWARD])
def test_forward_rejects(change, match):
    with pytest.raises(RuntimeError, match=r"bus_kernels_C::varlen_attention: .*" + match):
        _forward(**change)


BAD_BACKWARD = [
    ("lse 1-D", dict(lse=torch.zeros(TOTAL)), r"lse must be \[total=8, H=2\]"),
    ("lse heads", dict(lse=torch.zeros(TOTAL, H + 1)), r"lse must be \[total=8, H=2\]"),
    ("lse float64", dict(lse=torch.zeros(TOTAL, H, dtype=torch.float64)), r"lse must be float32"),
    ("grad shape", dict(grad=torch.randn(TOTAL, H, D + 8)), r"grad must have q's shape"),
    ("grad dtype", dict(grad=torch.randn(TOTAL, H, D, dtype=torch.bfloat16)), r"grad must have q's dtype"),
    ("out shape", dict(out=torch.randn(TOTAL + 1, H, D)), r"out must have q's shape"),
    ("k shape", dict(k=torch.randn(TOTAL, H, D + 8)), r"k must have q's shape"),
    ("cu short of total", dict(cu=_i32([0, 3, 7])), r"must end at total=8"),
    ("max_seqlen small", dict(max_seqlen=3), r"has length 5 > 3"),
    ("bias rows", dict(key_bias=torch.randn(TOTAL - 1, H)), r"key_bias must be \[total=8, H=2\]"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in BAD_BACKWARD], ids=[c[0] for c in BAD_BACKWARD])
def test_backward_rejects(change, match):
    with pytest.raises(RuntimeError, match=r"bus_kernels_C::varlen_attention_backward: .*" + match):
        _backward(**change)


def test_direct_call_outputs():
    """The raw op: lse float32 [total, H], dbias in key_bias's shape and dtype, or empty [0]."""
    out, lse = _forward()
    assert out.shape == (TOTAL, H, D) and lse.dtype == torch.float32 and lse.shape == (TOTAL, H)
    dq, dk, dv, dbias = _backward(key_bias=torch.randn(TOTAL, dtype=torch.float64))
    assert dbias.shape == (TOTAL,) and dbias.dtype == torch.float64
    assert dq.shape == dk.shape == dv.shape == (TOTAL, H, D)
    *_, dbias = _backward(key_bias=None)
    assert dbias.shape == (0,)
    # non-contiguous inputs are made contiguous, not misread
    q = torch.randn(H, TOTAL, D).transpose(0, 1)
    out_t, _ = _forward(q=q)
    out_c, _ = _forward(q=q.contiguous())
    torch.testing.assert_close(out_t, out_c, **TOL[torch.float32])
