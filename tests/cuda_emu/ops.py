"""The CUDA kernels of csrc/cuda/ run through the host emulator (see emu.h), called the way the ATen
wrappers (csrc/cuda/*_cuda.cpp) call their launchers: same scratch, same output sizes.

Every output is a view into a larger buffer whose guard zones (and the output itself, before the
launch) hold a sentinel (NaN, or the largest value but 5 for integers): after the launch the guards must be intact
(no write outside the tensor) and no sentinel may be left in the output (no element left
unwritten), else ``EmulationError``. Arguments are CPU tensors.
"""
from __future__ import annotations

import ctypes
import math
from functools import lru_cache

import torch
from torch import Tensor

from bus_kernels.reference.relevance import _token_weights

from . import build

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GUARD_BYTES = 256  # a multiple of 16: outputs keep the 16-byte alignment of their allocation
_I64 = ctypes.c_int64
_P = ctypes.c_void_p


class EmulationError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    return build.load()


SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2}


class schedule:
    """``with schedule("reverse", seed):`` resumes a block's fibers in that order (see emu.h)."""

    def __init__(self, mode: str, seed: int = 0):
        self.mode, self.seed = SCHEDULES[mode], seed

    def __enter__(self):
        lib().emu_set_schedule(self.mode, ctypes.c_uint64(self.seed))

    def __exit__(self, *exc):
        lib().emu_set_schedule(0, ctypes.c_uint64(0))


def _sentinel(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max - 5


class Guarded:
    """An output tensor inside a sentinel-filled buffer; ``check()`` after the launch."""

    def __init__(self, shape, dtype, name: str, misalign: int = 0, must_write: bool = True):
        self.name, self.must_write = name, must_write
        esz = torch.empty((), dtype=dtype).element_size()
        g = GUARD_BYTES // esz
        numel = math.prod(int(s) for s in shape)
        self.buf = torch.full((numel + 2 * g + misalign,), _sentinel(dtype), dtype=dtype)
        self.lo, self.hi = g + misalign, g + misalign + numel
        self.t = self.buf[self.lo : self.hi].view(*shape)

    def check(self) -> Tensor:
        def bad(v: Tensor) -> Tensor:
            return v.isnan() if v.dtype.is_floating_point else v == _sentinel(v.dtype)

        guards = torch.cat([self.buf[: self.lo], self.buf[self.hi :]])
        if not bad(guards).all():
            raise EmulationError(f"{self.name}: a kernel wrote outside the tensor")
        if self.must_write and self.t.numel() and bad(self.t).any():
            raise EmulationError(f"{self.name}: {int(bad(self.t).sum())} elements left unwritten")
        return self.t


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _run(rc: int) -> None:
    if rc != 0:
        raise EmulationError(f"launch failed ({rc}): {lib().emu_message().decode()}")


def _fuse_code(fuse: str) -> int:
    return {"none": 0, "sum": 1, "mean": 2}[fuse]


def _scratch(B: int, n: int, with_dot: bool, kept_tmp: int):
    return dict(
        slot=torch.empty((B, n), dtype=torch.int32),
        coef=torch.empty((B, n), dtype=torch.float32),
        dot=torch.empty((B if with_dot else 0, n), dtype=torch.float32),
        dropped_sum=torch.empty((B,), dtype=torch.float32),
        kept_tmp=torch.empty((kept_tmp,), dtype=torch.int64),
    )


def _select_fwd(x, scores, k, P, fuse, score_order, keep, cu, out_rows, num_kept, misalign, must_write=True):
    B, N, D = x.shape
    n = N - P
    tokens = Guarded((out_rows, D), x.dtype, "tokens", misalign, must_write)
    indices = Guarded((num_kept,), torch.int64, "indices", must_write=must_write)
    w = _scratch(B, n, False, B * k if score_order else 0)
    partial = Guarded((lib().emu_select_partial_floats(_I64(B), _I64(N), _I64(D), _I64(P), _fuse_code(fuse),
                                                       DTYPE_CODE[x.dtype]),), torch.float32, "fuse_partial",
                      must_write=False)
    _run(lib().emu_select_forward(
        _I64(B), _I64(N), _I64(D), _I64(P), _I64(k), _ptr(keep), _ptr(cu), _I64(out_rows), _I64(num_kept),
        _fuse_code(fuse), DTYPE_CODE[x.dtype], DTYPE_CODE[scores.dtype], _ptr(x), _ptr(scores), _ptr(tokens.t),
        _ptr(indices.t), int(score_order), _ptr(w["slot"]), _ptr(w["coef"]), None, _ptr(w["dropped_sum"]),
        _ptr(w["kept_tmp"]) if score_order else None, _ptr(partial.t) if partial.t.numel() else None))
    partial.check()
    return tokens.check(), indices.check()


def select_tokens(x: Tensor, scores: Tensor, k: int, num_prefix: int, fuse: str, order: str, misalign: int = 0):
    """As ``bus_kernels_C::select_tokens`` on CUDA: (tokens [B, P+k+f, D], indices int64 [B, k])."""
    x, scores = x.contiguous(), scores.contiguous()
    B = x.shape[0]
    rows = num_prefix + k + (fuse != "none")
    tokens, indices = _select_fwd(x, scores, k, num_prefix, fuse, order == "score", None, None, B * rows, B * k,
                                  misalign)
    return tokens.view(B, rows, x.shape[2]), indices.view(B, k)


def select_tokens_varlen(x, scores, keep, cu_seqlens, total, num_prefix, fuse, misalign: int = 0,
                         must_write: bool = True):
    """As ``bus_kernels_C::select_tokens_varlen`` on CUDA: (tokens [total, D], indices int64 [kept]).
    must_write=False for malformed keep / cu_seqlens: the kernels then skip rows, and only the
    guard zones are checked."""
    B = x.shape[0]
    kept = total - B * (num_prefix + (fuse != "none"))
    return _select_fwd(x.contiguous(), scores.contiguous(), 0, num_prefix, fuse, False, keep.contiguous(),
                       cu_seqlens.contiguous(), total, kept, misalign, must_write)


def _select_bwd(grad, x, scores, indices, P, fuse, keep, cu, k, out_rows, misalign):
    B, N, D = x.shape
    n = N - P
    grad_x = Guarded((B, N, D), x.dtype, "grad_x", misalign)
    grad_scores = Guarded((B, n), scores.dtype, "grad_scores")
    w = _scratch(B, n, True, 0)
    _run(lib().emu_select_backward(
        _I64(B), _I64(N), _I64(D), _I64(P), _I64(k), _ptr(keep), _ptr(cu), _I64(out_rows), _I64(indices.numel()),
        _fuse_code(fuse), DTYPE_CODE[x.dtype], DTYPE_CODE[scores.dtype], _ptr(grad), _ptr(x), _ptr(scores),
        _ptr(indices), _ptr(grad_x.t), _ptr(grad_scores.t), _ptr(w["slot"]), _ptr(w["coef"]), _ptr(w["dot"]),
        _ptr(w["dropped_sum"])))
    return grad_x.check(), grad_scores.check()


def select_tokens_backward(grad, x, scores, indices, num_prefix, fuse, misalign: int = 0):
    """As ``bus_kernels_C::select_tokens_backward`` on CUDA: (grad_x [B,N,D], grad_scores [B,N-P])."""
    grad = grad.to(x.dtype).contiguous()
    B, k = indices.shape
    return _select_bwd(grad, x.contiguous(), scores.contiguous(), indices.contiguous(), num_prefix, fuse, None,
                       None, k, grad.shape[0] * grad.shape[1], misalign)


def select_tokens_varlen_backward(grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse, misalign: int = 0):
    """As ``bus_kernels_C::select_tokens_varlen_backward`` on CUDA."""
    grad = grad.to(x.dtype).contiguous()
    return _select_bwd(grad, x.contiguous(), scores.contiguous(), indices.contiguous(), num_prefix, fuse,
                       keep.contiguous(), cu_seqlens.contiguous(), 0, grad.shape[0], misalign)


def relevance_scores(q: Tensor, k: Tensor, scale: float, q_mask: Tensor | None = None):
    """As ``bus_kernels_C::relevance_scores`` on CUDA: (scores fp32 [B, N], lse fp32 [B, H, T])."""
    q, k = q.contiguous(), k.contiguous()
    B, H, T, d = q.shape
    N = k.shape[2]
    scores = Guarded((B, N), torch.float32, "scores")
    lse = Guarded((B, H, T), torch.float32, "lse")
    w = _token_weights(q, q_mask, torch.float32).contiguous()  # as the wrapper: mask / (H * count)
    _run(lib().emu_relevance_forward(_I64(B), _I64(H), _I64(T), _I64(N), _I64(d), ctypes.c_float(scale),
                                     DTYPE_CODE[q.dtype], _ptr(q), _ptr(k), _ptr(w), _ptr(scores.t), _ptr(lse.t)))
    return scores.check(), lse.check()


def relevance_scores_backward(grad: Tensor, q: Tensor, k: Tensor, lse: Tensor, scale: float,
                              q_mask: Tensor | None = None):
    """As ``bus_kernels_C::relevance_scores_backward`` on CUDA: (dq [B,H,T,d], dk [B,H,N,d])."""
    q, k, lse, grad = q.contiguous(), k.contiguous(), lse.contiguous(), grad.float().contiguous()
    B, H, T, d = q.shape
    N = k.shape[2]
    dq = Guarded(q.shape, q.dtype, "dq")
    dk = Guarded(k.shape, k.dtype, "dk")
    row = torch.empty((B, H, T), dtype=torch.float32)
    w = _token_weights(q, q_mask, torch.float32).contiguous()  # as the wrapper: mask / (H * count)
    _run(lib().emu_relevance_backward(_I64(B), _I64(H), _I64(T), _I64(N), _I64(d), ctypes.c_float(scale),
                                      DTYPE_CODE[q.dtype], _ptr(q), _ptr(k), _ptr(w), _ptr(lse), _ptr(grad),
                                      _ptr(row), _ptr(dq.t), _ptr(dk.t)))
    return dq.check(), dk.check()


def _copy_rows(src: Tensor, dst: Tensor, cu: Tensor, B: int, L: int, row_bytes: int, total: int, to_packed: bool):
    _run(lib().emu_copy_rows(_ptr(src), _ptr(dst), _ptr(cu), _I64(B), _I64(L), _I64(row_bytes), _I64(total),
                             int(to_packed)))


def pack(x: Tensor, cu_seqlens: Tensor, total: int, misalign: int = 0) -> Tensor:
    """As ``bus_kernels_C::pack`` on CUDA: x [B, L, ...] -> [total, ...] (zeros where no row lands)."""
    x = x.contiguous()
    B, L = x.shape[:2]
    out = Guarded((total,) + tuple(x.shape[2:]), x.dtype, "packed", misalign, must_write=False)
    out.t.zero_()
    row_bytes = x[0, 0].numel() * x.element_size() if x.numel() else 0
    _copy_rows(x, out.t, cu_seqlens.contiguous(), B, L, row_bytes, total, True)
    return out.check()


def unpack(packed: Tensor, cu_seqlens: Tensor, max_seqlen: int, misalign: int = 0) -> Tensor:
    """As ``bus_kernels_C::unpack`` on CUDA: [total, ...] -> zero-padded [B, max_seqlen, ...]."""
    packed = packed.contiguous()
    B = cu_seqlens.numel() - 1
    out = Guarded((B, max_seqlen) + tuple(packed.shape[1:]), packed.dtype, "unpacked", misalign, must_write=False)
    out.t.zero_()
    row_bytes = packed[0].numel() * packed.element_size() if packed.shape[0] else 0
    _copy_rows(packed, out.t, cu_seqlens.contiguous(), B, max_seqlen, row_bytes, packed.shape[0], False)
    return out.check()
