"""The small BUS vision-language model (``arch="simple"``) and its baseline.

``BUSModel``: timm ViT with TSPS (text-guided pruning inside the ViT), PAD (a short summary of
the kept tokens), a BERT text encoder (``transformers`` config, random init), and a fusion
encoder (self-attention over the text, cross-attention to the image summary). Losses: ITC
(image-text contrastive), ITM (matching, hard negatives from the ITC similarities), PTM
(patch-text matching on each TSPS layer's relevance scores), LM (captioning: the fusion stack run
causally over the caption's token embeddings).
``BaselineModel`` is the same model without TSPS and PAD: the fusion encoder attends to every
ViT token. Both are built from one :class:`BUSConfig`, so comparisons are like for like.

``BUSModel(config)`` with ``config.arch == "mplug"`` builds the paper's stack instead
(:class:`bus.models.mplug.MPLUGModel`, a subclass), so ``BUSModel(cfg, bus=...)`` serves both.

``BUSConfig.guidance`` picks what steers TSPS in training: ``"image"`` (default) the image [CLS]
query, one ViT pass for every loss, with the captions teaching the selector through PTM; or
``"text"``, each caption guiding its own image (TRIPS-style), plus a second, CLS-guided pass for
the retrieval embedding. Evaluation never lets a caption guide the pruning of the image it is
scored against: retrieval embeddings come from the text-free (CLS-guided) forward;
:meth:`itm_scores` (re-ranking) guides as training did.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pad import PAD
from ..timm_patch import patch_timm
from .config import BUSConfig
from .losses import ptm_loss


class FusionEncoder(nn.Module):
    """Text self-attention + cross-attention to image tokens + MLP, pre-norm, ``depth`` layers.
    Bidirectional for ITM; causal (``causal=True``) for captioning."""

    def __init__(self, dim: int, depth: int, num_heads: int):
        super().__init__()
        layer = nn.TransformerDecoderLayer(dim, num_heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

    def forward(self, text: Tensor, text_pad: Tensor, image: Tensor, image_pad: Optional[Tensor], causal: bool = False) -> Tensor:
        L = text.shape[1]
        # bool like the padding masks (True = may not attend)
        mask = torch.ones(L, L, dtype=torch.bool, device=text.device).triu(1) if causal else None
        return self.layers(text, image, tgt_mask=mask, tgt_is_causal=causal, tgt_key_padding_mask=text_pad,
                           memory_key_padding_mask=image_pad)


class BUSModel(nn.Module):
    """The BUS vision-language model (``bus=True``) or its baseline (``bus=False``).

    ``forward(batch)`` takes a collated batch (``images [B,3,H,W]``, ``input_ids [B,L]``,
    ``attention_mask [B,L]``, optional ``patch_labels [B,P]``) and returns a dict of float32
    scalar losses (``loss`` is their weighted sum).
    """

    def __new__(cls, config: Optional[BUSConfig] = None, *args, **kwargs):
        # BUSModel(cfg) with cfg.arch == "mplug" is the paper's stack (a subclass); copy/pickle
        # call __new__ without arguments.
        if cls is BUSModel and config is not None and getattr(config, "arch", "simple") == "mplug":
            from .mplug import MPLUGModel

            return super().__new__(MPLUGModel)
        return super().__new__(cls)

    def __init__(self, config: BUSConfig, *, bus: bool = True):
        super().__init__()
        import timm
        from transformers import BertConfig, BertModel

        if config.arch != "simple":
            raise ValueError(f"BUSConfig.arch={config.arch!r} must be 'simple' or 'mplug'")
        if config.guidance not in ("image", "text"):
            raise ValueError(f"BUSConfig.guidance={config.guidance!r} must be 'image' or 'text'")
        self.config, self.bus = config, bus
        self.vision = timm.create_model(config.vit, pretrained=False, num_classes=0, img_size=config.img_size,
                                        **config.vit_kwargs)
        D = self.vision.embed_dim
        heads = self.vision.blocks[0].attn.num_heads
        self.use_tsps = bus and config.tsps
        self.use_pad = bus and config.pad
        if self.use_tsps:
            patch_timm(self.vision, layers=config.tsps_layers, keep=config.keep, mass=config.mass,
                       fuse=config.fuse, guidance="auto")
        self.pad = PAD(D, num_queries=config.pad_queries, depth=config.pad_depth, num_heads=heads) if self.use_pad else None
        bert = BertConfig(vocab_size=config.vocab_size, hidden_size=D, num_hidden_layers=config.text_layers,
                          num_attention_heads=heads, intermediate_size=4 * D,
                          max_position_embeddings=max(64, config.max_text_len))
        self.text = BertModel(bert, add_pooling_layer=False)
        self.fusion = FusionEncoder(D, config.fusion_layers, heads)
        self.vision_proj = nn.Linear(D, config.embed_dim)
        self.text_proj = nn.Linear(D, config.embed_dim)
        self.itm_head = nn.Linear(D, 2)
        self.lm_head = nn.Linear(D, config.vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / config.temperature).log())

    # ----------------------------------------------------------------------------- encoders
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text tokens [B, L, D] (token 0 is [CLS])."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_image(self, images: Tensor, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None):
        """(ViT tokens [B, N', D], key padding mask [B, N'] or None). With TSPS, ``text`` ([B, D] or
        [B, T, D] + mask) guides the pruning; without it the image [CLS] does."""
        if self.use_tsps:
            tokens = self.vision.forward_features(images, text=text, text_mask=text_mask)
            state = self.vision.pruning_state()
            pad_mask = None
            if state.lengths is not None:
                pad_mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= state.lengths[:, None]
            return tokens, pad_mask
        return self.vision.forward_features(images), None

    def image_memory(self, tokens: Tensor, pad_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """What the fusion encoder attends to: the PAD summary (BUS) or every ViT token (baseline)."""
        if self.use_pad:
            return self.pad(tokens, pad_mask), None
        return tokens, pad_mask

    def image_embedding(self, images: Tensor) -> Tensor:
        """Normalised ITC embeddings [B, embed_dim] from the text-free (CLS-guided) forward."""
        tokens, _ = self.encode_image(images)
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def itm_scores(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Match probability [B] of each (image, caption) pair; the caption guides the pruning."""
        text = self.encode_text(input_ids, attention_mask)
        guide = text[:, 0] if self.config.guidance == "text" else None  # as in training
        tokens, pad = self.encode_image(images, text=guide)
        mem, mem_pad = self.image_memory(tokens, pad)
        fused = self.fusion(text, attention_mask == 0, mem, mem_pad)
        return self.itm_head(fused[:, 0]).softmax(dim=-1)[:, 1]

    # -------------------------------------------------------------------------------- losses
    def forward(self, batch: dict) -> dict:
        images, ids, am = batch["images"], batch["input_ids"], batch["attention_mask"]
        B = images.shape[0]
        text = self.encode_text(ids, am)
        text_cls = text[:, 0]
        free_emb = None
        text_guided = self.use_tsps and self.config.guidance == "text"
        if text_guided and self.config.itc_text_free > 0:  # before the guided pass: PTM reads its state
            free_emb = F.normalize(self.vision_proj(self.encode_image(images)[0][:, 0]).float(), dim=-1)
        # guidance="text" lets each caption guide its own image (TRIPS) in training; evaluation never does.
        tokens, pad = self.encode_image(images, text=text_cls if text_guided else None)
        img_emb = F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)
        txt_emb = F.normalize(self.text_proj(text_cls).float(), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        sim_i2t = scale * img_emb @ txt_emb.t()
        target = torch.arange(B, device=images.device)
        losses = {"itc": (F.cross_entropy(sim_i2t, target) + F.cross_entropy(sim_i2t.t(), target)) / 2}
        if free_emb is not None:
            sim_free = scale * free_emb @ txt_emb.t()
            losses["itc_free"] = (F.cross_entropy(sim_free, target) + F.cross_entropy(sim_free.t(), target)) / 2

        mem, mem_pad = self.image_memory(tokens, pad)
        text_pad = am == 0
        # ITM: positives, plus for every image a hard negative caption and for every caption a
        # hard negative image, drawn in proportion to the ITC similarity (the positive excluded).
        with torch.no_grad():
            w = sim_i2t.float().softmax(dim=1).masked_fill(torch.eye(B, dtype=torch.bool, device=images.device), 0)
            if B > 1:
                neg_txt = torch.multinomial(w + 1e-9 * (w.sum(1, keepdim=True) == 0), 1).squeeze(1)
                w_t = sim_i2t.t().float().softmax(dim=1).masked_fill(torch.eye(B, dtype=torch.bool, device=images.device), 0)
                neg_img = torch.multinomial(w_t + 1e-9 * (w_t.sum(1, keepdim=True) == 0), 1).squeeze(1)
        if B > 1:
            text_all = torch.cat([text, text[neg_txt], text])
            text_pad_all = torch.cat([text_pad, text_pad[neg_txt], text_pad])
            mem_all = torch.cat([mem, mem, mem[neg_img]])
            mem_pad_all = None if mem_pad is None else torch.cat([mem_pad, mem_pad, mem_pad[neg_img]])
            fused = self.fusion(text_all, text_pad_all, mem_all, mem_pad_all)
            labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(images.device)
            losses["itm"] = F.cross_entropy(self.itm_head(fused[:, 0]).float(), labels)
        else:
            losses["itm"] = torch.zeros((), device=images.device)

        # LM (captioning): predict token t+1 from tokens <= t and the image. The fusion runs causally
        # over the caption's token embeddings (word + position), not the text encoder's output: the
        # encoder is bidirectional, so its token t already holds token t + 1 (a leak that made the
        # loss trivial before 2026-12-03).
        dec = self.fusion(self.text.embeddings(input_ids=ids), text_pad, mem, mem_pad, causal=True)
        logits = self.lm_head(dec[:, :-1]).float()
        tgt = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        losses["lm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)

        losses["ptm"] = self._ptm_loss(batch.get("patch_labels")) if self.use_tsps else torch.zeros((), device=images.device)
        cfg = self.config
        losses["loss"] = (cfg.w_itc * losses["itc"] + cfg.w_itm * losses["itm"] + cfg.w_lm * losses["lm"]
                          + cfg.w_ptm * losses["ptm"] + cfg.itc_text_free * losses.get("itc_free", 0.0))
        return losses

    def _ptm_loss(self, patch_labels: Optional[Tensor]) -> Tensor:
        """PTM on the last ViT forward's TSPS records (see :func:`bus.models.losses.ptm_loss`)."""
        state = self.vision.pruning_state()
        if patch_labels is None or state is None:
            return self.logit_scale.new_zeros(())
        return ptm_loss(state.records, patch_labels, self.logit_scale.new_zeros(()))


def BaselineModel(config: BUSConfig) -> BUSModel:  # noqa: N802 (a class-like factory)
    """The same model without TSPS and PAD: the fusion encoder attends to every ViT token."""
    return BUSModel(config, bus=False)
