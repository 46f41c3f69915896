"""``pack`` / ``unpack``: padded [B, L, ...] <-> packed [total, ...] with ``cu_seqlens``.

The varlen layout of flash-attn: sequence b occupies rows ``cu_seqlens[b] : cu_seqlens[b+1]`` of
the packed tensor. Each is the other's backward. Backends: ``torch``, ``cpu``, ``cuda``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from .. import _backend, _ext, reference
from ._common import check_cu_seqlens, check_cu_seqlens_meta, check_int, check_tensor

IMPLEMENTED = ("torch", "cpu", "cuda")


class Packed(NamedTuple):
    """Result of :func:`pack`: ``packed [total, ...]``, ``cu_seqlens`` int32 ``[B+1]``, ``max_seqlen``."""

    packed: Tensor
    cu_seqlens: Tensor
    max_seqlen: int


def _pack_impl(x: Tensor, cu_seqlens: Tensor, total: int, backend: str) -> Tensor:
    if backend == "torch":
        return reference.pack(x, cu_seqlens, total)
    return _ext.ops().pack(x.contiguous(), cu_seqlens, total)


def _unpack_impl(packed: Tensor, cu_seqlens: Tensor, max_seqlen: int, backend: str) -> Tensor:
    if backend == "torch":
        return reference.unpack(packed, cu_seqlens, max_seqlen)
    return _ext.ops().unpack(packed.contiguous(), cu_seqlens, max_seqlen)


@torch.library.custom_op("bus_kernels::pack", mutates_args=())
def _pack_op(x: Tensor, cu_seqlens: Tensor, total: int, backend: str) -> Tensor:
    return _pack_impl(x, cu_seqlens, total, backend)


@_pack_op.register_fake
def _(x, cu_seqlens, total, backend):
    return x.new_empty((total,) + tuple(x.shape[2:]))


@torch.library.custom_op("bus_kernels::unpack", mutates_args=())
def _unpack_op(packed: Tensor, cu_seqlens: Tensor, max_seqlen: int, backend: str) -> Tensor:
    check_cu_seqlens("unpack", cu_seqlens, packed.shape[0], max_seqlen)
    return _unpack_impl(packed, cu_seqlens, max_seqlen, backend)


@_unpack_op.register_fake
def _(packed, cu_seqlens, max_seqlen, backend):
    return packed.new_empty((cu_seqlens.shape[0] - 1, max_seqlen) + tuple(packed.shape[1:]))


def _pack_setup(ctx, inputs, output):
    x, cu_seqlens, _, backend = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.seqlen, ctx.backend = x.shape[1], backend


def _pack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return _unpack_op(grad, cu_seqlens, ctx.seqlen, ctx.backend), None, None, None


def _unpack_setup(ctx, inputs, output):
    packed, cu_seqlens, _, backend = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.total, ctx.backend = packed.shape[0], backend


def _unpack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return _pack_op(grad, cu_seqlens, ctx.total, ctx.backend), None, None, None


_pack_op.register_autograd(_pack_backward, setup_context=_pack_setup)
_unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup)


def pack(x: Tensor, lengths: Union[Tensor, Sequence[int]], *, backend: str | None = None) -> Packed:
    """Pack the first ``lengths[b]`` rows of every sequence of a padded batch, without padding.

    Args:
        x: ``[B, L, ...]`` any dtype; rows ``lengths[b]:`` of sequence b are padding.
        lengths: ``[B]`` ints in ``[0, L]`` (an integer tensor, on any device, or a sequence).
        backend: ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"auto"``; default :func:`get_backend`.

    Returns:
        ``Packed(packed [total, ...] x.dtype, cu_seqlens int32 [B+1] on x.device, max_seqlen int)``
        with ``total = sum(lengths)``. Differentiable w.r.t. ``x`` (padding rows get zero gradient).
    """
    op = "pack"
    check_tensor(op, "x", x, ndim=tuple(range(2, 9)), layout="[B, L, ...]")
    B, L = x.shape[:2]
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"{op}: lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
        lengths = lengths.tolist()
    lengths = [check_int(op, f"lengths[{b}]", n, 0, L) for b, n in enumerate(lengths)]
    if len(lengths) != B:
        raise ValueError(f"{op}: lengths must have B={B} entries, got {len(lengths)}")
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=x.device)
    name = _backend.resolve(op, backend, x.device, IMPLEMENTED)
    return Packed(_pack_op(x, cu_seqlens, cu[-1], name), cu_seqlens, max(lengths, default=0))


def unpack(packed: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, backend: str | None = None) -> Tensor:
    """Scatter packed sequences back into a zero-padded batch.

    Args:
        packed: ``[total, ...]`` any dtype.
        cu_seqlens: int32 ``[B+1]``, starts at 0, non-decreasing, ends at ``total``.
        max_seqlen: int >= the longest sequence; the padded length of the result.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        ``[B, max_seqlen, ...]`` in ``packed.dtype``, zeros past each sequence's length.
        Differentiable w.r.t. ``packed``.
    """
    op = "unpack"
    check_tensor(op, "packed", packed, ndim=tuple(range(1, 8)), layout="[total, ...]")
    check_cu_seqlens_meta(op, cu_seqlens, packed.device)
    check_int(op, "max_seqlen", max_seqlen, 0)
    name = _backend.resolve(op, backend, packed.device, IMPLEMENTED)
    return _unpack_op(packed, cu_seqlens, max_seqlen, name)
