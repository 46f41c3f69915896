"""``relevance_scores``: text-to-patch relevance, the mean attention of the text on each patch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext, reference
from ._common import ANY_FLOAT, check_tensor, value_checks_enabled

IMPLEMENTED = ("torch", "triton") + _ext.kernels("relevance_scores")


def _forward_impl(q, k, scale, q_mask, backend):
    if backend == "triton":
        from ..triton.relevance import relevance_scores_forward

        return relevance_scores_forward(q, k, scale, q_mask)
    if backend in ("cpu", "cuda"):
        return tuple(_ext.ops().relevance_scores(q.contiguous(), k.contiguous(), scale, q_mask))
    return reference.relevance_scores(q, k, scale, q_mask)


def _backward_impl(grad, q, k, lse, scale, q_mask, backend):
    """(dq, dk), contiguous whatever the strides of q and k (the Triton kernels read strided
    views such as ``k[:, :, P:]`` of a fused qkv projection in place)."""
    if backend == "triton":
        from ..triton.relevance import relevance_scores_backward

        return relevance_scores_backward(grad, q, k, lse, scale, q_mask)
    if backend in ("cpu", "cuda"):
        return tuple(
            _ext.ops().relevance_scores_backward(grad, q.contiguous(), k.contiguous(), lse, scale, q_mask)
        )
    dq, dk = reference.relevance_scores_backward(grad, q, k, scale, q_mask)
    return dq.contiguous(), dk.contiguous()


def _out_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("bus_kernels::relevance_scores", mutates_args=())
def _relevance_op(
    q: Tensor, k: Tensor, scale: float, q_mask: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    # Value check inside the op so that compiled graphs are guarded too (one sync: value checks only).
    if q_mask is not None and value_checks_enabled(q.device) and not bool(q_mask.any(dim=1).all()):
        raise ValueError("relevance_scores: every row of q_mask needs at least one True (a real text token)")
    return _forward_impl(q, k, scale, q_mask, backend)


@_relevance_op.register_fake
def _(q, k, scale, q_mask, backend):
    B, H, T, _ = q.shape
    dt = _out_dtype(q)
    return q.new_empty((B, k.shape[2]), dtype=dt), q.new_empty((B, H, T), dtype=dt)


@torch.library.custom_op("bus_kernels::relevance_scores_backward", mutates_args=())
def _relevance_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, lse: Tensor, scale: float, q_mask: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad, q, k, lse, scale, q_mask, backend)


@_relevance_backward_op.register_fake
def _(grad, q, k, lse, scale, q_mask, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup(ctx, inputs, output):
    q, k, scale, q_mask, backend = inputs
    ctx.save_for_backward(q, k, output[1], q_mask)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad, _grad_lse):
    q, k, lse, q_mask = ctx.saved_tensors
    dq, dk = _relevance_backward_op(grad.contiguous(), q, k, lse, ctx.scale, q_mask, ctx.backend)
    return dq, dk, None, None, None


_relevance_op.register_autograd(_backward, setup_context=_setup)


def relevance_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: Optional[float] = None,
    q_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Relevance of every patch to the text: the mean over heads and text tokens of the attention
    distribution of each text query over the patches.

    ``s[b, n] = mean_h mean_{t: q_mask[b,t]} softmax_n(scale * <q[b,h,t], k[b,h,n]>)``

    Args:
        q: ``[B, H, T, d]`` text queries, T >= 1 (T = 1 for a text [CLS]).
        k: ``[B, H, N, d]`` patch keys, same dtype (fp32, fp16, bf16; fp64 on ``torch``) and device.
        scale: logit scale, default ``d ** -0.5``.
        q_mask: optional bool ``[B, T]``, True for real text tokens; each row needs one True
            (checked when value checks are on, see :func:`bus_kernels.set_value_checks`).
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``.

    Returns:
        float32 ``[B, N]`` (float64 for float64 inputs); each row sums to 1. Differentiable
        w.r.t. ``q`` and ``k``.
    """
    op = "relevance_scores"
    check_tensor(op, "q", q, ndim=4, dtypes=ANY_FLOAT, layout="[B, H, T, d]")
    check_tensor(op, "k", k, ndim=4, dtypes=(q.dtype,), device=q.device, layout="[B, H, N, d]")
    B, H, T, d = q.shape
    if T < 1:
        raise ValueError(f"{op}: q must have T >= 1 text tokens, got shape {tuple(q.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, d):
        raise ValueError(f"{op}: k must be [B={B}, H={H}, N, d={d}] to match q, got {tuple(k.shape)}")
    if q_mask is not None:
        check_tensor(op, "q_mask", q_mask, ndim=2, dtypes=(torch.bool,), device=q.device, layout="[B, T]")
        if tuple(q_mask.shape) != (B, T):
            raise ValueError(f"{op}: q_mask must be [B={B}, T={T}], got {tuple(q_mask.shape)}")
    if scale is None:
        scale = d**-0.5
    name = _backend.resolve(op, backend, q.device, IMPLEMENTED, q.dtype)
    return _relevance_op(q, k, float(scale), q_mask, name)[0]
