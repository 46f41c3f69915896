"""The image side of the paper's stack: a timm ViT with TSPS, PAD, and the split that lets
text-guided pruning and a text-free retrieval embedding share one ViT.

Text-guided TSPS (the paper: the caption's [CLS] steers the selector inside the ViT) makes the
visual tokens depend on the caption, while retrieval needs an image embedding that does not (an
image is scored against every caption). A second full ViT pass per step would cost more than the
pruning saves, so the ViT is run as

    stem   = patch embedding + blocks before the first text-guided TSPS layer (CLS-guided TSPS
             layers among them), run once per image;
    rest   = the remaining blocks, run from the stem's tokens once per guidance:
             CLS-guided (text-free: ITC, the momentum targets, retrieval) and caption-guided
             (the fusion losses), the latter on the rows the losses need.

``BUSConfig.text_guided_from`` picks the first text-guided TSPS layer (an index into
``tsps_layers``): 0 guides every TSPS layer by the caption (as the paper), -1 only the last layer,
so the stem covers most of the ViT and the extra rest passes are short. ``itc_on="stem"`` takes
the text-free feature from the stem's [CLS] (no CLS-guided rest pass at all), and
``itm_negatives="reuse"`` runs the caption-guided rest once per image instead of once per ITM pair.
``benchmarks/flops.py`` measures what each choice costs (``BUSConfig.paper`` takes the cheapest
text-guided one, -1/stem/reuse); ``guidance="image"`` runs one CLS-guided pass for everything.

Blocks are run with :func:`bus.tsps.pruned_block_forward` on a :class:`bus.PruneState` this module
owns, so the stem's state can be branched into several rest passes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

import bus_kernels as bk

from ..pad import PAD
from ..tsps import TSPS, PruneState, pruned_block_forward


class VisionTower(nn.Module):
    """timm ViT (``vit``) + TSPS at ``config.tsps_layers`` (when ``tsps``) + PAD (when ``pad``).

    ``patch_embed`` and :meth:`pruning_state` are exposed as on a patched timm ViT (the training
    CLI's relevance picture reads them)."""

    def __init__(self, config, *, tsps: bool, pad: bool):
        super().__init__()
        import timm

        self.vit = timm.create_model(config.vit, pretrained=False, num_classes=0, img_size=config.img_size,
                                     **config.vit_kwargs)
        vit = self.vit
        if getattr(vit, "global_pool", "token") != "token" or vit.num_prefix_tokens < 1:
            raise ValueError(f"VisionTower: {config.vit} needs a class token and global_pool='token'")
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[0].attn.num_heads
        std = config.weight_init_std(self.embed_dim)
        if std != 0.02:  # timm's init is trunc_normal(0.02) on every Linear; the width-scaled std instead
            for mod in vit.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.trunc_normal_(mod.weight, std=std)
        self.use_tsps, self.use_pad = tsps, pad
        self.layers = tuple(sorted(set(int(i) for i in config.tsps_layers))) if tsps else ()
        if self.layers and (self.layers[0] < 0 or self.layers[-1] >= len(vit.blocks)):
            raise ValueError(f"BUSConfig.tsps_layers={tuple(config.tsps_layers)} must be block indices in [0, {len(vit.blocks) - 1}]")
        for i in self.layers:
            vit.blocks[i].bus_tsps = TSPS(self.embed_dim, keep=config.keep, mass=config.mass, fuse=config.fuse,
                                          guidance="auto")
        if tsps and config.guidance == "text":
            if not -len(self.layers) <= config.text_guided_from < len(self.layers):
                raise ValueError(f"BUSConfig.text_guided_from={config.text_guided_from} must index tsps_layers "
                                 f"({-len(self.layers)}..{len(self.layers) - 1})")
            # The stem ends before the block of the first text-guided TSPS layer.
            self.split = self.layers[config.text_guided_from]
        else:
            self.split = len(vit.blocks)
        self.pad = PAD(self.embed_dim, num_queries=config.pad_queries, depth=config.pad_depth,
                       num_heads=self.num_heads) if pad else None
        self._last: Optional[PruneState] = None

    @property
    def patch_embed(self) -> nn.Module:
        return self.vit.patch_embed

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def pruning_state(self) -> Optional[PruneState]:
        """The :class:`bus.PruneState` of the last :meth:`rest` (records for PTM, kept patches)."""
        return self._last

    # ------------------------------------------------------------------------------- passes
    def stem(self, images: Tensor) -> tuple[Tensor, PruneState]:
        """Patch embedding and blocks ``[0, split)`` (any TSPS among them CLS-guided).
        ``images`` [B, 3, H, W] -> (tokens [B, N', D], state)."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        state = PruneState(batch=x.shape[0], num_prefix=vit.num_prefix_tokens)
        return self._run(x, state, 0, self.split), state

    def rest(self, x: Tensor, state: PruneState, text: Optional[Tensor] = None,
             rows: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], PruneState]:
        """Blocks ``[split, depth)`` and the final norm, from :meth:`stem`'s output.

        ``text`` [R, D] (in the ViT's width) guides the TSPS layers of this part; None: the image
        [CLS]. ``rows`` int64 [R]: which stem rows to continue (default all). Returns (tokens
        [R, N'', D], key padding mask [R, N''] (True = padding, ``mass`` only) or None, state)."""
        if rows is not None:
            if state.packed:
                raise ValueError("VisionTower.rest: rows= needs fixed-size tokens (mass=None) before the split")
            x = x[rows]
        state = _branch(state, rows, text)
        x = self._run(x, state, self.split, len(self.vit.blocks))
        x = self.vit.norm(x)
        self._last = state
        pad_mask = None
        if state.lengths is not None:
            pad_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= state.lengths[:, None]
        return x, pad_mask, state

    def stem_cls(self, x: Tensor) -> Tensor:
        """The [CLS] of the stem's tokens after the ViT's final norm: [B, D]."""
        return self.vit.norm(x[:, :1])[:, 0]

    def forward(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The text-free (CLS-guided) pass: (tokens [B, N', D], key padding mask or None)."""
        x, state = self.stem(images)
        tokens, pad_mask, _ = self.rest(x, state)
        return tokens, pad_mask

    def memory(self, tokens: Tensor, pad_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """What the fusion attends to: the PAD summary [B, Q, D] (BUS) or every token (baseline)."""
        if self.pad is not None:
            return self.pad(tokens, pad_mask), None
        return tokens, pad_mask

    def _run(self, x: Tensor, state: PruneState, start: int, stop: int) -> Tensor:
        blocks = self.vit.blocks
        first = self.layers[0] if self.layers else len(blocks)
        for i in range(start, stop):
            if i < first:  # before any pruning: the block exactly as timm runs it
                x = blocks[i](x)
                continue
            x = pruned_block_forward(blocks[i], x, state)
            if i == len(blocks) - 1 and state.packed:
                # back to a padded batch for the final norm; lengths kept for the padding mask
                state.lengths = (state.cu_seqlens[1:] - state.cu_seqlens[:-1]).long()
                x = bk.unpack(x, state.cu_seqlens, state.max_seqlen)
        return x


def _branch(state: PruneState, rows: Optional[Tensor], text: Optional[Tensor]) -> PruneState:
    """A copy of the stem's state for one rest pass: the chosen rows, this pass's guidance, the
    stem's TSPS records (sliced to the rows) followed by this pass's own."""
    def pick(t):
        return t if t is None or rows is None else t[rows]

    records = [{k: pick(v) for k, v in rec.items()} for rec in state.records]
    return dataclasses.replace(
        state, batch=state.batch if rows is None else int(rows.shape[0]), text=text, text_mask=None,
        sizes=pick(state.sizes), patch_ids=pick(state.patch_ids), records=records,
    )
