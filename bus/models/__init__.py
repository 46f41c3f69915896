"""The model layer's vision-language models, one file per part.

- :mod:`.config`: :class:`BUSConfig` and its presets (``tiny``, ``paper``, ``paper_tiny``);
- :mod:`.simple`: the small stack (``arch="simple"``) and :class:`BUSModel`, which builds either;
- :mod:`.mplug`: the paper's stack (``arch="mplug"``), assembled from
  :mod:`.vision` (ViT + TSPS + PAD, stem/rest split for text-free retrieval),
  :mod:`.text` (BERT text encoder, MLM head), :mod:`.fusion` (mPLUG's skip-connected fusion),
  :mod:`.decoder` (PrefixLM decoder) and :mod:`.losses` (ITC + momentum distillation + queue,
  ITM, MLM, PrefixLM, PTM).
"""
from .config import BUSConfig
from .simple import BaselineModel, BUSModel, FusionEncoder

__all__ = ["BUSConfig", "BUSModel", "BaselineModel", "FusionEncoder"]
