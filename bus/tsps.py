"""The Text-Semantics-Aware Patch Selector (TSPS) and the block forward that runs a ViT block
on pruned (and possibly packed, variable-length) token sets.

The block forward reuses the host block's own modules (``norm1``, ``attn.qkv``, ``q_norm``,
``k_norm``, ``attn.norm``, ``proj``, ``ls1/ls2``, ``drop_path``, ``mlp``, the ``fused_attn``
flag); it only adds what pruning needs around them:

- after the attention of a block that carries a TSPS, the patches are scored against the text
  (the text through the block's own query projection) or the image [CLS] and pruned with
  :func:`bus_kernels.select_tokens` (fixed ratio) or :func:`bus_kernels.select_tokens_varlen`
  (``mass``: per-sample counts, packed tokens from then on);
- every token carries a size (number of patches it stands for); attention after the first
  selection is proportional (``key_bias = log(size)``, as ToMe), so a fused token weighs as much
  as the patches it replaced, and an empty fused token (nothing dropped) is never attended;
- packed blocks use :func:`bus_kernels.varlen_attention`;
- ``mass`` with a bound (``max_keep``) keeps a fixed-shape padded layout instead of packing:
  ``[B, P + M + 1, D]`` with ``M`` the bound, sample b holding its prefix, its ``keep[b] <= M``
  kept tokens (index order), its fused token, then padding rows of size 0. Proportional attention
  gives those rows the key bias ``log 0 = -inf``, so no real token ever attends to them, as with
  an empty fused token; nothing in this layout has a shape that depends on the data, so the
  forward and backward run without a host sync and ``torch.compile(fullgraph=True)`` traces them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bus_kernels as bk
# The per-sample count select_tokens_varlen(mass=...) keeps, computed on the device (int64 [B]):
# the public op returns it only with the packed selection, whose size needs it on the host.
from bus_kernels.reference import mass_keep


@dataclass
class PruneState:
    """Per-forward state shared by the patched blocks of one model call.

    Tokens are either padded-free fixed ``[B, N', D]`` or packed ``[total, D]`` (``cu_seqlens`` set).
    ``sizes``: float32, patches per token (``None`` until the first selection: all 1).
    ``patch_ids``: int64, the original patch index of each token (-1 for prefix and fused tokens).
    ``records``: one dict per TSPS layer (scores, patch ids, and per-patch logits with ``ptm_head``)
    for losses and pictures. ``block_patch_ids``: on the finished state of a patched model's
    forward, the patch ids of every pruned block's output tokens (for ``forward_intermediates``).
    """

    batch: int
    num_prefix: int
    text: Optional[Tensor] = None
    text_mask: Optional[Tensor] = None
    sizes: Optional[Tensor] = None
    patch_ids: Optional[Tensor] = None
    cu_seqlens: Optional[Tensor] = None
    max_seqlen: int = 0
    # per-sample lengths of a padded layout: after unpacking (mass=, at the end), or of the
    # bounded layout (mass= with max_keep, from the first selection on)
    lengths: Optional[Tensor] = None
    records: list = field(default_factory=list)
    # block index -> patch ids of that block's output tokens (set on the finished state)
    block_patch_ids: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def padded(self) -> bool:
        """True in the bounded (``max_keep``) layout: fixed ``[B, L, D]``, rows ``>= lengths[b]`` padding."""
        return self.lengths is not None and self.cu_seqlens is None

    def valid(self) -> Tensor:
        """bool ``[B, L]`` of the bounded layout: True for real rows (``arange(L) < lengths``)."""
        return lengths_mask(self.lengths, self.sizes.shape[1])


def lengths_mask(lengths: Tensor, L: int) -> Tensor:
    """bool ``[B, L]``: True for the first ``lengths[b]`` rows of each sample (int ``[B]``)."""
    return torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]


def _pad_packed(t: Tensor, state: PruneState) -> Tensor:
    """Packed [total, ...] -> zero-padded [B, max_seqlen, ...]."""
    return bk.unpack(t, state.cu_seqlens, state.max_seqlen)


def _valid_mask(state: PruneState) -> Tensor:
    """bool [B, max_seqlen]: True for real (non-padding) rows of the padded layout."""
    return lengths_mask((state.cu_seqlens[1:] - state.cu_seqlens[:-1]).long(), state.max_seqlen)


class TSPS(nn.Module):
    """Text-Semantics-Aware Patch Selector, attached to a ViT block by :func:`bus.patch_timm`.

    Args:
        dim: token width D (for the PTM head).
        keep: fraction (float in (0, 1]) or count (int) of the rankable tokens kept.
        mass: if set, per-sample counts: each sample keeps its smallest top set holding this share
            of the relevance (``select_tokens_varlen``); later blocks run on packed tokens.
        min_keep: lower bound of the per-sample count in ``mass`` mode.
        max_keep: with ``mass``, a bound on each sample's count: a count (int >= 1) or a ratio in
            (0, 1] of this layer's rankable slots (the patches at the first layer; the previous
            bound plus the fused token after). Counts above it are clamped to it (it wins over
            ``min_keep``). Later blocks then run on a fixed-shape padded layout (see the module
            docstring) instead of packed tokens: no host sync, no data-dependent shape.
        fuse: ``"sum"``, ``"mean"`` or ``None``: how dropped tokens are fused into one.
        guidance: ``"text"``, ``"cls"``, ``"mean"`` or ``"auto"`` (text when given, else
            ``text_free``). ``"cls"`` scores by the image [CLS] query (EViT); ``"mean"`` by the
            mean query of the patches (each token weighted by the patches it stands for), for
            models without a class token (SigLIP's MAP pooling, average pooling).
        ptm_head: add a linear head giving per-patch logits for the Patch-Text Matching loss.
        text_free: the text-free guide ``"auto"`` falls back to: ``"cls"`` or ``"mean"``.
    """

    def __init__(self, dim: int, *, keep=0.7, mass: Optional[float] = None, min_keep: int = 1,
                 fuse: Optional[str] = "sum", guidance: str = "auto", ptm_head: bool = False,
                 text_free: str = "cls", max_keep=None):
        super().__init__()
        if guidance not in ("text", "cls", "mean", "auto"):
            raise ValueError(f"TSPS: guidance={guidance!r} must be 'text', 'cls', 'mean' or 'auto'")
        if text_free not in ("cls", "mean"):
            raise ValueError(f"TSPS: text_free={text_free!r} must be 'cls' or 'mean'")
        self.text_free = text_free
        if mass is None and not (isinstance(keep, int) and keep >= 1 or isinstance(keep, float) and 0 < keep <= 1):
            raise ValueError(f"TSPS: keep={keep!r} must be a count >= 1 or a ratio in (0, 1]")
        if max_keep is not None:
            if mass is None:
                raise ValueError(f"TSPS: max_keep={max_keep!r} bounds the per-sample counts of mass=; pass mass= "
                                 "too (a fixed keep has static shapes already)")
            if not (isinstance(max_keep, int) and not isinstance(max_keep, bool) and max_keep >= 1
                    or isinstance(max_keep, float) and 0 < max_keep <= 1):
                raise ValueError(f"TSPS: max_keep={max_keep!r} must be a count >= 1 or a ratio in (0, 1]")
            if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
                raise ValueError(f"TSPS: mass={mass!r} must be a float in (0, 1]")
            if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
                raise ValueError(f"TSPS: min_keep={min_keep!r} must be an int >= 0")
        self.keep, self.mass, self.min_keep, self.fuse, self.guidance = keep, mass, min_keep, fuse, guidance
        self.max_keep = max_keep
        self.ptm_head = nn.Linear(dim, 1) if ptm_head else None

    def extra_repr(self) -> str:
        what = f"mass={self.mass}" if self.mass is not None else f"keep={self.keep}"
        if self.max_keep is not None:
            what += f", max_keep={self.max_keep}"
        return f"{what}, fuse={self.fuse!r}, guidance={self.guidance!r}, text_free={self.text_free!r}"

    # -------------------------------------------------------------------------------- scoring
    def _queries(self, attn: nn.Module, norm1: nn.Module, state: PruneState, q_img: Tensor,
                 sizes: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Guidance queries [B, H, T, hd] (and their mask): the text through the block's own query
        projection, or the image [CLS] query of this block, or its patches' mean query
        (``sizes [B, N]``: patches per token, 0 for padding rows)."""
        use_text = state.text is not None and self.guidance in ("text", "auto")
        if self.guidance == "text" and state.text is None:
            raise ValueError("TSPS: guidance='text' needs text=... in the model call")
        if use_text:
            text = state.text if state.text.dim() == 3 else state.text[:, None]
            H, hd = attn.num_heads, attn.head_dim
            w = attn.qkv.weight[: H * hd]
            b = attn.qkv.bias[: H * hd] if attn.qkv.bias is not None else None
            qt = F.linear(norm1(text), w, b).reshape(text.shape[0], text.shape[1], H, hd).transpose(1, 2)
            mask = state.text_mask if state.text.dim() == 3 else None
            return attn.q_norm(qt), mask
        if self.guidance == "mean" or (self.guidance == "auto" and self.text_free == "mean"):
            P = state.num_prefix
            w = sizes[:, P:].to(q_img.dtype)  # a token weighs as many patches as it stands for
            q = torch.einsum("bhnd,bn->bhd", q_img[:, :, P:], w) / w.sum(dim=1)[:, None, None]
            return q[:, :, None], None
        if state.num_prefix < 1:
            raise ValueError("TSPS: guidance='cls' needs a class token (num_prefix_tokens >= 1)")
        return q_img[:, :, :1], None

    @staticmethod
    def _masked_relevance(q: Tensor, k: Tensor, q_mask: Optional[Tensor], k_valid: Tensor, scale: float) -> Tensor:
        """relevance_scores over padded keys: padding keys get no probability (packed mode)."""
        logits = torch.einsum("bhtd,bhnd->bhtn", q.float(), k.float()) * scale
        p = logits.masked_fill(~k_valid[:, None, None, :], float("-inf")).softmax(dim=-1)
        w = torch.ones(q.shape[0], q.shape[2], device=q.device) if q_mask is None else q_mask.float()
        w = w / (q.shape[1] * w.sum(dim=1, keepdim=True))
        return torch.einsum("bhtn,bt->bn", p, w)

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, q: Tensor, k: Tensor, attn: nn.Module, norm1: nn.Module, state: PruneState) -> Tensor:
        """Prunes ``x`` (fixed ``[B, N, D]`` or packed ``[total, D]``) given this block's q, k."""
        P = state.num_prefix
        if state.packed:
            return self._forward_packed(x, q, k, attn, norm1, state)
        if state.padded:
            return self._forward_padded(x, q, k, attn, norm1, state)
        B, N, D = x.shape
        n = N - P
        ids = state.patch_ids if state.patch_ids is not None else self._initial_ids(B, N, P, x.device)
        sizes = state.sizes if state.sizes is not None else torch.ones(B, N, device=x.device)
        qg, q_mask = self._queries(attn, norm1, state, q, sizes)
        # k[:, :, P:] is a strided view of the qkv projection; the Triton kernels read it in place.
        scores = bk.relevance_scores(qg, k[:, :, P:], scale=attn.scale, q_mask=q_mask)
        self._record(x[:, P:], scores, ids[:, P:], state)
        if self.mass is None:
            count = keep_count(self.keep, n)
            if count >= n:  # nothing to drop: the block is left exactly as it was
                return x
            sel = bk.select_tokens(x, scores, count, num_prefix=P, fuse=self.fuse)
            state.patch_ids, state.sizes = self._carry(ids, sizes, sel.indices, P)
            return sel.tokens
        if self.max_keep is not None:
            keep = mass_keep(scores, self.mass, self.min_keep)
            n_real = torch.full_like(keep, n)
            return self._select_padded(x, scores, ids, sizes, keep, n_real, keep_count(self.max_keep, n), state)
        sel = bk.select_tokens_varlen(x, scores, mass=self.mass, min_keep=self.min_keep, num_prefix=P, fuse=self.fuse)
        self._to_packed(ids, sizes, sel, state)
        return sel.tokens

    def _forward_packed(self, x, q, k, attn, norm1, state):
        P = state.num_prefix
        valid = _valid_mask(state)
        x_pad = _pad_packed(x, state)
        q_pad = _pad_packed(q, state).transpose(1, 2)  # [B, H, L, hd]
        k_pad = _pad_packed(k, state).transpose(1, 2)
        ids = _pad_packed(state.patch_ids + 1, state) - 1  # padding rows get id -1
        sizes = _pad_packed(state.sizes, state)  # padding rows get size 0
        qg, q_mask = self._queries(attn, norm1, state, q_pad, sizes)
        scores = self._masked_relevance(qg, k_pad[:, :, P:], q_mask, valid[:, P:], attn.scale)
        self._record(x_pad[:, P:], scores, ids[:, P:], state)
        if self.mass is None:
            n_real = valid[:, P:].sum(dim=1)
            keep = self._per_sample_keep(n_real)
            sel = bk.select_tokens_varlen(x_pad, scores, keep=torch.minimum(keep, n_real), num_prefix=P, fuse=self.fuse)
        else:
            sel = bk.select_tokens_varlen(x_pad, scores, mass=self.mass, min_keep=self.min_keep, num_prefix=P, fuse=self.fuse)
        self._to_packed(ids, sizes, sel, state)
        return sel.tokens

    def _per_sample_keep(self, n_real: Tensor) -> Tensor:
        """int64 ``[B]``: a fixed ``keep`` applied to each sample's ``n_real`` rankable tokens (a
        ratio rounded as :func:`keep_count` rounds it; not clamped to ``n_real``)."""
        if isinstance(self.keep, float):
            return torch.ceil(torch.round(n_real * self.keep, decimals=6)).long().clamp(min=1)
        return torch.full_like(n_real, self.keep)

    # ------------------------------------------------------------------ bounded (padded) layout
    def _forward_padded(self, x, q, k, attn, norm1, state):
        """A later TSPS layer on the bounded layout ``[B, L, D]`` (rows ``>= lengths[b]`` padding)."""
        P = state.num_prefix
        n = x.shape[1] - P
        valid = state.valid()
        ids, sizes = state.patch_ids, state.sizes
        qg, q_mask = self._queries(attn, norm1, state, q, sizes)
        scores = self._masked_relevance(qg, k[:, :, P:], q_mask, valid[:, P:], attn.scale)
        # padding rows recorded as zeros, as the packed layout's unpacked rows are
        self._record(x[:, P:].masked_fill(~valid[:, P:, None], 0.0), scores, ids[:, P:], state)
        n_real = valid[:, P:].sum(dim=1)
        if self.mass is None:  # a fixed keep on this layout: per-sample counts as in packed mode
            keep = self._per_sample_keep(n_real)
            bound = keep_count(self.keep, n)
        else:
            keep = mass_keep(scores, self.mass, self.min_keep)
            bound = keep_count(self.max_keep, n) if self.max_keep is not None else n
        return self._select_padded(x, scores, ids, sizes, keep, n_real, bound, state)

    def _select_padded(self, x: Tensor, scores: Tensor, ids: Tensor, sizes: Tensor, keep: Tensor,
                       n_real: Tensor, bound: int, state: PruneState) -> Tensor:
        tokens, state.patch_ids, state.sizes, state.lengths = select_padded(
            x, scores, ids, sizes, keep, n_real, bound, num_prefix=state.num_prefix, fuse=self.fuse)
        return tokens

    # ----------------------------------------------------------------------------- bookkeeping
    @staticmethod
    def _initial_ids(B: int, N: int, P: int, device) -> Tensor:
        ids = torch.arange(-P, N - P, device=device).expand(B, N).clone()
        ids[:, :P] = -1
        return ids

    def _record(self, patches: Tensor, scores: Tensor, ids: Tensor, state: PruneState) -> None:
        rec = {"scores": scores, "patch_ids": ids}
        if self.ptm_head is not None:
            rec["ptm_logits"] = self.ptm_head(patches).squeeze(-1)
        state.records.append(rec)

    def _carry(self, ids: Tensor, sizes: Tensor, indices: Tensor, P: int):
        """Patch ids and sizes of the selected tokens (prefix, kept, fused)."""
        kept_ids = ids.gather(1, indices)
        kept_sizes = sizes.gather(1, indices)
        parts_ids, parts_sizes = [ids[:, :P], kept_ids], [sizes[:, :P], kept_sizes]
        if self.fuse is not None:
            dropped = sizes[:, P:].sum(dim=1, keepdim=True) - kept_sizes.sum(dim=1, keepdim=True)
            parts_ids.append(torch.full_like(ids[:, :1], -1))
            parts_sizes.append(dropped)
        return torch.cat(parts_ids, dim=1), torch.cat(parts_sizes, dim=1)

    def _to_packed(self, ids: Tensor, sizes: Tensor, sel, state: PruneState) -> None:
        """Packs ids and sizes in the layout of a VarlenSelection and switches the state to packed."""
        P = state.num_prefix
        B = ids.shape[0]
        seq = torch.repeat_interleave(torch.arange(B, device=ids.device), sel.keep, output_size=sel.indices.numel())
        kept_ids, kept_sizes = ids[seq, sel.indices], sizes[seq, sel.indices]
        # Assemble [prefix, kept, fused] per sample on a padded grid, then pack like the tokens.
        L = sel.max_seqlen
        out_ids = torch.full((B, L), -1, dtype=ids.dtype, device=ids.device)
        out_sizes = torch.zeros((B, L), dtype=sizes.dtype, device=ids.device)
        out_ids[:, :P], out_sizes[:, :P] = ids[:, :P], sizes[:, :P]
        slot = torch.arange(sel.indices.numel(), device=ids.device) - torch.repeat_interleave(
            torch.cumsum(sel.keep, 0) - sel.keep, sel.keep, output_size=sel.indices.numel())
        out_ids[seq, P + slot] = kept_ids
        out_sizes[seq, P + slot] = kept_sizes
        lengths = sel.cu_seqlens[1:] - sel.cu_seqlens[:-1]
        if self.fuse is not None:  # the fused token stands for every dropped patch
            kept_total = torch.zeros_like(sizes[:, 0]).index_add_(0, seq, kept_sizes)
            out_sizes[torch.arange(B, device=ids.device), P + sel.keep] = sizes[:, P:].sum(dim=1) - kept_total
        state.cu_seqlens, state.max_seqlen = sel.cu_seqlens, sel.max_seqlen
        # Sizes from the selection: no device-to-host copy (no sync) in the packs.
        sizes_kw = dict(total=sel.tokens.shape[0], max_seqlen=sel.max_seqlen)
        state.patch_ids = bk.pack(out_ids, lengths, **sizes_kw).packed
        state.sizes = bk.pack(out_sizes, lengths, **sizes_kw).packed


def keep_count(spec, n: int) -> int:
    """A keep spec as a count in [1, n] (a Python int: a static shape): an int is clamped, a ratio
    in (0, 1] becomes ``ceil(ratio * n)`` rounded to 6 decimals first (``bus_kernels``' rule for a
    ratio keep: float noise must not add a token)."""
    if isinstance(spec, int):
        return max(1, min(spec, n))
    return min(n, max(1, math.ceil(round(spec * n, 6))))


def select_padded(x: Tensor, scores: Tensor, ids: Tensor, sizes: Tensor, keep: Tensor, n_real: Tensor,
                  bound: int, *, num_prefix: int, fuse: Optional[str]):
    """Per-sample selection into the bounded layout ``[B, P + bound + (fuse is not None), D]``.

    ``x [B, N, D]`` (P = ``num_prefix`` prefix rows, then rankable rows ``P + j``, real for
    ``j < n_real[b]``); ``scores [B, N - P]`` float (0 on padding); ``ids`` int64 / ``sizes``
    float32 ``[B, N]`` (patch id, -1 for none; patches per token, 0 for padding); ``keep`` int64
    ``[B]`` the wanted counts, clamped to ``bound`` (a Python int: a static shape) and ``n_real``.

    Sample b's rows: prefix, its kept tokens in index order, its fused token (``fuse`` of its
    dropped real tokens as :func:`bus_kernels.select_tokens` computes it, accumulated in fp32),
    then zero rows of size 0 and id -1. Ranking is the contract's (higher score first, lower
    index on ties). Returns ``(tokens, ids, sizes, lengths int64 [B])``; differentiable w.r.t.
    ``x`` and, through the fused token, ``scores``. No host sync, no data-dependent shape."""
    P = num_prefix
    B, N, D = x.shape
    n, M, F_ = N - P, bound, int(fuse is not None)
    dev = x.device
    keep = torch.minimum(keep.clamp(max=M), n_real)
    real_r = torch.arange(n, device=dev)[None, :] < n_real[:, None]
    # padding ranks last whatever its score (real scores are probabilities, >= 0)
    top = torch.sort(scores.masked_fill(~real_r, -1.0), dim=1, descending=True, stable=True).indices[:, :M]
    real = torch.arange(M, device=dev)[None, :] < keep[:, None]
    # kept tokens in index order first, then the unused top slots (their rows become padding)
    key = torch.sort(torch.where(real, top, top + n), dim=1).values
    kept = torch.where(key >= n, key - n, key)
    patches = x[:, P:]
    kept_x = patches.gather(1, kept[..., None].expand(B, M, D))
    kept_ids = ids[:, P:].gather(1, kept).masked_fill(~real, -1)
    kept_sizes = sizes[:, P:].gather(1, kept).masked_fill(~real, 0.0)
    slot = torch.arange(M + F_, device=dev)[None, :]
    body = F.pad(kept_x, (0, 0, 0, F_)).masked_fill((slot >= keep[:, None])[..., None], 0.0)
    body_ids = F.pad(kept_ids, (0, F_), value=-1)
    body_sizes = F.pad(kept_sizes, (0, F_))
    if F_:
        in_keep = torch.zeros(B, n, dtype=torch.bool, device=dev).scatter(1, kept, real)
        dropped = real_r & ~in_keep
        w = scores.float().masked_fill(~dropped, 0.0)
        # [B, 1, D] accumulated in fp32 (a product and a sum: autocast leaves them in fp32)
        fused = (w[..., None] * patches.float()).sum(dim=1, keepdim=True)
        if fuse == "mean":
            total = w.sum(dim=1)[:, None, None]
            fused = torch.where(total > 0, fused / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        at = slot == keep[:, None]  # the fused token right after the kept ones
        body = torch.where(at[..., None], fused.to(x.dtype), body)
        body_sizes = torch.where(at, sizes[:, P:].masked_fill(~dropped, 0.0).sum(dim=1, keepdim=True), body_sizes)
    tokens = torch.cat([x[:, :P], body], dim=1)
    ids = torch.cat([ids[:, :P], body_ids], dim=1)
    return tokens, ids, torch.cat([sizes[:, :P], body_sizes], dim=1), P + keep + F_


# ----------------------------------------------------------------------------- block forward
def _qkv(attn: nn.Module, h: Tensor, packed: bool):
    H, hd = attn.num_heads, attn.head_dim
    if packed:  # [total, C] -> three [total, H, hd]
        q, k, v = attn.qkv(h).reshape(h.shape[0], 3, H, hd).unbind(1)
    else:  # [B, N, C] -> three [B, H, N, hd]
        q, k, v = attn.qkv(h).reshape(h.shape[0], h.shape[1], 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, state: PruneState) -> Tensor:
    """Self-attention with proportional key bias log(size); returns [B, N, H*hd] or [total, H*hd]."""
    bias = None if state.sizes is None else torch.log(state.sizes)
    if state.packed:
        if attn.training and attn.attn_drop.p > 0:
            raise NotImplementedError("bus: attention dropout is not supported on packed tokens")
        out = bk.varlen_attention(q, k, v, state.cu_seqlens, state.max_seqlen, scale=attn.scale,
                                  key_bias=None if bias is None else bias.to(q.dtype))
        return out.reshape(out.shape[0], -1)
    mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def pruned_block_forward(block: nn.Module, x: Tensor, state: PruneState) -> Tensor:
    """One pre-norm ViT block (timm ``Block`` modules) on pruned/packed tokens, with its TSPS."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = _qkv(attn, h, state.packed)
    a = _attend(attn, q, k, v, state)
    a = attn.norm(a)
    if getattr(attn, "gate", None) is not None:
        a = a * attn.gate(h).sigmoid()
    a = attn.proj_drop(attn.proj(a))
    x = x + block.drop_path1(block.ls1(a))
    tsps = getattr(block, "bus_tsps", None)
    if tsps is not None:
        x = tsps(x, q, k, attn, block.norm1, state)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
