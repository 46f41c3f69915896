"""``patch_timm``: a drop-in TSPS for timm ``VisionTransformer`` models (and models built on it).

Patching swaps the classes of the model and of the blocks from the first pruning layer on for
thin subclasses (as ToMe does) whose ``forward`` reuses the blocks' own modules; nothing of
timm's forward code is copied, so the patch follows timm releases. Blocks before the first
pruning layer are untouched, and so is the patch embedding, the norms and the head.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

import bus_kernels as bk

from .tsps import PruneState, TSPS, pruned_block_forward


class _Holder:
    """The state of the forward in flight, shared by a patched model and its patched blocks."""

    state: Optional[PruneState] = None
    last: Optional[PruneState] = None


_BLOCK_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _pruned_block_class(cls: type) -> type:
    if cls not in _BLOCK_CLASSES:

        def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
            state = self._bus_holder.state
            if state is None:  # called outside the patched model: behave as the host block
                return cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None or is_causal:
                raise NotImplementedError("bus.patch_timm: attn_mask/is_causal are not supported with pruning")
            x = pruned_block_forward(self, x, state)
            if self._bus_last and state.packed:
                # Back to a padded batch for the model's final norm and head; lengths kept.
                state.lengths = (state.cu_seqlens[1:] - state.cu_seqlens[:-1]).long()
                x = bk.unpack(x, state.cu_seqlens, state.max_seqlen)
            return x

        _BLOCK_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,), {"forward": forward})
    return _BLOCK_CLASSES[cls]


@contextlib.contextmanager
def _pruning(model: nn.Module, batch: int, text: Optional[Tensor], text_mask: Optional[Tensor]):
    holder: _Holder = model._bus_holder
    if holder.state is not None:  # nested call (forward -> forward_features): same state
        yield holder.state
        return
    if text is not None:
        if text.dim() not in (2, 3) or text.shape[0] != batch or text.shape[-1] != model.embed_dim:
            raise ValueError(
                f"bus: text must be [B={batch}, D={model.embed_dim}] or [B, T, D], got {tuple(text.shape)}"
            )
        if text_mask is not None and (text.dim() != 3 or tuple(text_mask.shape) != tuple(text.shape[:2])):
            raise ValueError("bus: text_mask must be [B, T] matching text [B, T, D]")
    holder.state = PruneState(batch=batch, num_prefix=model.num_prefix_tokens, text=text,
                              text_mask=None if text_mask is None else text_mask.bool())
    try:
        yield holder.state
    finally:
        holder.last, holder.state = holder.state, None


def _pruned_model_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:

        def forward(self, x: Tensor, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, **kwargs):
            with _pruning(self, x.shape[0], text, text_mask):
                return cls.forward(self, x, **kwargs)

        def forward_features(self, x: Tensor, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, **kwargs):
            with _pruning(self, x.shape[0], text, text_mask):
                return cls.forward_features(self, x, **kwargs)

        def pruning_state(self) -> Optional[PruneState]:
            """The :class:`PruneState` of the last forward (records for PTM, kept patches, lengths)."""
            return self._bus_holder.last

        _MODEL_CLASSES[cls] = type(
            f"BUS{cls.__name__}", (cls,),
            {"forward": forward, "forward_features": forward_features, "pruning_state": pruning_state},
        )
    return _MODEL_CLASSES[cls]


def patch_timm(
    model: nn.Module,
    *,
    layers: Iterable[int] = (4, 7, 10),
    keep=0.7,
    fuse: Optional[str] = "sum",
    guidance: str = "auto",
    mass: Optional[float] = None,
    min_keep: int = 1,
    ptm_head: bool = False,
) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place so that it prunes patches at ``layers``.

    Args:
        model: a timm ``VisionTransformer`` (``blocks`` of pre-norm blocks with a fused ``qkv``).
        layers: 0-based indices of the blocks after whose attention a :class:`TSPS` prunes.
        keep: ratio in (0, 1] or count of the rankable tokens kept at each layer.
        fuse: ``"sum"``, ``"mean"`` or ``None`` (see :func:`bus_kernels.select_tokens`).
        guidance: ``"auto"`` (text when given, else the image [CLS]), ``"text"`` or ``"cls"``.
        mass: per-sample keep by relevance mass (varlen); later blocks run on packed tokens.
        min_keep: lower bound of the per-sample count with ``mass``.
        ptm_head: give each TSPS a linear per-patch head for the Patch-Text Matching loss.

    Returns the same model. Afterwards ``model(images, text=None, text_mask=None)`` (and
    ``forward_features``) prune, with ``text`` ``[B, D]`` (a text [CLS]) or ``[B, T, D]`` plus a
    ``text_mask [B, T]``, already in the ViT's width D. ``keep=1.0`` gives the unpatched outputs.
    ``model.pruning_state()`` returns the last forward's :class:`bus.PruneState`.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "embed_dim"):
        raise TypeError(f"patch_timm: expected a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "_bus_holder", None) is not None:
        raise ValueError("patch_timm: this model is already patched")
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] >= len(blocks):
        raise ValueError(f"patch_timm: layers={layers} must be block indices in [0, {len(blocks) - 1}]")
    for i in range(layers[0], len(blocks)):
        attn = getattr(blocks[i], "attn", None)
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj")) or not hasattr(blocks[i], "ls1"):
            raise TypeError(f"patch_timm: block {i} ({type(blocks[i]).__name__}) is not a pre-norm timm Block with a fused qkv")
    if mass is not None and getattr(model, "global_pool", "token") not in ("token", ""):
        raise ValueError("patch_timm: mass= (packed tokens) needs global_pool='token'")
    holder = _Holder()
    for i in layers:
        blocks[i].bus_tsps = TSPS(model.embed_dim, keep=keep, mass=mass, min_keep=min_keep, fuse=fuse,
                                  guidance=guidance, ptm_head=ptm_head)
    for i in range(layers[0], len(blocks)):
        blk = blocks[i]
        blk.__class__ = _pruned_block_class(type(blk))
        blk._bus_holder, blk._bus_last = holder, i == len(blocks) - 1
    model.__class__ = _pruned_model_class(type(model))
    model._bus_holder = holder
    return model
