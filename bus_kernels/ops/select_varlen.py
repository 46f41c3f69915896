"""``select_tokens_varlen``: per-sample keep counts (given, or from a score mass), packed to the
varlen layout with ``cu_seqlens`` so that the blocks after the selector run without padding."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, _ext, reference
from ._common import check_finite, check_fuse, check_int, check_tensor, value_checks_enabled
from .select import check_select_inputs, implemented_for

IMPLEMENTED = ("torch", "triton") + _ext.kernels("select_tokens_varlen")


class VarlenSelection(NamedTuple):
    """Result of :func:`select_tokens_varlen`.

    tokens: ``[total, D]`` in x.dtype; sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``:
        prefix tokens, kept tokens in index order, fused token (if any).
    cu_seqlens: int32 ``[B+1]``.  max_seqlen: int, the longest sequence.
    indices: int64 ``[keep.sum()]``, kept positions in ``x``, sample after sample.
    keep: int64 ``[B]``, tokens kept per sample (prefix and fused token not counted).
    """

    tokens: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    indices: Tensor
    keep: Tensor


@torch.library.custom_op("bus_kernels::mass_keep", mutates_args=())
def _mass_keep_op(scores: Tensor, mass: float, min_keep: int, backend: str) -> Tensor:
    op = "select_tokens_varlen"
    check_finite(op, "scores", scores)
    if value_checks_enabled(scores.device) and (
        bool((scores < 0).any()) or not bool((scores.sum(dim=1) > 0).all())
    ):
        raise ValueError(f"{op}: mass= needs non-negative scores with a positive sum in every row")
    return reference.mass_keep(scores, mass, min_keep)


@_mass_keep_op.register_fake
def _(scores, mass, min_keep, backend):
    return scores.new_empty((scores.shape[0],), dtype=torch.int64)


def _forward_impl(x, scores, keep, cu_seqlens, total, num_prefix, fuse, backend):
    if backend == "triton":
        from ..triton.select import select_tokens_varlen_forward

        return select_tokens_varlen_forward(
            x, scores, keep, cu_seqlens, total, num_prefix, fuse
        )
    if backend in ("cpu", "cuda"):
        return tuple(
            _ext.ops().select_tokens_varlen(
                x.contiguous(), scores.contiguous(), keep.contiguous(), cu_seqlens, total, num_prefix, fuse
            )
        )
    return reference.select_tokens_varlen(x, scores, keep, cu_seqlens, total, num_prefix, fuse)


def _backward_impl(grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse, backend):
    if backend == "triton":
        from ..triton.select import select_tokens_varlen_backward

        return select_tokens_varlen_backward(
            grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse
        )
    if backend in ("cpu", "cuda"):
        return tuple(
            _ext.ops().select_tokens_varlen_backward(
                grad, x.contiguous(), scores.contiguous(), indices, keep.contiguous(), cu_seqlens, num_prefix, fuse
            )
        )
    return reference.select_tokens_varlen_backward(grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse)


@torch.library.custom_op("bus_kernels::select_tokens_varlen", mutates_args=())
def _varlen_op(
    x: Tensor, scores: Tensor, keep: Tensor, cu_seqlens: Tensor, total: int, num_prefix: int, fuse: str, backend: str
) -> tuple[Tensor, Tensor]:
    op = "select_tokens_varlen"
    check_finite(op, "scores", scores)
    if value_checks_enabled(x.device):
        n = scores.shape[1]
        if bool(((keep < 0) | (keep > n)).any()):
            raise ValueError(f"{op}: every keep[b] must be in [0, N - num_prefix = {n}], got {keep.tolist()}")
        if int(cu_seqlens[-1]) != total:
            raise ValueError(f"{op}: total={total} must be the number of packed rows, "
                             f"sum(num_prefix + keep[b] + fused) = {int(cu_seqlens[-1])}")
    return _forward_impl(x, scores, keep, cu_seqlens, total, num_prefix, fuse, backend)


@_varlen_op.register_fake
def _(x, scores, keep, cu_seqlens, total, num_prefix, fuse, backend):
    B = x.shape[0]
    kept = total - B * (num_prefix + (fuse != "none"))
    return x.new_empty((total, x.shape[2])), x.new_empty((kept,), dtype=torch.int64)


@torch.library.custom_op("bus_kernels::select_tokens_varlen_backward", mutates_args=())
def _varlen_backward_op(
    grad: Tensor,
    x: Tensor,
    scores: Tensor,
    indices: Tensor,
    keep: Tensor,
    cu_seqlens: Tensor,
    num_prefix: int,
    fuse: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse, backend)


@_varlen_backward_op.register_fake
def _(grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse, backend):
    return torch.empty_like(x), torch.empty_like(scores)


def _setup(ctx, inputs, output):
    x, scores, keep, cu_seqlens, _, num_prefix, fuse, backend = inputs
    ctx.save_for_backward(x, scores, output[1], keep, cu_seqlens)
    ctx.num_prefix, ctx.fuse, ctx.backend = num_prefix, fuse, backend


def _backward(ctx, grad_tokens, _grad_indices):
    x, scores, indices, keep, cu_seqlens = ctx.saved_tensors
    gx, gs = _varlen_backward_op(
        grad_tokens.contiguous(), x, scores, indices, keep, cu_seqlens, ctx.num_prefix, ctx.fuse, ctx.backend
    )
    return gx, gs, None, None, None, None, None, None


_varlen_op.register_autograd(_backward, setup_context=_setup)


def select_tokens_varlen(
    x: Tensor,
    scores: Tensor,
    *,
    keep: Optional[Tensor] = None,
    mass: Optional[float] = None,
    min_keep: int = 1,
    num_prefix: int = 1,
    fuse: Optional[str] = "sum",
    total: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    backend: Optional[str] = None,
) -> VarlenSelection:
    """Keep a different number of tokens per sample and pack the result without padding.

    Args:
        x: ``[B, N, D]`` tokens; the first ``num_prefix`` are always kept, first and unchanged.
        scores: ``[B, N - num_prefix]`` finite float scores.
        keep: int64 ``[B]`` per-sample counts in ``[0, N - num_prefix]``; or
        mass: float ``p`` in ``(0, 1]``: each sample keeps its smallest top-ranked set whose share
            of the row's score sum reaches ``p`` (needs scores >= 0 with a positive row sum),
            at least ``min_keep``. Exactly one of ``keep`` and ``mass``.
        min_keep: lower bound of the mass-based count, in ``[0, N - num_prefix]``.
        num_prefix, fuse: as in :func:`select_tokens`.
        total: optional, the exact number of packed rows, ``sum_b num_prefix + keep[b] +
            (fuse is not None)``, when the caller knows it without reading ``keep`` from the
            device (e.g. ``keep`` built from host-side counts).
        max_seqlen: optional upper bound of the longest sequence (``num_prefix + N - num_prefix +
            1`` always is one), returned as ``VarlenSelection.max_seqlen``; a tight bound makes
            :func:`varlen_attention` launch fewer programs.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``.

    Ranking, fuse and autograd rules are those of :func:`select_tokens`.

    Returns:
        ``VarlenSelection(tokens [total, D], cu_seqlens int32 [B+1], max_seqlen int,
        indices int64 [keep.sum()], keep int64 [B])`` with sequence b of length
        ``num_prefix + keep[b] + (fuse is not None)``.

    Host syncs: the packed output's size is data-dependent, so without ``total`` and
    ``max_seqlen`` the op reads both from the device in one copy (one sync); with both, none.
    With value checks on (:func:`bus_kernels.set_value_checks`), ``keep``, ``total`` and
    ``max_seqlen`` are also checked against the counts (syncs).
    """
    op = "select_tokens_varlen"
    n = check_select_inputs(op, x, scores, num_prefix)
    fuse_mode = check_fuse(op, fuse)
    name = _backend.resolve(op, backend, x.device, implemented_for(IMPLEMENTED, n, backend), torch.promote_types(x.dtype, scores.dtype))
    B = x.shape[0]
    if (keep is None) == (mass is None):
        raise ValueError(f"{op}: pass exactly one of keep= (int64 [B]) and mass= (float in (0, 1])")
    if keep is not None:
        check_tensor(op, "keep", keep, ndim=1, dtypes=(torch.int64,), device=x.device, layout="[B]")
        if keep.shape[0] != B:
            raise ValueError(f"{op}: keep must be [B={B}], got {tuple(keep.shape)}")
    else:
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not (0.0 < mass <= 1.0):
            raise ValueError(f"{op}: mass={mass!r} must be a float in (0, 1]")
        check_int(op, "min_keep", min_keep, 0, n)
        keep = _mass_keep_op(scores, float(mass), min_keep, name)
    extra = num_prefix + (fuse_mode != "none")
    if total is not None:
        total = check_int(op, "total", total, B * extra)
    if max_seqlen is not None:
        max_seqlen = check_int(op, "max_seqlen", max_seqlen, 0)
    lengths = keep + extra
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    if total is None or max_seqlen is None:
        if B == 0:
            sizes = [0, 0]
        else:  # one device-to-host copy for both sizes
            sizes = torch.stack([cu_seqlens[-1].to(torch.int64), lengths.max()]).tolist()
        if total is not None and total != sizes[0]:  # read anyway: checked for free
            raise ValueError(f"{op}: total={total} must be the number of packed rows, "
                             f"sum(num_prefix + keep[b] + fused) = {sizes[0]}")
        total = sizes[0]
        longest = sizes[1]
        if max_seqlen is None:
            max_seqlen = longest
    else:
        longest = int(lengths.max()) if value_checks_enabled(x.device) and B > 0 else 0
    if max_seqlen < longest:
        raise ValueError(f"{op}: max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")
    tokens, indices = _varlen_op(x, scores, keep, cu_seqlens, total, num_prefix, fuse_mode, name)
    return VarlenSelection(tokens, cu_seqlens, max_seqlen, indices, keep)
