"""The paper's stack (``BUSConfig.arch == "mplug"``): BUS on mPLUG-style pre-training.

Parts (one file each): :mod:`.vision` (ViT + TSPS + PAD, stem/rest split), :mod:`.text` (BERT
text encoder, MLM head), :mod:`.fusion` (skip-connected fusion), :mod:`.decoder` (PrefixLM
decoder), :mod:`.losses`. ``MPLUGModel(cfg, bus=False)`` is the baseline: no TSPS, no PAD, the
fusion and decoder attend to every ViT token.

One training step (``forward``), as ALBEF/mPLUG, plus BUS's PTM:

1. momentum update of the momentum encoders (EMA, no grad; training mode only);
2. text encoder on the caption; ViT stem once; the text-free (CLS-guided) rest -> ITC image
   feature; momentum ViT (CLS-guided) and momentum text encoder -> ITC targets and the queue;
3. ITC with momentum distillation against batch + queue (in-batch candidates online by default,
   ``BUSConfig.itc_batch``); hard negatives from its similarities;
4. the visual tokens the fusion sees: ``guidance="image"``: the CLS-guided tokens for every row;
   ``"text"``: one caption-guided rest pass over 3B rows (image + its caption, image + its hard
   negative caption, hard negative image + caption), each image guided by the caption it is
   paired with, as :meth:`itm_scores` does at evaluation; PAD on each;
5. fusion: ITM on the 3B rows; MLM (15% masked caption) on the positive rows; PrefixLM: the
   caption's prefix through text encoder + fusion with the positive rows, the decoder predicting the
   suffix from [fused visual tokens; fused prefix];
6. PTM on the TSPS relevance of the positive rows (the caption-guided selector in ``"text"``);
7. enqueue the momentum features (gathered over every DDP rank, as ALBEF).

Retrieval (``image_embedding``) uses only the CLS-guided path, never a caption.
MLM and PrefixLM reuse the positive rows' visual tokens: in ``"text"`` mode these were selected
under the whole caption's guidance (the masked words and the suffix steered which patches were
kept, not their content); separate passes guided by the masked caption / the prefix would cost two
more rest passes per step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses as L
from .config import BUSConfig
from .decoder import TextDecoder
from .fusion import SkipConnectedFusion
from .simple import BUSModel
from .text import MLMHead, TextEncoder, bert_config
from .vision import VisionTower


class MPLUGModel(BUSModel):
    """BUS (``bus=True``) or its baseline on the paper's stack; built by ``BUSModel(cfg, bus=...)``
    when ``cfg.arch == "mplug"``. Same API as the small model: ``forward(batch) -> dict`` of float32
    scalar losses (``itc``, ``itm``, ``mlm``, ``lm`` (PrefixLM), ``ptm``, ``loss``),
    ``image_embedding``, ``text_embedding``, ``itm_scores``, ``vision.pruning_state()``."""

    def __init__(self, config: BUSConfig, *, bus: bool = True):
        nn.Module.__init__(self)
        if config.arch != "mplug":
            raise ValueError(f"MPLUGModel needs BUSConfig.arch='mplug', got {config.arch!r}")
        if config.guidance not in ("image", "text"):
            raise ValueError(f"BUSConfig.guidance={config.guidance!r} must be 'image' or 'text'")
        if not 0 <= config.momentum <= 1:
            raise ValueError(f"BUSConfig.momentum={config.momentum} must be in [0, 1]")
        if not 0 <= config.distill_alpha <= 1:
            raise ValueError(f"BUSConfig.distill_alpha={config.distill_alpha} must be in [0, 1]")
        if not 0 < config.mlm_prob < 1:
            raise ValueError(f"BUSConfig.mlm_prob={config.mlm_prob} must be in (0, 1)")
        self.config, self.bus = config, bus
        self.use_tsps, self.use_pad = bus and config.tsps, bus and config.pad
        self.text_guided = self.use_tsps and config.guidance == "text"
        if config.itm_negatives not in ("guided", "reuse"):
            raise ValueError(f"BUSConfig.itm_negatives={config.itm_negatives!r} must be 'guided' or 'reuse'")
        if config.itc_on not in ("rest", "stem"):
            raise ValueError(f"BUSConfig.itc_on={config.itc_on!r} must be 'rest' or 'stem'")
        self.itc_from_stem = self.text_guided and config.itc_on == "stem"
        if config.itc_batch not in ("online", "momentum"):
            raise ValueError(f"BUSConfig.itc_batch={config.itc_batch!r} must be 'online' or 'momentum'")
        if self.text_guided and config.mass is not None and config.text_guided_from % max(1, len(config.tsps_layers)):
            raise ValueError("BUSConfig: guidance='text' with a CLS-guided TSPS layer in the stem (text_guided_from "
                             f"={config.text_guided_from}) needs mass=None (the stem's tokens are re-batched per pair)")
        self.vision = VisionTower(config, tsps=self.use_tsps, pad=self.use_pad)
        D, H = self.vision.embed_dim, self.vision.num_heads
        Dt = config.text_width or D
        if Dt % H:
            raise ValueError(f"BUSConfig.text_width={Dt} must be divisible by the ViT's {H} heads")
        enc_cfg = bert_config(config, width=Dt, heads=H, layers=config.text_layers)
        self.text = TextEncoder(enc_cfg)
        self.fusion = SkipConnectedFusion(bert_config(config, width=Dt, heads=H, layers=1, decoder=True), enc_cfg,
                                          config.fusion_layers, config.connect_every)
        self.decoder = TextDecoder(bert_config(config, width=Dt, heads=H, layers=config.decoder_layers, decoder=True))
        self.mlm_head = MLMHead(enc_cfg)
        # Text [CLS] -> the ViT's width for TSPS guidance, and visual tokens -> the text width for
        # the fusion (mPLUG's visn_fc + LayerNorm) when the widths differ.
        # (None, not nn.Identity, when equal: an Identity module confuses FLOP attribution by module)
        self.guide_proj = nn.Linear(Dt, D) if Dt != D else None
        self.visual_fc = nn.Sequential(nn.Linear(D, Dt), nn.LayerNorm(Dt, eps=1e-12)) if Dt != D else None
        self.vision_proj = nn.Linear(D, config.embed_dim)
        self.text_proj = nn.Linear(Dt, config.embed_dim)
        self.itm_head = nn.Linear(Dt, 2)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / config.temperature).log())
        # Momentum encoders for ITC's distillation targets and queue (ALBEF): copies, EMA-updated.
        self.vision_m = VisionTower(config, tsps=self.use_tsps, pad=False)
        self.vision_proj_m = nn.Linear(D, config.embed_dim)
        self.text_m = TextEncoder(enc_cfg)
        self.text_proj_m = nn.Linear(Dt, config.embed_dim)
        self._pairs = [(self.vision, self.vision_m), (self.vision_proj, self.vision_proj_m),
                       (self.text, self.text_m), (self.text_proj, self.text_proj_m)]
        with torch.no_grad():
            for online, mom in self.momentum_pairs():
                mom.copy_(online)
        for _, m in self._pairs:
            m.requires_grad_(False)
        self.queue = L.FeatureQueue(config.queue_size, config.embed_dim)

    # ------------------------------------------------------------------------- momentum
    def momentum_pairs(self):
        """(online, momentum) parameter pairs (PAD has no momentum copy: ITC does not use it)."""
        for online, mom in self._pairs:
            mp = dict(mom.named_parameters())
            for name, p in online.named_parameters():
                if name in mp:
                    yield p, mp[name]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m <- m * p_m + (1 - m) * p for every momentum parameter (m = ``config.momentum``)."""
        m = self.config.momentum
        for p, p_m in self.momentum_pairs():
            p_m.copy_(p_m * m + p.detach() * (1 - m))

    # ------------------------------------------------------------------------- encoders
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text tokens [B, L, Dt] (token 0 is [CLS])."""
        return self.text(input_ids, attention_mask)

    def _guide(self, text_cls: Tensor) -> Tensor:
        return text_cls if self.guide_proj is None else self.guide_proj(text_cls)

    def _free_cls(self, vision: "VisionTower", images: Tensor):
        """The text-free ITC feature's input [B, D] (``itc_on``: after the stem or a CLS-guided rest),
        plus the stem's (tokens, state) and the CLS-guided rest's (tokens, pad, state) or None."""
        x, state = vision.stem(images)
        if self.itc_from_stem:
            return vision.stem_cls(x), x, state, None
        free = vision.rest(x, state)
        return free[0][:, 0], x, state, free

    def image_embedding(self, images: Tensor) -> Tensor:
        """Normalised ITC embeddings [B, embed_dim] from the text-free (CLS-guided) pass."""
        return F.normalize(self.vision_proj(self._free_cls(self.vision, images)[0]), dim=-1)

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def _fuse_memory(self, tokens: Tensor, pad: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        mem, mem_pad = self.vision.memory(tokens, pad)
        valid = torch.ones(mem.shape[:2], dtype=torch.bool, device=mem.device) if mem_pad is None else ~mem_pad
        return (mem if self.visual_fc is None else self.visual_fc(mem)), valid

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Match probability [B] of each (image, caption) pair; in ``"text"`` mode the caption
        guides the pruning of the image it is paired with, as in training."""
        text = self.encode_text(input_ids, attention_mask)
        x, state = self.vision.stem(images)
        tokens, pad, _ = self.vision.rest(x, state, text=self._guide(text[:, 0]) if self.text_guided else None)
        mem, mem_valid = self._fuse_memory(tokens, pad)
        _, fused = self.fusion(text, attention_mask > 0, mem, mem_valid)
        return self.itm_head(fused[:, 0]).float().softmax(dim=-1)[:, 1]

    # ---------------------------------------------------------------------------- losses
    def forward(self, batch: dict) -> dict:
        cfg = self.config
        images, ids, am = batch["images"], batch["input_ids"], batch["attention_mask"]
        B = images.shape[0]
        if B < 2:
            raise ValueError(f"MPLUGModel.forward: batch of {B}; ITC/ITM need at least 2 pairs")
        if self.training:
            self.momentum_update()
        text = self.encode_text(ids, am)
        free_cls, x, stem_state, free = self._free_cls(self.vision, images)
        img_feat = F.normalize(self.vision_proj(free_cls).float(), dim=-1)
        txt_feat = F.normalize(self.text_proj(text[:, 0]).float(), dim=-1)
        with torch.no_grad():
            img_m = F.normalize(self.vision_proj_m(self._free_cls(self.vision_m, images)[0]).float(), dim=-1)
            txt_m = F.normalize(self.text_proj_m(self.text_m(ids, am)[:, 0]).float(), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        losses = {}
        losses["itc"], sim_i2t = L.itc_distill_loss(img_feat, txt_feat, img_m, txt_m, self.queue, scale,
                                                    cfg.distill_alpha, batch=cfg.itc_batch)

        # Visual tokens per fusion row: (image, caption), (image, hard negative caption), (hard
        # negative image, caption).
        neg_txt, neg_img = L.hard_negatives(sim_i2t.detach())
        ar = torch.arange(B, device=images.device)
        img_rows, txt_rows = torch.cat([ar, ar, neg_img]), torch.cat([ar, neg_txt, ar])
        if self.text_guided and cfg.itm_negatives == "guided":
            guide = self._guide(text[:, 0])[txt_rows]
            tokens, pad, state = self.vision.rest(x, stem_state, text=guide, rows=img_rows)
            mem, mem_valid = self._fuse_memory(tokens, pad)
        else:
            if self.text_guided:  # "reuse": the B positives, each guided by its caption
                tokens, pad, state = self.vision.rest(x, stem_state, text=self._guide(text[:, 0]))
            else:
                tokens, pad, state = free
            mem, mem_valid = self._fuse_memory(tokens, pad)  # PAD once per image, then the rows
            mem, mem_valid = mem[img_rows], mem_valid[img_rows]
        valid = am > 0

        _, fused = self.fusion(text[txt_rows], valid[txt_rows], mem, mem_valid)
        losses["itm"] = L.itm_loss(self.itm_head(fused[:, 0]), B)

        pos_mem, pos_valid = mem[:B], mem_valid[:B]
        masked, mlm_labels = L.mask_tokens(ids, am, prob=cfg.mlm_prob, mask_id=cfg.mask_token_id,
                                           vocab_size=cfg.vocab_size, special_below=cfg.num_special_tokens)
        _, fused_m = self.fusion(self.encode_text(masked, am), valid, pos_mem, pos_valid)
        losses["mlm"] = L.token_loss(self.mlm_head(fused_m), mlm_labels)

        p_ids, p_mask, d_ids, d_mask = L.prefix_split(ids, am, bos_id=cfg.cls_token_id, pad_id=cfg.pad_token_id)
        img_p, txt_p = self.fusion(self.encode_text(p_ids, p_mask), p_mask > 0, pos_mem, pos_valid)
        memory = torch.cat([img_p, txt_p], dim=1)
        memory_mask = torch.cat([pos_valid, p_mask > 0], dim=1).long()
        logits = self.decoder(d_ids, d_mask, memory, memory_mask)
        targets = d_ids.masked_fill(d_mask == 0, -100)
        losses["lm"] = L.token_loss(logits[:, :-1], targets[:, 1:])

        zero = self.logit_scale.new_zeros(())
        labels = batch.get("patch_labels")
        losses["ptm"] = L.ptm_loss(state.records, labels, zero, rows=B) if self.use_tsps and labels is not None else zero

        if self.training:
            # Every rank enqueues the global batch's momentum features (ALBEF), so under DDP the queues
            # stay identical and DDP's buffer broadcast from rank 0 overwrites nothing.
            self.queue.enqueue(*L.gather_across_ranks(img_m, txt_m))
        losses["loss"] = (cfg.w_itc * losses["itc"] + cfg.w_itm * losses["itm"] + cfg.w_mlm * losses["mlm"]
                          + cfg.w_lm * losses["lm"] + cfg.w_ptm * losses["ptm"])
        return losses
