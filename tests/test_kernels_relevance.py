"""Fused relevance_scores (Triton: interpreter on CPU, real kernels on a GPU; compiled CPU and
CUDA kernels) against the reference."""
import importlib

import pytest
import torch

import bus_kernels as bk
from conftest import TOL, require_backend

IMPLEMENTED = importlib.import_module("bus_kernels.ops.relevance").IMPLEMENTED


def _inputs(B, H, T, N, d, dtype, device, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_()
    q_mask = None
    if masked:
        q_mask = torch.rand(B, T, generator=g) < 0.5
        q_mask[:, -1] = True
        q_mask = q_mask.to(device)
    return q, k, q_mask


@pytest.mark.parametrize(
    "B,H,T,N,d",
    [(1, 1, 1, 1, 8), (2, 3, 1, 37, 16), (1, 2, 5, 70, 24), (2, 1, 17, 33, 64)],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_match_reference(fused, B, H, T, N, d, masked, dtype):
    device = require_backend(fused, IMPLEMENTED)
    q, k, q_mask = _inputs(B, H, T, N, d, dtype, device, masked)
    s = bk.relevance_scores(q, k, q_mask=q_mask, backend=fused)
    s_ref = bk.relevance_scores(q, k, q_mask=q_mask, backend="torch")
    assert s.dtype == torch.float32 and s.shape == (B, N)
    # Scores are fp32 from either backend; low-precision inputs differ only by dot rounding.
    torch.testing.assert_close(s, s_ref, **TOL[torch.float32 if dtype == torch.float32 else torch.float16])
    g = torch.randn(B, N, generator=torch.Generator().manual_seed(1)).to(device)
    dq, dk = torch.autograd.grad(s, (q, k), g)
    dq_ref, dk_ref = torch.autograd.grad(s_ref, (q, k), g)
    assert dq.dtype == dtype and dk.dtype == dtype
    torch.testing.assert_close(dq, dq_ref, **TOL[dtype])
    torch.testing.assert_close(dk, dk_ref, **TOL[dtype])


def test_large_logits_are_stable(fused):
    device = require_backend(fused, IMPLEMENTED)
    q, k, _ = _inputs(2, 2, 3, 50, 16, torch.float32, device, False)
    s = bk.relevance_scores(q * 40, k * 40, scale=1.0, backend=fused)
    s_ref = bk.relevance_scores(q * 40, k * 40, scale=1.0, backend="torch")
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, s_ref, **TOL[torch.float32])
