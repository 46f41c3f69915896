"""``varlen_attention``: attention within each packed variable-length sequence (flash-attn layout)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext, reference
from ._common import ANY_FLOAT, check_cu_seqlens, check_cu_seqlens_meta, check_int, check_tensor

IMPLEMENTED = ("torch", "triton") + _ext.kernels("varlen_attention")


def _forward_impl(q, k, v, cu_seqlens, max_seqlen, scale, causal, key_bias, backend):
    if backend == "triton":
        from ..triton.varlen_attention import varlen_attention_forward

        return varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale, causal, key_bias)
    if backend in ("cpu", "cuda"):
        q, k, v = (t.contiguous() for t in (q, k, v))
        bias = None if key_bias is None else key_bias.contiguous()
        return tuple(_ext.ops().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias))
    return reference.varlen_attention(q, k, v, cu_seqlens, scale, causal, key_bias)


def _backward_impl(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, key_bias, backend):
    if backend == "triton":
        from ..triton.varlen_attention import varlen_attention_backward

        dq, dk, dv, dbias = varlen_attention_backward(
            grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, key_bias
        )
        return dq, dk, dv, _no_bias_grad(q) if dbias is None else dbias
    if backend in ("cpu", "cuda"):
        q, k, v, out = (t.contiguous() for t in (q, k, v, out))
        bias = None if key_bias is None else key_bias.contiguous()
        return tuple(
            _ext.ops().varlen_attention_backward(
                grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, bias
            )
        )
    dq, dk, dv, dbias = reference.varlen_attention_backward(grad, q, k, v, cu_seqlens, scale, causal, key_bias)
    return dq, dk, dv, _no_bias_grad(q) if dbias is None else dbias


def _no_bias_grad(q: Tensor) -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "no key_bias".
    return q.new_empty((0,))


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("bus_kernels::varlen_attention", mutates_args=())
def _attn_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    key_bias: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    check_cu_seqlens("varlen_attention", cu_seqlens, q.shape[0], max_seqlen)
    return _forward_impl(q, k, v, cu_seqlens, max_seqlen, scale, causal, key_bias, backend)


@_attn_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, key_bias, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.custom_op("bus_kernels::varlen_attention_backward", mutates_args=())
def _attn_backward_op(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    key_bias: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, key_bias, backend)


@_attn_backward_op.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, key_bias, backend):
    dbias = _no_bias_grad(q) if key_bias is None else torch.empty_like(key_bias)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, causal, key_bias, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, key_bias)
    ctx.max_seqlen, ctx.scale, ctx.causal, ctx.backend = max_seqlen, scale, causal, backend


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, key_bias = ctx.saved_tensors
    dq, dk, dv, dbias = _attn_backward_op(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.causal,
        key_bias, ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None if key_bias is None else dbias, None


_attn_op.register_autograd(_backward, setup_context=_setup)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    key_bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention within each packed sequence: sequence b (rows ``cu_seqlens[b]`` to
    ``cu_seqlens[b+1]``) attends only to itself.

    Args:
        q, k, v: ``[total, H, d]``, same dtype (fp32, fp16, bf16; fp64 on ``torch``) and device;
            ``d`` a multiple of 8, at most 256.
        cu_seqlens: int32 ``[B+1]``: starts at 0, non-decreasing, ends at ``total``; zero-length
            sequences are allowed. Its values (and ``max_seqlen``) are checked only when value
            checks are on (:func:`bus_kernels.set_value_checks`); no host sync otherwise.
        max_seqlen: int >= the longest sequence.
        scale: logit scale, default ``d ** -0.5``.
        causal: query i attends keys j <= i of its own sequence.
        key_bias: optional float ``[total, H]`` or ``[total]`` added to the logits of each key
            (e.g. ``log(token_size)`` for proportional attention); differentiable.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``.

    Returns:
        ``[total, H, d]`` in q.dtype. A query whose every logit is -inf (only possible through a
        -inf ``key_bias``) gets zeros. Differentiable w.r.t. ``q``, ``k``, ``v`` and ``key_bias``.
    """
    op = "varlen_attention"
    check_tensor(op, "q", q, ndim=3, dtypes=ANY_FLOAT, layout="[total, H, d]")
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=3, dtypes=(q.dtype,), device=q.device, layout="[total, H, d]")
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    total, H, d = q.shape
    if d % 8 != 0 or not (8 <= d <= 256):
        raise ValueError(f"{op}: head dim d={d} must be a multiple of 8 in [8, 256]")
    check_cu_seqlens_meta(op, cu_seqlens, q.device)
    check_int(op, "max_seqlen", max_seqlen, 0)
    if key_bias is not None:
        check_tensor(op, "key_bias", key_bias, ndim=(1, 2), dtypes=ANY_FLOAT, device=q.device, layout="[total, H] or [total]")
        if tuple(key_bias.shape) not in ((total, H), (total,)):
            raise ValueError(f"{op}: key_bias must be [total={total}, H={H}] or [total={total}], got {tuple(key_bias.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = d**-0.5
    name = _backend.resolve(op, backend, q.device, IMPLEMENTED, q.dtype)
    return _attn_op(q, k, v, cu_seqlens, max_seqlen, float(scale), causal, key_bias, name)[0]
