"""bus: the model layer of bus-kernels.

- :class:`TSPS`: Text-Semantics-Aware Patch Selector (scores patches against the text or the
  image [CLS], keeps the relevant ones, fuses the rest), attached to ViT blocks by
- :func:`patch_timm`: an in-place drop-in for timm ``VisionTransformer`` models;
- :func:`patch_hf`: the same for ``transformers`` vision towers (ViT, CLIP, SigLIP, DINOv2);
- :class:`PAD`: the Patch Abstraction Decoder (learnable queries over the kept tokens).

It calls only the public :mod:`bus_kernels` API.
"""
from .pad import PAD
from .hf_patch import HFPruneState, patch_hf
from .timm_patch import patch_timm
from .tsps import TSPS, PruneState

__all__ = ["HFPruneState", "PAD", "PruneState", "TSPS", "patch_hf", "patch_timm"]
