"""``BUSConfig``: everything that defines a model, and its presets.

Two architectures share one config, so a checkpoint's ``model_config`` rebuilds either:

- ``arch="simple"`` (:meth:`BUSConfig.tiny`, ``BUSConfig()``): the small stack of the first
  benchmarks: ViT, BERT text encoder, a fusion encoder of ``nn.TransformerDecoder`` layers, losses
  ITC (in batch), ITM, PTM, causal LM.
- ``arch="mplug"`` (:meth:`BUSConfig.paper`, :meth:`BUSConfig.paper_tiny`): the stack BUS builds on
  (mPLUG, ``alibaba/AliceMind``): CLIP-style ViT-B/16 at 256 px, 6-layer BERT text encoder, 6-layer
  skip-connected fusion (asymmetric co-attention, a connected layer every 3rd), 12-layer text
  decoder; losses ITC with momentum distillation and a feature queue, ITM with hard negatives, MLM,
  PrefixLM, PTM.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence


@dataclass
class BUSConfig:
    """Everything that defines a model; ``BUSConfig.tiny()`` is the CPU-test size of the small
    stack, ``BUSConfig.paper()`` / ``paper_tiny()`` the paper's stack and its CPU-test size."""

    arch: str = "simple"  # "simple" or "mplug" (the paper's stack)
    vit: str = "vit_base_patch16_224"
    img_size: int = 224
    vit_kwargs: dict = field(default_factory=dict)
    vocab_size: int = 1000
    max_text_len: int = 32
    text_layers: int = 6
    fusion_layers: int = 6
    embed_dim: int = 256  # ITC projection width
    # TSPS
    tsps: bool = True
    tsps_layers: Sequence[int] = (4, 7, 10)
    keep: float = 0.7
    mass: Optional[float] = None
    fuse: str = "sum"
    # PAD
    pad: bool = True
    pad_queries: int = 64
    pad_depth: int = 2
    # losses (w_lm: the captioning loss, PrefixLM in the paper's stack)
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_ptm: float = 1.0
    w_lm: float = 1.0
    # What guides TSPS in training. "image": the image [CLS] query of each pruning block, in every
    # pass, so one ViT pass serves every loss, and training sees the same pruning as text-free
    # retrieval; the caption shapes the selector through PTM. "text": each caption guides its own
    # image (TRIPS-style, the paper) for the losses that see image and caption together.
    guidance: str = "image"
    # simple stack, guidance="text" only: ITC also on the text-free (CLS-guided) embedding that
    # retrieval uses; without it that embedding is never trained. One more pruned ViT pass.
    itc_text_free: float = 1.0
    temperature: float = 0.07
    # ---- the paper's stack (arch="mplug") only
    text_width: Optional[int] = None  # BERT width; None: the ViT's width
    decoder_layers: int = 12
    connect_every: int = 3  # mPLUG's stride_layer: fusion layer i > 0 with i % 3 == 0 is connected
    w_mlm: float = 1.0
    mlm_prob: float = 0.15
    queue_size: int = 65536
    momentum: float = 0.995
    distill_alpha: float = 0.4  # ITC soft targets: alpha * momentum similarities + (1 - alpha) * one-hot
    # ITC's in-batch candidates: "online" (both encoders get every in-batch term's gradient, as CLIP)
    # or "momentum" (ALBEF exactly: the other side's momentum features). ALBEF starts from pretrained
    # encoders; from random init "momentum" left chance only after ~800 of 1000 steps on paper_tiny,
    # "online" after 150-450 (bus/models/losses.py, benchmarks/RESULTS.md).
    itc_batch: str = "online"
    # Std of the normal init of the transformer weights (ViT linear layers, every BERT-style part).
    # None: 0.02 * sqrt(768 / width), per tower (ViT width, text width): BERT/ViT-B's 0.02 at width
    # 768 (the paper preset's init is unchanged), scaled with fan-in so that a narrow preset starts
    # with the same spread of [CLS] features across inputs as the full one (a fixed 0.02 at width 64
    # leaves every caption's [CLS] feature at cosine 1 - 1e-5 to the others, 100x closer than at 768).
    init_std: Optional[float] = None
    # guidance="text": index into tsps_layers (negative: from the end) of the first layer the caption
    # guides. The ViT up to that layer runs once, CLS-guided (shared by every pass); only the blocks
    # from there on run again per caption-guided pass. 0: every TSPS layer text-guided (as the paper);
    # -1: only the last one (cheapest). See bus/models/vision.py and benchmarks/flops.py.
    text_guided_from: int = 0
    # guidance="text": the visual tokens of ITM's negative pairs. "guided": each pair's image guided by
    # the caption it is paired with (as itm_scores at evaluation; a rest pass over 3B rows). "reuse":
    # one rest pass over the B positives, negatives reuse their image's tokens (ALBEF-style; B rows,
    # but a negative's selection was steered by another caption, which ITM can learn to read).
    itm_negatives: str = "guided"
    # guidance="text": where the text-free ITC / retrieval feature comes from. "rest": a CLS-guided
    # pass of the blocks after the stem (full depth). "stem": the stem's [CLS] (after the final
    # norm), no extra pass; with text_guided_from = the last TSPS layer that is most of the ViT.
    itc_on: str = "rest"
    # special token ids of the tokenizer (bus.data: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4
    num_special_tokens: int = 5  # ids below this are never drawn as MLM random replacements

    @classmethod
    def tiny(cls, **overrides) -> "BUSConfig":
        """A ViT of width 64, depth 6 at 64 px (16 patches); 2-layer text and fusion stacks."""
        cfg = dict(
            vit="vit_tiny_patch16_224", img_size=64,
            vit_kwargs=dict(embed_dim=64, depth=6, num_heads=4), text_layers=2, fusion_layers=2,
            embed_dim=32, tsps_layers=(1, 3, 4), pad_queries=8, pad_depth=1,
        )
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def paper(cls, **overrides) -> "BUSConfig":
        """The paper's pre-training stack (mPLUG-base, ``configs/pretrain_mplug_base.yaml``): CLIP-style
        ViT-B/16 (timm ``vit_base_patch16_clip_224``, random init) at 256 px, 6-layer BERT text
        encoder, 6-layer skip-connected fusion, 12-layer decoder, width 768; ITC queue 65536,
        momentum 0.995, alpha 0.4, MLM 15%; TSPS keep 0.7 at blocks 4/7/10, PAD 64.

        Guidance: the caption guides the last TSPS layer (block 10); blocks 0-9 (CLS-guided pruning at
        4 and 7) run once and their [CLS] is the text-free ITC / retrieval feature; ITM negatives reuse
        their image's tokens. This is the text-guided variant that meets the FLOP target
        (``benchmarks/flops.py``: 1.53x vs 0.94x for every layer text-guided with its own text-free
        pass and pair-guided negatives, ``text_guided_from=0, itc_on="rest", itm_negatives="guided"``)."""
        cfg = dict(
            arch="mplug", vit="vit_base_patch16_clip_224", img_size=256, vocab_size=30522, max_text_len=40,
            text_layers=6, fusion_layers=6, decoder_layers=12, embed_dim=256, tsps_layers=(4, 7, 10),
            keep=0.7, pad_queries=64, pad_depth=2, guidance="text", text_guided_from=-1, itc_on="stem",
            itm_negatives="reuse",
        )
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def paper_tiny(cls, **overrides) -> "BUSConfig":
        """The paper's stack at the size of :meth:`tiny`: width 64, ViT depth 6 at 64 px, 2-layer text
        encoder, 4-layer fusion (the 4th connected), 2-layer decoder, a 256-entry queue; guidance as
        :meth:`paper`."""
        cfg = dict(
            arch="mplug", vit="vit_base_patch16_clip_224", img_size=64,
            vit_kwargs=dict(embed_dim=64, depth=6, num_heads=4), text_layers=2, fusion_layers=4,
            decoder_layers=2, embed_dim=32, tsps_layers=(1, 3, 4), pad_queries=8, pad_depth=1,
            queue_size=256, guidance="text", text_guided_from=-1, itc_on="stem", itm_negatives="reuse",
        )
        cfg.update(overrides)
        return cls(**cfg)

    def weight_init_std(self, width: int) -> float:
        """The init std of a transformer tower of ``width`` (paper stack): ``init_std``, else
        0.02 * sqrt(768 / width)."""
        if self.init_std is not None:
            if not self.init_std > 0:
                raise ValueError(f"BUSConfig.init_std={self.init_std} must be > 0 (or None)")
            return float(self.init_std)
        return 0.02 * math.sqrt(768 / width)

    def to_dict(self) -> dict:
        return asdict(self)
