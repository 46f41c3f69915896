"""``pack`` / ``unpack``: padded [B, L, ...] <-> packed [total, ...] with ``cu_seqlens``.

The varlen layout of flash-attn: sequence b occupies rows ``cu_seqlens[b] : cu_seqlens[b+1]`` of
the packed tensor. Each is the other's backward. Backends: ``torch``, ``cpu``, ``cuda``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend, _ext, reference
from ._common import check_cu_seqlens, check_cu_seqlens_meta, check_int, check_tensor, value_checks_enabled

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


def pack(
    x: Tensor,
    lengths: Union[Tensor, Sequence[int]],
    *,
    total: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    backend: str | None = None,
) -> Packed:
    """Pack the first ``lengths[b]`` rows of every sequence of a padded batch, without padding.

    Args:
        x: ``[B, L, ...]`` any dtype; rows ``lengths[b]:`` of sequence b are padding.
        lengths: ``[B]`` ints in ``[0, L]``: an integer tensor (best on x's device) or a sequence.
        total: optional ``sum(lengths)``, when the caller knows it (e.g. from an earlier op).
        max_seqlen: optional upper bound of ``max(lengths)``, returned as ``Packed.max_seqlen``.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"auto"``; default :func:`get_backend`.

    Returns:
        ``Packed(packed [total, ...] x.dtype, cu_seqlens int32 [B+1] on x.device, max_seqlen int)``
        with ``total = sum(lengths)``. Differentiable w.r.t. ``x`` (padding rows get zero gradient).

    Host syncs: none for a sequence of ints, or for a tensor with ``total`` and ``max_seqlen``
    given; otherwise one copy of both sizes. The range of tensor ``lengths`` is checked when value
    checks are on (:func:`bus_kernels.set_value_checks`).
    """
    op = "pack"
    check_tensor(op, "x", x, ndim=tuple(range(2, 9)), layout="[B, L, ...]")
    B, L = x.shape[:2]
    if total is not None:
        total = check_int(op, "total", total, 0, B * L)
    if max_seqlen is not None:
        max_seqlen = check_int(op, "max_seqlen", max_seqlen, 0)
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"{op}: lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
        if lengths.shape[0] != B:
            raise ValueError(f"{op}: lengths must have B={B} entries, got {lengths.shape[0]}")
        if lengths.device != x.device:  # best avoided: a copy between devices
            lengths = lengths.to(x.device)
        lengths = lengths.long()
        if value_checks_enabled(x.device) and B > 0 and bool(((lengths < 0) | (lengths > L)).any()):
            bad = int(((lengths < 0) | (lengths > L)).nonzero()[0, 0])
            raise ValueError(f"{op}: lengths[{bad}]={int(lengths[bad])} must be in [0, {L}]")
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = 0
        if total is None or max_seqlen is None:
            sizes = [0, 0] if B == 0 else torch.stack([cu_seqlens[-1].to(torch.int64), lengths.max()]).tolist()
            total = sizes[0] if total is None else total
            longest = sizes[1]
        elif value_checks_enabled(x.device) and B > 0:
            longest = int(lengths.max())
            if int(cu_seqlens[-1]) != total:
                raise ValueError(f"{op}: total={total} must be sum(lengths) = {int(cu_seqlens[-1])}")
    else:
        lengths = [check_int(op, f"lengths[{b}]", n, 0, L) for b, n in enumerate(lengths)]
        if len(lengths) != B:
            raise ValueError(f"{op}: lengths must have B={B} entries, got {len(lengths)}")
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        if total is not None and total != cu[-1]:
            raise ValueError(f"{op}: total={total} must be sum(lengths) = {cu[-1]}")
        total, longest = cu[-1], max(lengths, default=0)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        if x.device.type == "cuda":  # from pinned memory: an asynchronous copy, no stall
            cu_seqlens = cu_seqlens.pin_memory().to(x.device, non_blocking=True)
        elif x.device.type != "cpu":
            cu_seqlens = cu_seqlens.to(x.device)
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise ValueError(f"{op}: max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")
    name = _backend.resolve(op, backend, x.device, IMPLEMENTED)
    return Packed(_pack_op(x, cu_seqlens, total, name), cu_seqlens, max_seqlen)


def unpack(packed: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, backend: str | None = None) -> Tensor:
    """Scatter packed sequences back into a zero-padded batch.

    Args:
        packed: ``[total, ...]`` any dtype.
        cu_seqlens: int32 ``[B+1]``, starts at 0, non-decreasing, ends at ``total`` (values
            checked when value checks are on; no host sync otherwise).
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
