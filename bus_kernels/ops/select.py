"""``select_tokens``: top-k select + gather, the dropped tokens fused into one (EViT/TRIPS)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import _backend, _ext, reference
from ._common import ANY_FLOAT, check_finite, check_fuse, check_int, check_tensor

IMPLEMENTED = ("torch", "triton") + _ext.kernels("select_tokens")
# Longest row the Triton rank kernel holds in registers (bus_kernels.triton.select.MAX_BLOCK_N);
# "auto" passes longer rows to another backend, an explicit "triton" says why it cannot.
TRITON_MAX_N = 4096


def implemented_for(implemented: tuple[str, ...], n: int, backend: Optional[str]) -> tuple[str, ...]:
    """The backends "auto" may choose for rows of ``n`` rankable tokens."""
    if n > TRITON_MAX_N and (backend or _backend.get_backend()) == "auto":
        return tuple(b for b in implemented if b != "triton")
    return implemented


class Selection(NamedTuple):
    """Result of :func:`select_tokens`.

    tokens: ``[B, num_prefix + k + (fuse is not None), D]`` in x.dtype.
    indices: int64 ``[B, k]``, positions in ``x`` (>= num_prefix) of the kept tokens, output order.
    """

    tokens: Tensor
    indices: Tensor


def _forward_impl(x, scores, k, num_prefix, fuse, order, backend):
    if backend == "triton":
        from ..triton.select import select_tokens_forward

        return select_tokens_forward(x, scores, k, num_prefix, fuse, order)
    if backend in ("cpu", "cuda"):
        return tuple(_ext.ops().select_tokens(x.contiguous(), scores.contiguous(), k, num_prefix, fuse, order))
    return reference.select_tokens(x, scores, k, num_prefix, fuse, order)


def _backward_impl(grad, x, scores, indices, num_prefix, fuse, backend):
    if backend == "triton":
        from ..triton.select import select_tokens_backward

        return select_tokens_backward(grad, x, scores, indices, num_prefix, fuse)
    if backend in ("cpu", "cuda"):
        return tuple(
            _ext.ops().select_tokens_backward(grad, x.contiguous(), scores.contiguous(), indices, num_prefix, fuse)
        )
    return reference.select_tokens_backward(grad, x, scores, indices, num_prefix, fuse)


@torch.library.custom_op("bus_kernels::select_tokens", mutates_args=())
def _select_op(
    x: Tensor, scores: Tensor, k: int, num_prefix: int, fuse: str, order: str, backend: str
) -> tuple[Tensor, Tensor]:
    check_finite("select_tokens", "scores", scores)
    return _forward_impl(x, scores, k, num_prefix, fuse, order, backend)


@_select_op.register_fake
def _(x, scores, k, num_prefix, fuse, order, backend):
    B, _, D = x.shape
    rows = num_prefix + k + (fuse != "none")
    return x.new_empty((B, rows, D)), x.new_empty((B, k), dtype=torch.int64)


@torch.library.custom_op("bus_kernels::select_tokens_backward", mutates_args=())
def _select_backward_op(
    grad: Tensor, x: Tensor, scores: Tensor, indices: Tensor, num_prefix: int, fuse: str, backend: str
) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad, x, scores, indices, num_prefix, fuse, backend)


@_select_backward_op.register_fake
def _(grad, x, scores, indices, num_prefix, fuse, backend):
    return torch.empty_like(x), torch.empty_like(scores)


def _setup(ctx, inputs, output):
    x, scores, _, num_prefix, fuse, _, backend = inputs
    ctx.save_for_backward(x, scores, output[1])
    ctx.num_prefix, ctx.fuse, ctx.backend = num_prefix, fuse, backend


def _backward(ctx, grad_tokens, _grad_indices):
    x, scores, indices = ctx.saved_tensors
    gx, gs = _select_backward_op(
        grad_tokens.contiguous(), x, scores, indices, ctx.num_prefix, ctx.fuse, ctx.backend
    )
    return gx, gs, None, None, None, None, None


_select_op.register_autograd(_backward, setup_context=_setup)


def resolve_keep(op: str, keep: Union[int, float], n: int) -> int:
    """``keep`` as a count: an int in ``[1, n]``, or a ratio in ``(0, 1]`` -> ``ceil(ratio * n)``.

    The product is rounded to 6 decimals before the ceiling so that float noise does not add a
    token (``0.1 * 30`` is ``3.0000000000000004`` in binary floating point, and means 3).
    """
    if n < 1:
        raise ValueError(f"{op}: there are no tokens to rank (N - num_prefix = {n})")
    if isinstance(keep, float):
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"{op}: keep={keep} as a ratio must be in (0, 1]")
        return max(1, math.ceil(round(keep * n, 6)))
    return check_int(op, "keep", keep, 1, n)


def check_select_inputs(op: str, x: Tensor, scores: Tensor, num_prefix: int) -> int:
    """Shared checks of ``x``, ``scores`` and ``num_prefix``; returns n = N - num_prefix."""
    check_tensor(op, "x", x, ndim=3, layout="[B, N, D]")
    if not (x.dtype.is_floating_point):
        raise TypeError(f"{op}: x must be a floating tensor, got {x.dtype}")
    B, N, _ = x.shape
    check_int(op, "num_prefix", num_prefix, 0, N)
    n = N - num_prefix
    check_tensor(op, "scores", scores, ndim=2, dtypes=ANY_FLOAT, device=x.device, layout="[B, N - num_prefix]")
    if tuple(scores.shape) != (B, n):
        raise ValueError(
            f"{op}: scores must be [B={B}, N - num_prefix={n}] (N={N}, num_prefix={num_prefix}), "
            f"got {tuple(scores.shape)}"
        )
    return n


def select_tokens(
    x: Tensor,
    scores: Tensor,
    keep: Union[int, float],
    *,
    num_prefix: int = 1,
    fuse: Optional[str] = "sum",
    order: str = "index",
    backend: Optional[str] = None,
) -> Selection:
    """Keep the ``k`` highest-scoring tokens of each row and fuse the rest into one token.

    Args:
        x: ``[B, N, D]`` tokens (any float dtype). The first ``num_prefix`` (class/register tokens)
            are always kept, first and unchanged, and are not ranked.
        scores: ``[B, N - num_prefix]`` finite float scores (e.g. from :func:`relevance_scores`);
            checked when value checks are on (:func:`bus_kernels.set_value_checks`).
        keep: int ``k`` in ``[1, N - num_prefix]``, or a float ratio in ``(0, 1]`` meaning
            ``k = ceil(ratio * (N - num_prefix))``.
        num_prefix: number of leading tokens that are always kept.
        fuse: ``"sum"`` appends ``sum_{j dropped} scores[j] * x[j]``; ``"mean"`` appends that
            divided by ``sum_{j dropped} scores[j]`` (zero when that is 0 or nothing is dropped);
            ``None`` appends nothing.
        order: ``"index"`` keeps kept tokens in their original order, ``"score"`` by descending score.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``.

    Ranking: higher score first; among equal scores the lower index wins. No host sync.

    Returns:
        ``Selection(tokens [B, num_prefix + k + (fuse is not None), D], indices int64 [B, k])``.
        Differentiable w.r.t. ``x`` and (through the fused token) ``scores``; the choice is not.
    """
    op = "select_tokens"
    n = check_select_inputs(op, x, scores, num_prefix)
    k = resolve_keep(op, keep, n)
    fuse_mode = check_fuse(op, fuse)
    if order not in ("index", "score"):
        raise ValueError(f"{op}: order={order!r} must be 'index' or 'score'")
    name = _backend.resolve(op, backend, x.device, implemented_for(IMPLEMENTED, n, backend), torch.promote_types(x.dtype, scores.dtype))
    tokens, indices = _select_op(x, scores, k, num_prefix, fuse_mode, order, name)
    return Selection(tokens, indices)
