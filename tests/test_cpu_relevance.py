"""The compiled CPU kernel of relevance_scores (csrc/cpu/relevance.cpp): fuzzed against the
reference, its entry points called directly with malformed input, and numerically hard cases."""
import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bus_kernels as bk
from bus_kernels import reference
from conftest import TOL, assert_exp_range, require_backend

IMPLEMENTED = importlib.import_module("bus_kernels.ops.relevance").IMPLEMENTED
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OP = "bus_kernels_C::relevance_scores"


def _ops():
    require_backend("cpu", IMPLEMENTED)
    return torch.ops.bus_kernels_C


def _inputs(gen, B, H, T, N, d, dtype, masked):
    q = torch.randn(B, H, T, d, generator=gen).to(dtype)
    k = torch.randn(B, H, N, d, generator=gen).to(dtype)
    q_mask = None
    if masked:
        q_mask = torch.rand(B, T, generator=gen) < 0.5
        q_mask[torch.arange(B), torch.randint(0, T, (B,), generator=gen)] = True
    return q, k, q_mask


def _score_tol(dtype):
    # Scores are fp32 from either side; low-precision inputs differ only by dot rounding.
    return TOL[torch.float32 if dtype == torch.float32 else torch.float16]


def _check_against_reference(q, k, q_mask, scale=None, gen=None):
    """Scores, lse and both gradients of the cpu kernel vs the reference."""
    dtype = q.dtype
    qc, kc = q.clone().requires_grad_(), k.clone().requires_grad_()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    s = bk.relevance_scores(qc, kc, scale=scale, q_mask=q_mask, backend="cpu")
    s_ref = bk.relevance_scores(qr, kr, scale=scale, q_mask=q_mask, backend="torch")
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, **_score_tol(dtype))
    g = torch.randn(s.shape, generator=gen)
    dq, dk = torch.autograd.grad(s, (qc, kc), g)
    dq_ref, dk_ref = torch.autograd.grad(s_ref, (qr, kr), g)
    assert dq.dtype == dtype and dk.dtype == dtype
    torch.testing.assert_close(dq, dq_ref, **TOL[dtype])
    torch.testing.assert_close(dk, dk_ref, **TOL[dtype])
    if q_mask is not None:  # padding tokens get exactly no gradient
        assert (dq.transpose(1, 2)[~q_mask] == 0).all()


# ----------------------------------------------------------------------------- vs the reference
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    T=st.integers(1, 9),
    N=st.integers(1, 70),
    d=st.sampled_from([8, 16, 24, 64]),
    masked=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_fuzz_matches_reference(B, H, T, N, d, masked, dtype, seed):
    _ops()
    gen = torch.Generator().manual_seed(seed)
    q, k, q_mask = _inputs(gen, B, H, T, N, d, dtype, masked)
    _check_against_reference(q, k, q_mask, gen=gen)


@pytest.mark.parametrize("d", [1, 3, 12, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dim_not_multiple_of_8(d, dtype):
    """The kernel pads rows to 8 floats in scratch; the tail must neither leak nor be dropped."""
    _ops()
    gen = torch.Generator().manual_seed(d)
    q, k, q_mask = _inputs(gen, 2, 2, 5, 19, d, dtype, masked=True)
    _check_against_reference(q, k, q_mask, scale=0.3, gen=gen)


@pytest.mark.parametrize("threads", [1, 4])
def test_sample_and_pair_parallel_paths(threads):
    """B >= threads: one task per sample; fewer samples than threads: (b, h) tasks and a head sum."""
    _ops()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        q, k, q_mask = _inputs(gen, 2, 3, 4, 45, 16, torch.float32, masked=True)
        _check_against_reference(q, k, q_mask, gen=gen)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_dk_streamed(dtype):
    """dk of 8 MB or more is written with non-temporal stores."""
    _ops()
    gen = torch.Generator().manual_seed(5)
    B = 2 if dtype == torch.float32 else 4
    q, k, q_mask = _inputs(gen, B, 4, 3, 1031, 256, dtype, masked=True)
    assert k.nbytes >= 8 << 20
    _check_against_reference(q, k, q_mask, gen=gen)


def test_lse_and_direct_call_on_strided_inputs():
    ops = _ops()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 16, generator=gen).transpose(1, 2)  # [B, H, T, d], not contiguous
    k = torch.randn(2, 3, 16, 40, generator=gen).transpose(2, 3)
    q_mask = torch.tensor([[True, False, True, True, False, False, True]] * 2).t().contiguous().t()
    s, lse = ops.relevance_scores(q, k, 0.25, q_mask)
    s_ref, lse_ref = reference.relevance_scores(q, k, 0.25, q_mask)
    torch.testing.assert_close(s, s_ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, lse_ref, **TOL[torch.float32])
    g = torch.randn(2, 40, generator=gen)
    dq, dk = ops.relevance_scores_backward(g, q, k, lse, 0.25, q_mask)
    dq_ref, dk_ref = reference.relevance_scores_backward(g, q, k, 0.25, q_mask)
    torch.testing.assert_close(dq, dq_ref, **TOL[torch.float32])
    torch.testing.assert_close(dk, dk_ref, **TOL[torch.float32])


def test_no_patches():
    """N = 0: empty scores, lse = -inf (logsumexp of nothing), zero dq."""
    ops = _ops()
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 0, 8)
    s, lse = ops.relevance_scores(q, k, 0.5, None)
    assert s.shape == (2, 0) and lse.shape == (2, 3, 4) and (lse == float("-inf")).all()
    dq, dk = ops.relevance_scores_backward(torch.zeros(2, 0), q, k, lse, 0.5, None)
    assert dk.shape == k.shape and (dq == 0).all()


# ------------------------------------------------------------------------------ hard numerics
def test_large_logits_are_stable():
    """|logits| in the thousands: the max subtraction keeps exp finite; rows still sum to 1."""
    _ops()
    gen = torch.Generator().manual_seed(3)
    q, k, q_mask = _inputs(gen, 2, 3, 5, 60, 16, torch.float32, masked=True)
    q, k = (q * 40).requires_grad_(), (k * 40).requires_grad_()
    s = bk.relevance_scores(q, k, scale=1.0, q_mask=q_mask, backend="cpu")
    s_ref = bk.relevance_scores(q, k, scale=1.0, q_mask=q_mask, backend="torch")
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, s_ref, **TOL[torch.float32])
    torch.testing.assert_close(s.sum(1), torch.ones(2), **TOL[torch.float32])
    dq, dk = torch.autograd.grad(s, (q, k), torch.randn(2, 60, generator=gen))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_common_offset_is_stable(dtype):
    """Logits of 3000 to 4000 (exp overflows fp32 past 88): only exp(logit - max) stays finite.
    Inputs are multiples of 1/8 near 2 and 24, exact in every dtype, so every dot product is exact
    in any summation order. The truth is the float64 reference: the fp32 reference forms
    exp(logit - lse) with lse rounded to fp32, which is off by |lse| * 2^-24 (2e-4) relative."""
    ops = _ops()
    gen = torch.Generator().manual_seed(4)
    q = (2 + torch.randint(0, 4, (2, 2, 3, 8), generator=gen) / 8).to(dtype)
    k = (24 + torch.randint(0, 16, (2, 2, 33, 8), generator=gen) / 8).to(dtype)
    s, lse = ops.relevance_scores(q, k, 8.0, None)
    s64, lse64 = reference.relevance_scores(q.double(), k.double(), 8.0, None)
    assert torch.isfinite(s).all() and lse.min() > 3000
    torch.testing.assert_close(s.double(), s64, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), lse64, **TOL[torch.float32])
    g = torch.randn(2, 33, generator=gen)
    dq, dk = ops.relevance_scores_backward(g, q, k, lse, 8.0, None)
    dq64, dk64 = reference.relevance_scores_backward(g.double(), q.double(), k.double(), 8.0, None)
    torch.testing.assert_close(dq, dq64.to(dtype), **TOL[dtype])
    torch.testing.assert_close(dk, dk64.to(dtype), **TOL[dtype])


EDGE_LOGITS = [0.0, -3.0, -10.0, -50.0, -87.0, -87.2, -87.3, -87.5, -88.0, -100.0, -150.0, -1e4, -1e30]


def test_exp_range_of_very_negative_logits():
    """logit - max from 0 down to -1e30 through the kernel's vectorised exp (csrc/cpu/vec8.h,
    shared with varlen_attention): q = e_0 and k = logit * e_0 give the logits exactly, with
    H = T = 1 every score is one probability, checked against the float64 reference (accurate
    down to ln(FLT_MIN), flushed or exact below, never garbage). N = 13 also runs the padded tail
    of the row (-inf) through exp. The second sample has the logits reversed."""
    ops = _ops()
    logits = torch.tensor([EDGE_LOGITS, EDGE_LOGITS[::-1]])
    N = logits.shape[1]
    q = torch.zeros(2, 1, 1, 8)
    q[..., 0] = 1.0
    k = torch.zeros(2, 1, N, 8)
    k[:, 0, :, 0] = logits
    s, lse = ops.relevance_scores(q, k, 1.0, None)
    s64, _ = reference.relevance_scores(q.double(), k.double(), 1.0, None)
    assert torch.isfinite(s).all()
    assert_exp_range(s, s64)
    g = torch.randn(2, N, generator=torch.Generator().manual_seed(6))
    dq, dk = ops.relevance_scores_backward(g, q, k, lse, 1.0, None)
    dq64, dk64 = reference.relevance_scores_backward(g.double(), q.double(), k.double(), 1.0, None)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    torch.testing.assert_close(dq, dq64.float(), **TOL[torch.float32])
    torch.testing.assert_close(dk, dk64.float(), **TOL[torch.float32])


# --------------------------------------------------------------------- malformed direct calls
q0, k0 = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 10, 8)
m0 = torch.ones(2, 4, dtype=torch.bool)
g0, lse0 = torch.randn(2, 10), torch.randn(2, 3, 4)
FWD_BAD = [
    ((q0[0], k0, 0.5, None), r"q must be \[B, H, T, d\]"),
    ((q0, k0[0], 0.5, None), r"k must be \[B, H, N, d\]"),
    ((q0, k0[:1], 0.5, None), r"k must be \[B=2, H=3, N, d=8\] to match q"),
    ((q0, k0[:, :2], 0.5, None), r"k must be \[B=2, H=3, N, d=8\] to match q"),
    ((q0, k0[..., :4], 0.5, None), r"k must be \[B=2, H=3, N, d=8\] to match q"),
    ((q0.long(), k0.long(), 0.5, None), "q must be float32, float16 or bfloat16"),
    ((q0.double(), k0.double(), 0.5, None), "q must be float32, float16 or bfloat16"),
    ((q0, k0.half(), 0.5, None), "k must have q's dtype"),
    ((q0[:, :, :0], k0, 0.5, None), "q must have T >= 1 text tokens"),
    ((q0, k0, 0.5, m0.float()), "q_mask must be bool"),
    ((q0, k0, 0.5, m0[:, :3]), r"q_mask must be \[B=2, T=4\]"),
    ((q0, k0, 0.5, m0[0]), r"q_mask must be \[B=2, T=4\]"),
    ((q0, k0, 0.5, torch.tensor([[True] * 4, [False] * 4])), "q_mask row 1 has no True"),
]
BWD_BAD = [
    ((g0[:, :9], q0, k0, lse0, 0.5, None), r"grad must be \[B=2, N=10\]"),
    ((g0[0], q0, k0, lse0, 0.5, None), r"grad must be \[B=2, N=10\]"),
    ((g0.double(), q0, k0, lse0, 0.5, None), "grad must be float32"),
    ((g0, q0, k0, lse0[:, :2], 0.5, None), r"lse must be \[B=2, H=3, T=4\]"),
    ((g0, q0, k0, lse0[0], 0.5, None), r"lse must be \[B=2, H=3, T=4\]"),
    ((g0, q0, k0, lse0.half(), 0.5, None), "lse must be float32"),
    ((g0, q0, k0[:, :1], lse0, 0.5, None), r"k must be \[B=2, H=3, N, d=8\]"),
    ((g0, q0.half(), k0, lse0, 0.5, None), "k must have q's dtype"),
    ((g0, q0, k0, lse0, 0.5, torch.zeros(2, 4, dtype=torch.bool)), "q_mask row 0 has no True"),
]


@pytest.mark.parametrize("args,match", FWD_BAD, ids=[m for _, m in FWD_BAD])
def test_forward_rejects_malformed_input(args, match):
    ops = _ops()
    with pytest.raises(RuntimeError, match=f"{OP}: {match}"):
        ops.relevance_scores(*args)


@pytest.mark.parametrize("args,match", BWD_BAD, ids=[m for _, m in BWD_BAD])
def test_backward_rejects_malformed_input(args, match):
    ops = _ops()
    with pytest.raises(RuntimeError, match=f"{OP}_backward: {match}"):
        ops.relevance_scores_backward(*args)
