"""Triton kernels for ``select_tokens`` and ``select_tokens_varlen``, forward and backward.

Both ops share the same kernels; the varlen op differs only in where each row's keep count and
output rows come from (``keep[b]``, ``cu_seqlens[b]``) instead of one ``k`` for every row.

Forward (2 launches; +1 for ``order="score"``, +1 when the fuse reduction is split):
  1. ``_select_rank_kernel``, grid ``(B,)``: one program holds a row's ``n = N - num_prefix``
     scores in registers (``BLOCK_N = next_power_of_2(n)``, 128 to 4096). The k-th largest score
     is found by a 32-step bitwise search on an order-preserving int32 image of the fp32 bits
     (32 counting passes over registers, no sort); ties at the threshold go to the lower index
     (``tl.cumsum`` over the tie mask); kept columns' output slots are a ``tl.cumsum`` of the
     kept mask. It writes per column the output slot (int32, -1 = dropped) and the fuse weight
     (fp32: the score of a dropped column, 0 for kept ones), per row the fuse divisor (1 for
     "sum", the dropped-score sum for "mean") and ``(first output row, keep)``, and ``indices``.
     For ``order="score"`` it also writes the int32 order keys, and
     ``_select_score_order_kernel`` (grid ``(B,)``) ranks the kept columns by (score desc,
     index asc) with one bitonic ``tl.sort`` of int64 ``key << 32 | (BLOCK_N - 1 - col)``
     (O(n log^2 n) compare-swaps in registers/shared memory; a separate dtype-free kernel so
     the slow-to-compile sort exists once per BLOCK_N, not once per scores dtype).
  2. ``_select_gather_kernel``, grid ``(B, D tiles, splits)``: streams the row's tokens once:
     prefix rows and kept rows are copied to their slots, dropped rows are accumulated into
     a [BLOCK_T, BLOCK_D] fp32 tile reduced to the fused token once after the loop (dropped rows
     are not even read when ``fuse="none"``, a compile-time ``HAS_FUSE``). x is read
     exactly once in total. With one split the fused row is written directly; with several
     (few rows and D tiles for the GPU), fp32 partials go to a workspace and
  3. ``_select_fuse_finish_kernel``, grid ``(B, D tiles)``, sums them in a fixed order
     (deterministic, no atomics).

Backward (3 launches):
  1. ``_select_bwd_prep_kernel``, grid ``(B,)``: scatters ``indices`` into per-column slots,
     computes the dropped-score sum S and the per-column coefficient (s_j for "sum", s_j / S
     for "mean", 0 for kept columns).
  2. ``_select_bwd_kernel``, grid ``(B, token blocks)``: one pass over x (dropped rows only,
     and only when fusing) and over the upstream gradient: writes every row of grad_x (prefix
     and kept rows copy their slot's gradient, dropped rows get coefficient * fused gradient)
     and the fp32 dot products <g_fused, x_j>.
  3. ``_select_bwd_scores_kernel``, grid ``(B,)``: grad_scores from the dot products:
     <g, x_j> for "sum"; (<g, x_j> - sum_i coef_i <g, x_i>) / S for "mean" (that sum is
     <g, fused>); 0 for kept columns and for ``fuse="none"``.

Everything accumulates in fp32; inputs are loaded and converted to fp32 at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_N = 4096  # largest row of scores one program ranks (n = N - num_prefix)
_MIN_BLOCK_N = 128
_TILE_ELEMS = 2048  # BLOCK_T * BLOCK_D of the streaming kernels
_BLOCK_DS = (32, 64, 128)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _order_key(s):
    """int32 image of fp32 scores with the same order (-0.0 is mapped to +0.0 first: equal).
    Every NaN, of either sign, maps to the largest key (ranked first, as torch.sort ranks it);
    reachable only with value checks off."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(s != s, 0x7FFFFFFF, bits ^ ((bits >> 31) & 0x7FFFFFFF))


@triton.jit
def _row_layout(b, keep_ptr, cu_ptr, meta_ptr, k, n, num_prefix, has_fuse, out_rows, num_kept, VARLEN: tl.constexpr):
    """Row b's keep count, first index slot and whether its rows fit the buffers; stores
    (first output row, keep) into meta[b], (-1, 0) for a varlen row whose keep / cu_seqlens would
    leave the output buffers (malformed values with value checks off): later kernels skip it."""
    if VARLEN:
        base = tl.load(cu_ptr + b)
        kb = tl.load(keep_ptr + b)
        idx_base = base.to(tl.int64) - b.to(tl.int64) * (num_prefix + has_fuse)
        ok = (kb >= 0) & (kb <= n) & (base >= 0) & (base.to(tl.int64) + num_prefix + has_fuse + kb <= out_rows)
        ok = ok & (idx_base >= 0) & (idx_base + kb <= num_kept)
        kb = tl.where(ok, kb, 0).to(tl.int32)
        base = tl.where(ok, base, -1)
    else:
        base = b.to(tl.int64) * (num_prefix + k + has_fuse)
        kb = k
        idx_base = b.to(tl.int64) * k
        ok = b >= 0
    tl.store(meta_ptr + 2 * b, base)
    tl.store(meta_ptr + 2 * b + 1, kb)
    return kb, idx_base, ok


@triton.jit
def _select_rank_kernel(
    scores_ptr,  # [B, n] fp32/fp16/bf16
    slot_ptr,  # out int32 [B, n]: output slot (index order) of a kept column, -1 if dropped
    coef_ptr,  # out fp32 [B, n]: score of a dropped column, 0 if kept
    div_ptr,  # out fp32 [B]: fused token divisor (1 for sum, S for mean)
    meta_ptr,  # out int32 [B, 2]: (first output row, keep)
    indices_ptr,  # out int64: kept positions in index order
    keys_ptr,  # out int32 [B, n]: order keys, written when store_keys (for order="score")
    keep_ptr,  # int64 [B] (VARLEN)
    cu_ptr,  # int32 [B+1] (VARLEN)
    n,
    k,
    num_prefix,
    has_fuse,
    fuse_mean,
    store_keys,
    out_rows,  # rows of the output (bounds of a varlen row's layout)
    num_kept,  # entries of indices
    VARLEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kb, idx_base, ok = _row_layout(b, keep_ptr, cu_ptr, meta_ptr, k, n, num_prefix, has_fuse, out_rows, num_kept,
                                   VARLEN)

    offs = tl.arange(0, BLOCK_N)
    valid = offs < n
    row = b.to(tl.int64) * n
    s = tl.load(scores_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    key = _order_key(s)
    tl.store(keys_ptr + row + offs, key, mask=valid & (store_keys != 0))

    # Largest threshold t with #{key >= t} >= kb, built bit by bit from the top, on the unsigned
    # image key + 2^31 (padding is -1, below every candidate): 32 counting passes over registers.
    ukey = tl.where(valid, key.to(tl.int64) + 2147483648, -1)
    thr = tl.full([], 0, tl.int64)
    bit = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        cand = thr | bit
        count = tl.sum((ukey >= cand).to(tl.int32), axis=0)
        thr = tl.where(count >= kb, cand, thr)
        bit = bit >> 1
    gt = ukey > thr
    eq = ukey == thr
    need = kb - tl.sum(gt.to(tl.int32), axis=0)  # threshold ties to keep, lowest index first
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - 1
    kept = (gt | (eq & (eq_rank < need))) & ok
    pos = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(indices_ptr + idx_base + pos, (offs + num_prefix).to(tl.int64), mask=kept)
    tl.store(slot_ptr + row + offs, tl.where(kept, pos, -1), mask=valid)
    tl.store(coef_ptr + row + offs, tl.where(kept, 0.0, s), mask=valid)
    dropped_sum = tl.sum(tl.where(valid & (~kept), s, 0.0), axis=0)
    tl.store(div_ptr + b, tl.where(fuse_mean != 0, dropped_sum, 1.0))


@triton.jit
def _select_score_order_kernel(
    keys_ptr,  # int32 [B, n] order keys from the rank kernel
    slot_ptr,  # int32 [B, n]: kept columns get their rank by (score desc, index asc)
    indices_ptr,  # out int64 [B, k]
    n,
    k,
    num_prefix,
    BLOCK_N: tl.constexpr,
):
    """order="score": one bitonic tl.sort of the kept columns' (key << 32 | BLOCK_N - 1 - col)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < n
    row = b.to(tl.int64) * n
    key = tl.load(keys_ptr + row + offs, mask=valid, other=0)
    kept = valid & (tl.load(slot_ptr + row + offs, mask=valid, other=-1) >= 0)
    packed = (key.to(tl.int64) << 32) | (BLOCK_N - 1 - offs).to(tl.int64)
    packed = tl.where(kept, packed, -9223372036854775807 - 1)  # dropped and padding sort last
    srt = tl.sort(packed, 0, descending=True)
    col = BLOCK_N - 1 - (srt & (BLOCK_N - 1)).to(tl.int32)
    first = offs < k
    tl.store(indices_ptr + b.to(tl.int64) * k + offs, (col + num_prefix).to(tl.int64), mask=first)
    tl.store(slot_ptr + row + col, offs, mask=first)


@triton.jit
def _select_gather_kernel(
    x_ptr,  # [B, N, D]
    out_ptr,  # [rows, D], x.dtype
    slot_ptr,  # int32 [B, n]
    coef_ptr,  # fp32 [B, n]
    div_ptr,  # fp32 [B]
    meta_ptr,  # int32 [B, 2]
    part_ptr,  # fp32 [B, splits, D] (used when splits > 1)
    N,
    D,
    num_prefix,
    tokens_per_split,
    splits,
    HAS_FUSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pd = tl.program_id(1)
    sp = tl.program_id(2)
    n = N - num_prefix
    base = tl.load(meta_ptr + 2 * b)
    kb = tl.load(meta_ptr + 2 * b + 1)
    if base < 0:  # a malformed varlen row (see _row_layout): nothing of it is written
        return
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x_row = x_ptr + b.to(tl.int64) * N * D
    t_offs = tl.arange(0, BLOCK_T)

    # prefix tokens: copied by the first split
    p_end = tl.where(sp == 0, num_prefix, 0)
    for t0 in range(0, p_end, BLOCK_T):
        t = t0 + t_offs
        m = (t < p_end)[:, None] & dmask[None, :]
        v = tl.load(x_row + t.to(tl.int64)[:, None] * D + offs_d[None, :], mask=m)
        tl.store(out_ptr + (base + t).to(tl.int64)[:, None] * D + offs_d[None, :], v, mask=m)

    # [BLOCK_T, BLOCK_D] fp32 accumulator reduced once after the loop: a tl.sum per iteration
    # puts a cross-warp reduction (barriers) between consecutive tiles' loads and serialises them.
    acc2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    j_start = sp * tokens_per_split
    j_end = tl.minimum(j_start + tokens_per_split, n)
    for j0 in range(j_start, j_end, BLOCK_T):
        j = j0 + t_offs
        jm = j < j_end
        slot = tl.load(slot_ptr + b.to(tl.int64) * n + j, mask=jm, other=-1)
        kept = jm & (slot >= 0)
        if HAS_FUSE:
            read = jm
        else:
            read = kept  # dropped rows are not read without a fuse
        v = tl.load(
            x_row + (num_prefix + j).to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=read[:, None] & dmask[None, :],
            other=0.0,
        )
        dst = (base + num_prefix + slot).to(tl.int64)
        tl.store(out_ptr + dst[:, None] * D + offs_d[None, :], v, mask=kept[:, None] & dmask[None, :])
        if HAS_FUSE:
            c = tl.load(coef_ptr + b.to(tl.int64) * n + j, mask=jm, other=0.0)
            acc2 += v.to(tl.float32) * c[:, None]

    if HAS_FUSE:
        acc = tl.sum(acc2, axis=0)
        if splits == 1:
            div = tl.load(div_ptr + b)
            fused = tl.where(div != 0.0, tl.math.div_rn(acc, tl.where(div != 0.0, div, 1.0)), 0.0)
            fused_row = (base + num_prefix + kb).to(tl.int64)
            tl.store(out_ptr + fused_row * D + offs_d, fused.to(out_ptr.dtype.element_ty), mask=dmask)
        else:
            tl.store(part_ptr + (b.to(tl.int64) * splits + sp) * D + offs_d, acc, mask=dmask)


@triton.jit
def _select_fuse_finish_kernel(
    out_ptr,  # [rows, D]
    part_ptr,  # fp32 [B, splits, D]
    div_ptr,  # fp32 [B]
    meta_ptr,  # int32 [B, 2]
    D,
    num_prefix,
    splits,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pd = tl.program_id(1)
    if tl.load(meta_ptr + 2 * b) < 0:  # a malformed varlen row: skipped
        return
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for sp in range(0, splits):
        acc += tl.load(part_ptr + (b.to(tl.int64) * splits + sp) * D + offs_d, mask=dmask, other=0.0)
    div = tl.load(div_ptr + b)
    fused = tl.where(div != 0.0, tl.math.div_rn(acc, tl.where(div != 0.0, div, 1.0)), 0.0)
    fused_row = (tl.load(meta_ptr + 2 * b) + num_prefix + tl.load(meta_ptr + 2 * b + 1)).to(tl.int64)
    tl.store(out_ptr + fused_row * D + offs_d, fused.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _select_bwd_prep_kernel(
    scores_ptr,  # [B, n]
    indices_ptr,  # int64: kept positions in output order
    slot_ptr,  # out int32 [B, n]
    coef_ptr,  # out fp32 [B, n]: d fused / d x_j (0 for kept columns)
    div_ptr,  # out fp32 [B]: 1 for sum, S for mean (0 if S == 0: the gradient is then 0)
    meta_ptr,  # out int32 [B, 2]
    keep_ptr,
    cu_ptr,
    n,
    k,
    num_prefix,
    has_fuse,
    fuse_mean,
    out_rows,  # rows of the upstream gradient
    num_kept,  # entries of indices
    VARLEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kb, idx_base, ok = _row_layout(b, keep_ptr, cu_ptr, meta_ptr, k, n, num_prefix, has_fuse, out_rows, num_kept,
                                   VARLEN)

    offs = tl.arange(0, BLOCK_N)
    valid = offs < n
    row = b.to(tl.int64) * n
    # slots from indices: clear the row, then scatter (barriers order the program's own writes)
    tl.store(slot_ptr + row + offs, tl.full([BLOCK_N], -1, tl.int32), mask=valid)
    tl.debug_barrier()
    kept_p = offs < kb
    col = tl.load(indices_ptr + idx_base + offs, mask=kept_p, other=num_prefix) - num_prefix
    tl.store(slot_ptr + row + col, offs, mask=kept_p & (col >= 0) & (col < n))  # in-row columns only
    tl.debug_barrier()
    slot = tl.load(slot_ptr + row + offs, mask=valid, other=0)
    s = tl.load(scores_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    dropped = valid & (slot < 0)
    s_dropped = tl.where(dropped, s, 0.0)
    total = tl.sum(s_dropped, axis=0)
    # Divide by S rather than multiply by 1/S: 1/S overflows for |S| below ~3e-39.
    div = tl.where(fuse_mean != 0, total, 1.0)
    coef = tl.where(div != 0.0, tl.math.div_rn(s_dropped, tl.where(div != 0.0, div, 1.0)), 0.0)
    tl.store(coef_ptr + row + offs, coef, mask=valid)
    tl.store(div_ptr + b, div)


@triton.jit
def _select_bwd_kernel(
    g_ptr,  # [rows, D] upstream gradient, x.dtype
    x_ptr,  # [B, N, D]
    grad_x_ptr,  # out [B, N, D]
    dot_ptr,  # out fp32 [B, n]: <g_fused, x_j> for dropped j
    slot_ptr,  # int32 [B, n]
    coef_ptr,  # fp32 [B, n]
    meta_ptr,  # int32 [B, 2]
    N,
    D,
    num_prefix,
    has_fuse,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pt = tl.program_id(1)
    n = N - num_prefix
    base = tl.load(meta_ptr + 2 * b)
    kb = tl.load(meta_ptr + 2 * b + 1)
    row_ok = base >= 0  # False for a malformed varlen row: its gradient is written as zeros
    t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N
    is_prefix = t < num_prefix
    j = t - num_prefix
    jm = tm & (~is_prefix)
    slot = tl.load(slot_ptr + b.to(tl.int64) * n + j, mask=jm, other=-1)
    c = tl.load(coef_ptr + b.to(tl.int64) * n + j, mask=jm, other=0.0)
    c = tl.where(row_ok, c, 0.0)
    take_g = tm & (is_prefix | (slot >= 0)) & row_ok  # rows whose gradient is an output row's gradient
    read_x = jm & (slot < 0) & (has_fuse != 0) & row_ok
    src = tl.where(is_prefix, base + t, base + num_prefix + slot).to(tl.int64)
    fused_row = (base + num_prefix + kb).to(tl.int64)
    x_rows = (b.to(tl.int64) * N + t)[:, None] * D
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        gf = tl.load(g_ptr + fused_row * D + offs_d, mask=dmask & (has_fuse != 0) & row_ok, other=0.0).to(tl.float32)
        gr = tl.load(
            g_ptr + src[:, None] * D + offs_d[None, :], mask=take_g[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        xv = tl.load(x_ptr + x_rows + offs_d[None, :], mask=read_x[:, None] & dmask[None, :], other=0.0).to(
            tl.float32
        )
        val = tl.where(take_g[:, None], gr, c[:, None] * gf[None, :])
        tl.store(
            grad_x_ptr + x_rows + offs_d[None, :],
            val.to(grad_x_ptr.dtype.element_ty),
            mask=tm[:, None] & dmask[None, :],
        )
        dot += tl.sum(xv * gf[None, :], axis=1)
    tl.store(dot_ptr + b.to(tl.int64) * n + j, dot, mask=jm)


@triton.jit
def _select_bwd_scores_kernel(
    grad_scores_ptr,  # out [B, n], scores.dtype
    dot_ptr,  # fp32 [B, n]
    slot_ptr,  # int32 [B, n]
    coef_ptr,  # fp32 [B, n]
    div_ptr,  # fp32 [B]: 1 for sum, S for mean (0: no gradient)
    n,
    has_fuse,
    fuse_mean,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < n
    row = b.to(tl.int64) * n
    dot = tl.load(dot_ptr + row + offs, mask=valid, other=0.0)
    slot = tl.load(slot_ptr + row + offs, mask=valid, other=0)
    coef = tl.load(coef_ptr + row + offs, mask=valid, other=0.0)
    div = tl.load(div_ptr + b)
    g_dot_fused = tl.sum(coef * dot, axis=0)  # <g, fused> = sum_i coef_i <g, x_i>
    mean_gs = tl.where(div != 0.0, tl.math.div_rn(dot - g_dot_fused, tl.where(div != 0.0, div, 1.0)), 0.0)
    gs = tl.where(fuse_mean != 0, mean_gs, dot)
    gs = tl.where((slot < 0) & (has_fuse != 0), gs, 0.0)
    tl.store(grad_scores_ptr + row + offs, gs.to(grad_scores_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _rank_settings(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the per-row kernels."""
    block_n = max(_MIN_BLOCK_N, triton.next_power_of_2(max(n, 1)))
    if block_n > MAX_BLOCK_N:
        raise ValueError(
            f"select_tokens: the triton backend ranks rows of up to {MAX_BLOCK_N} tokens, "
            f"got N - num_prefix = {n}; use backend='torch'"
        )
    return block_n, (4 if block_n <= 1024 else 8)


def _tile_settings(D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the streaming kernels: 2048-element tiles.

    4 warps for the forward gather (~80 registers a thread); the backward, which holds three
    tiles of 64-bit addresses (gradient rows, x, grad_x), takes ``2 * num_warps`` (8): at 4 it
    needs ~200-240 registers a thread (no spills, but 2 blocks per SM).
    """
    block_d = min(max(triton.next_power_of_2(max(D, 1)), _BLOCK_DS[0]), _BLOCK_DS[-1])
    return _TILE_ELEMS // block_d, block_d, 4


def _target_programs(device: torch.device) -> int:
    """Programs worth launching for the gather: 4 waves of SMs (a few under the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _forward(x, scores, out, indices, k, keep, cu_seqlens, num_prefix, fuse, order):
    B, N, D = x.shape
    n = N - num_prefix
    has_fuse = int(fuse != "none")
    dev = x.device
    slot = torch.empty((B, n), dtype=torch.int32, device=dev)
    coef = torch.empty((B, n), dtype=torch.float32, device=dev)
    div = torch.empty((B,), dtype=torch.float32, device=dev)
    meta = torch.empty((B, 2), dtype=torch.int32, device=dev)
    varlen = keep is not None
    score_order = order == "score"
    keys = torch.empty((B, n), dtype=torch.int32, device=dev) if score_order else slot
    block_n, warps_n = _rank_settings(n)
    _select_rank_kernel[(B,)](
        scores, slot, coef, div, meta, indices, keys,
        keep if varlen else indices, cu_seqlens if varlen else meta,
        n, k, num_prefix, has_fuse, int(fuse == "mean"), int(score_order), out.shape[0], indices.numel(),
        VARLEN=varlen, BLOCK_N=block_n, num_warps=warps_n,
    )  # fmt: skip
    if score_order:
        _select_score_order_kernel[(B,)](
            keys, slot, indices, n, k, num_prefix, BLOCK_N=block_n, num_warps=warps_n
        )
    if D == 0:
        return
    block_t, block_d, warps = _tile_settings(D)
    d_tiles = triton.cdiv(D, block_d)
    chunks = max(triton.cdiv(n, block_t), 1)
    splits = 1
    if has_fuse:
        splits = min(chunks, max(1, triton.cdiv(_target_programs(dev), B * d_tiles)))
    tokens_per_split = triton.cdiv(chunks, splits) * block_t
    splits = max(triton.cdiv(n, tokens_per_split), 1)
    part = torch.empty((B, splits, D), dtype=torch.float32, device=dev) if splits > 1 else coef
    _select_gather_kernel[(B, d_tiles, splits)](
        x, out, slot, coef, div, meta, part, N, D, num_prefix, tokens_per_split, splits,
        HAS_FUSE=bool(has_fuse), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    if has_fuse and splits > 1:
        _select_fuse_finish_kernel[(B, d_tiles)](
            out, part, div, meta, D, num_prefix, splits, BLOCK_D=block_d, num_warps=warps
        )


def _backward(grad, x, scores, indices, k, keep, cu_seqlens, num_prefix, fuse):
    B, N, D = x.shape
    n = N - num_prefix
    has_fuse = int(fuse != "none")
    fuse_mean = int(fuse == "mean")
    dev = x.device
    grad = grad.to(x.dtype).contiguous()
    grad_x = torch.empty_like(x)
    grad_scores = torch.empty_like(scores)
    slot = torch.empty((B, n), dtype=torch.int32, device=dev)
    coef = torch.empty((B, n), dtype=torch.float32, device=dev)
    dot = torch.empty((B, n), dtype=torch.float32, device=dev)
    div = torch.empty((B,), dtype=torch.float32, device=dev)
    meta = torch.empty((B, 2), dtype=torch.int32, device=dev)
    varlen = keep is not None
    block_n, warps_n = _rank_settings(n)
    _select_bwd_prep_kernel[(B,)](
        scores, indices, slot, coef, div, meta,
        keep if varlen else indices, cu_seqlens if varlen else meta,
        n, k, num_prefix, has_fuse, fuse_mean, grad.shape[0], indices.numel(),
        VARLEN=varlen, BLOCK_N=block_n, num_warps=warps_n,
    )  # fmt: skip
    if D > 0 and N > 0:
        block_t, block_d, warps = _tile_settings(D)
        _select_bwd_kernel[(B, triton.cdiv(N, block_t))](
            grad, x, grad_x, dot, slot, coef, meta, N, D, num_prefix, has_fuse,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=2 * warps,
        )  # fmt: skip
    else:
        dot.zero_()
    _select_bwd_scores_kernel[(B,)](
        grad_scores, dot, slot, coef, div, n, has_fuse, fuse_mean, BLOCK_N=block_n, num_warps=warps_n
    )
    return grad_x, grad_scores


def select_tokens_forward(x, scores, k, num_prefix, fuse, order):
    """x [B,N,D], scores [B,N-P] -> (tokens [B, P+k+(fuse!='none'), D] in x.dtype, indices int64 [B,k])."""
    x, scores = x.contiguous(), scores.contiguous()
    B, N, D = x.shape
    tokens = x.new_empty((B, num_prefix + k + (fuse != "none"), D))
    indices = torch.empty((B, k), dtype=torch.int64, device=x.device)
    if B > 0:
        _forward(x, scores, tokens, indices, k, None, None, num_prefix, fuse, order)
    return tokens, indices


def select_tokens_backward(grad_tokens, x, scores, indices, num_prefix, fuse):
    """Gradients (grad_x [B,N,D] in x.dtype, grad_scores [B,N-P] in scores.dtype)."""
    x, scores, indices = x.contiguous(), scores.contiguous(), indices.contiguous()
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(scores)
    return _backward(grad_tokens, x, scores, indices, indices.shape[1], None, None, num_prefix, fuse)


def select_tokens_varlen_forward(x, scores, keep, cu_seqlens, total, num_prefix, fuse):
    """x [B,N,D], scores [B,N-P], keep int64 [B], cu_seqlens int32 [B+1] ->
    (tokens [total, D] in x.dtype, indices int64 [keep.sum()])."""
    x, scores = x.contiguous(), scores.contiguous()
    keep, cu_seqlens = keep.contiguous(), cu_seqlens.to(torch.int32).contiguous()
    B, N, D = x.shape
    tokens = x.new_empty((total, D))
    indices = torch.empty((total - B * (num_prefix + (fuse != "none")),), dtype=torch.int64, device=x.device)
    if B > 0:
        _forward(x, scores, tokens, indices, 0, keep, cu_seqlens, num_prefix, fuse, "index")
    return tokens, indices


def select_tokens_varlen_backward(grad, x, scores, indices, keep, cu_seqlens, num_prefix, fuse):
    """Gradients (grad_x [B,N,D] in x.dtype, grad_scores [B,N-P] in scores.dtype)."""
    x, scores, indices = x.contiguous(), scores.contiguous(), indices.contiguous()
    keep, cu_seqlens = keep.contiguous(), cu_seqlens.to(torch.int32).contiguous()
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(scores)
    return _backward(grad, x, scores, indices, 0, keep, cu_seqlens, num_prefix, fuse)


# ----------------------------------------------------------------------------------------------
# compile check (tests/triton_compile_check.py)
# ----------------------------------------------------------------------------------------------

_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signature(kernel, types: dict, constexprs: dict) -> dict:
    """Every argument's type: pointers/ints from ``types``, the rest of the ints ``i32``."""
    return {a: ("constexpr" if a in constexprs else types.get(a, "i32")) for a in kernel.arg_names}


def compile_cases():
    """(kernel, signature, constexprs, options) for every kernel x dtype x config the launchers pick."""
    block_ns = [1 << p for p in range(_MIN_BLOCK_N.bit_length() - 1, MAX_BLOCK_N.bit_length())]
    for block_n in block_ns:  # dtype-free
        types = dict(keys_ptr="*i32", slot_ptr="*i32", indices_ptr="*i64")
        cx = dict(BLOCK_N=block_n)
        opts = {"num_warps": _rank_settings(block_n)[1]}
        yield _select_score_order_kernel, _signature(_select_score_order_kernel, types, cx), cx, opts
    for dt in _TL_NAME.values():
        for block_n in block_ns:
            opts = {"num_warps": _rank_settings(block_n)[1]}
            for varlen in (False, True):
                types = dict(
                    scores_ptr=f"*{dt}", slot_ptr="*i32", coef_ptr="*fp32", div_ptr="*fp32",
                    meta_ptr="*i32", indices_ptr="*i64", keys_ptr="*i32", keep_ptr="*i64", cu_ptr="*i32",
                )  # fmt: skip
                cx = dict(VARLEN=varlen, BLOCK_N=block_n)
                yield _select_rank_kernel, _signature(_select_rank_kernel, types, cx), cx, opts
            for varlen in (False, True):
                types = dict(
                    scores_ptr=f"*{dt}", indices_ptr="*i64", slot_ptr="*i32", coef_ptr="*fp32",
                    div_ptr="*fp32", meta_ptr="*i32", keep_ptr="*i64", cu_ptr="*i32",
                )  # fmt: skip
                cx = dict(VARLEN=varlen, BLOCK_N=block_n)
                yield _select_bwd_prep_kernel, _signature(_select_bwd_prep_kernel, types, cx), cx, opts
            types = dict(
                grad_scores_ptr=f"*{dt}", dot_ptr="*fp32", slot_ptr="*i32", coef_ptr="*fp32", div_ptr="*fp32"
            )
            cx = dict(BLOCK_N=block_n)
            yield _select_bwd_scores_kernel, _signature(_select_bwd_scores_kernel, types, cx), cx, opts
        for block_d in _BLOCK_DS:
            block_t, _, warps = _tile_settings(block_d)
            opts, bwd_opts = {"num_warps": warps}, {"num_warps": 2 * warps}
            types = dict(
                x_ptr=f"*{dt}", out_ptr=f"*{dt}", slot_ptr="*i32", coef_ptr="*fp32", div_ptr="*fp32",
                meta_ptr="*i32", part_ptr="*fp32",
            )  # fmt: skip
            for has_fuse in (True, False):
                cx = dict(HAS_FUSE=has_fuse, BLOCK_T=block_t, BLOCK_D=block_d)
                yield _select_gather_kernel, _signature(_select_gather_kernel, types, cx), cx, opts
            types = dict(out_ptr=f"*{dt}", part_ptr="*fp32", div_ptr="*fp32", meta_ptr="*i32")
            cx = dict(BLOCK_D=block_d)
            yield _select_fuse_finish_kernel, _signature(_select_fuse_finish_kernel, types, cx), cx, opts
            types = dict(
                g_ptr=f"*{dt}", x_ptr=f"*{dt}", grad_x_ptr=f"*{dt}", dot_ptr="*fp32", slot_ptr="*i32",
                coef_ptr="*fp32", meta_ptr="*i32",
            )  # fmt: skip
            cx = dict(BLOCK_T=block_t, BLOCK_D=block_d)
            yield _select_bwd_kernel, _signature(_select_bwd_kernel, types, cx), cx, bwd_opts
