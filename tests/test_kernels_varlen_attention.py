"""``varlen_attention`` on the fused backends (Triton, compiled CPU and CUDA): forward and backward against the reference
(``backend="torch"``) and against per-sequence ``scaled_dot_product_attention`` in float64.

Sizes are small: without a GPU these run through the Triton interpreter.

Tolerances: fp32 outputs and gradients use ``TOL[float32]``. fp16/bf16: the kernel rounds P and dS
to the input dtype before its dots (as FlashAttention does) and computes delta from the rounded
output, while the reference accumulates everything in fp32 and rounds once; so outputs get twice
``TOL[dtype]`` and gradients a bound relative to the largest reference gradient (``LOW_GRAD_TOL``).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, require_backend

import bus_kernels
from bus_kernels.ops.varlen_attention import IMPLEMENTED

# max |triton - torch| / max |torch| for gradients in half precision
LOW_GRAD_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture
def device(fused):
    return require_backend(fused, IMPLEMENTED)


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(gen, lens, H, d, dtype, bias_mode, device):
    total = sum(lens)
    q, k, v = (torch.randn(total, H, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    kb = None
    if bias_mode == "per_head":
        kb = torch.randn(total, H, generator=gen).to(device).requires_grad_()
    elif bias_mode == "per_key":
        kb = torch.randn(total, generator=gen).to(device).requires_grad_()
    grad = torch.randn(total, H, d, generator=gen).to(device, dtype)
    return q, k, v, kb, grad


def _run(backend, q, k, v, kb, grad, cu, max_seqlen, causal, scale=None):
    out = bus_kernels.varlen_attention(q, k, v, cu, max_seqlen, scale=scale, causal=causal, key_bias=kb, backend=backend)
    inputs = [q, k, v] + ([kb] if kb is not None else [])
    return [out] + list(torch.autograd.grad(out, inputs, grad))


def _assert_close(got, want, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"{what}: {m}")
        return
    if what == "out":
        tol = {key: 2 * val for key, val in TOL[dtype].items()}
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{what}: {m}")
        return
    err = (got.float() - want.float()).abs().max().item()
    ref = want.float().abs().max().item()
    assert err <= LOW_GRAD_TOL[dtype] * max(ref, 1e-3), f"{what}: max error {err:.3g} vs max |ref| {ref:.3g}"


NAMES = ("out", "dq", "dk", "dv", "dbias")

CASES = [
    # dtype, d, causal, bias mode
    (torch.float32, 16, False, None),
    (torch.float32, 16, True, "per_head"),
    (torch.float32, 40, False, "per_key"),
    (torch.float32, 40, True, None),
    (torch.float32, 64, False, "per_head"),
    (torch.float32, 64, True, "per_key"),
    (torch.float16, 40, True, "per_head"),
    (torch.float16, 64, False, None),
    (torch.bfloat16, 16, False, "per_key"),
    (torch.bfloat16, 64, True, "per_head"),
]


@pytest.mark.parametrize("dtype,d,causal,bias_mode", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference(fused, device, gen, dtype, d, causal, bias_mode):
    # lengths 0 and 1, one longer than a tile, max_seqlen larger than needed
    lens = [3, 0, 1, 70, 17]
    cu = _cu(lens, device)
    q, k, v, kb, grad = _inputs(gen, lens, 2, d, dtype, bias_mode, device)
    want = _run("torch", q, k, v, kb, grad, cu, max(lens) + 9, causal)
    got = _run(fused, q, k, v, kb, grad, cu, max(lens) + 9, causal)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _assert_close(g, w, dtype, name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 40, 64])
def test_matches_sdpa_float64(fused, device, gen, d, causal):
    lens = [5, 1, 0, 66, 30]
    cu = _cu(lens, device)
    q, k, v, _, grad = _inputs(gen, lens, 3, d, torch.float32, None, device)
    scale = 0.3
    got = _run(fused, q, k, v, None, grad, cu, 100, causal, scale=scale)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q64, k64, v64))  # [H, L, d]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
    out64 = torch.cat(outs)
    want = [out64] + list(torch.autograd.grad(out64, (q64, k64, v64), grad.double()))
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


def test_strided_inputs_and_scale(fused, device, gen):
    """q, k, v as views of a packed qkv tensor (non-contiguous token stride), custom scale."""
    lens = [9, 20]
    cu = _cu(lens, device)
    qkv = torch.randn(sum(lens), 3, 2, 24, generator=gen).to(device).requires_grad_()
    grad = torch.randn(sum(lens), 2, 24, generator=gen).to(device)
    kb = torch.randn(sum(lens), 2, generator=gen).to(device).t().contiguous().t().requires_grad_()  # column-major
    q, k, v = qkv.unbind(1)
    res = {}
    for backend in ("torch", fused):
        out = bus_kernels.varlen_attention(q, k, v, cu, 20, scale=0.2, key_bias=kb, backend=backend)
        res[backend] = [out] + list(torch.autograd.grad(out, (qkv, kb), grad))
    for name, g, w in zip(("out", "dqkv", "dbias"), res[fused], res["torch"]):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


def test_masked_rows_give_zeros(fused, device, gen):
    """A -inf key bias on every key of a sequence leaves its queries nothing: zeros, finite grads."""
    lens = [4, 6, 1]
    cu = _cu(lens, device)
    q, k, v, kb, grad = _inputs(gen, lens, 2, 16, torch.float32, "per_head", device)
    bias = kb.detach().clone()
    bias[4:10] = float("-inf")  # all of sequence 1
    bias[0, 0] = float("-inf")  # one key of sequence 0, head 0
    bias = bias.requires_grad_()
    for causal in (False, True):
        want = _run("torch", q, k, v, bias, grad, cu, 6, causal)
        got = _run(fused, q, k, v, bias, grad, cu, 6, causal)
        assert torch.equal(got[0][4:10], torch.zeros_like(got[0][4:10]))
        if causal:  # query 0 of sequence 0 sees only key 0, which head 0 masks
            assert torch.equal(got[0][0, 0], torch.zeros_like(got[0][0, 0]))
        for name, g, w in zip(NAMES, got, want):
            assert torch.isfinite(g).all(), name
            torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


def test_empty_and_degenerate(fused, device, gen):
    """No tokens at all; and only length-0/1 sequences (a query attends just itself)."""
    cu = _cu([0, 0], device)
    q = torch.zeros(0, 2, 8, device=device, requires_grad=True)
    out = bus_kernels.varlen_attention(q, q, q, cu, 0, backend=fused)
    assert out.shape == (0, 2, 8)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert dq.shape == (0, 2, 8)

    lens = [1, 0, 1, 1]
    cu = _cu(lens, device)
    q, k, v, kb, grad = _inputs(gen, lens, 2, 8, torch.float32, "per_key", device)
    got = _run(fused, q, k, v, kb, grad, cu, 5, False)
    torch.testing.assert_close(got[0], v.detach(), **TOL[torch.float32])  # softmax over one key is 1
    for g in (got[1], got[4]):  # dq = 0 and d bias = 0, up to rounding of P = 1
        torch.testing.assert_close(g, torch.zeros_like(g), **TOL[torch.float32])
    torch.testing.assert_close(got[3], grad, **TOL[torch.float32])  # dv = upstream grad


def test_lse_matches_reference(fused, device, gen):
    from bus_kernels.ops.varlen_attention import _attn_op

    lens = [7, 0, 40]
    cu = _cu(lens, device)
    q, k, v, kb, _ = _inputs(gen, lens, 2, 32, torch.float32, "per_head", device)
    for causal in (False, True):
        _, lse_t = _attn_op(q, k, v, cu, 48, 32**-0.5, causal, kb, fused)
        _, lse_r = _attn_op(q, k, v, cu, 48, 32**-0.5, causal, kb, "torch")
        assert lse_t.dtype == torch.float32 and lse_t.shape == (sum(lens), 2)
        torch.testing.assert_close(lse_t, lse_r, **TOL[torch.float32])
        assert math.isfinite(lse_t.sum().item())


def test_opcheck(fused, device, gen):
    """The custom op on the Triton backend passes torch.library.opcheck (schema, fake, autograd)."""
    from bus_kernels.ops.varlen_attention import _attn_op

    cu = _cu([3, 0, 5], device)
    q, k, v, kb, _ = _inputs(gen, [3, 0, 5], 2, 16, torch.float32, "per_key", device)
    torch.library.opcheck(_attn_op, (q, k, v, cu, 6, 0.25, True, kb, fused))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_seqlen_pad", [0, 200])
def test_long_and_short_sequence_tiles(fused, device, gen, causal, max_seqlen_pad):
    """16-bit inputs: 64-query tiles when every sequence is short, 128 otherwise (max_seqlen over
    192); key tiles unmasked except at the sequence's end and on the causal diagonal."""
    lens = [130, 3, 64, 65]
    cu = _cu(lens, device)
    q, k, v, kb, grad = _inputs(gen, lens, 1, 32, torch.bfloat16, "per_key", device)
    max_seqlen = max(lens) + max_seqlen_pad
    want = _run("torch", q, k, v, kb, grad, cu, max_seqlen, causal)
    got = _run(fused, q, k, v, kb, grad, cu, max_seqlen, causal)
    for name, g, w in zip(NAMES, got, want):
        _assert_close(g, w, torch.bfloat16, name)


@pytest.mark.parametrize("causal", [False, True])
def test_very_negative_bias_with_partial_tiles(fused, device, gen, causal):
    """Every key of a sequence biased by -100 (log-sum-exp near -100: exp2 of a padded key's
    0 - lse overflows fp32): key and query tiles that straddle the sequence's end must still give
    finite results equal to the reference's (the Triton dK/dV kernel masks scores only on the
    causal diagonal; rows past the end are never stored, and the dQ kernel masks the last key
    tile). Tolerance 2e-4: logits near -100 keep ~1e-5 relative precision in fp32, in every
    backend."""
    lens = [45, 70]
    cu = _cu(lens, device)
    q, k, v, kb, grad = _inputs(gen, lens, 2, 40, torch.float32, "per_head", device)
    bias = kb.detach().clone()
    bias[:45] -= 100.0
    bias = bias.requires_grad_()
    want = _run("torch", q, k, v, bias, grad, cu, 70, causal)
    got = _run(fused, q, k, v, bias, grad, cu, 70, causal)
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")
