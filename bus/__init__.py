"""bus: the model layer of bus-kernels.

- :class:`TSPS`: Text-Semantics-Aware Patch Selector (scores patches against the text or the
  image [CLS], keeps the relevant ones, fuses the rest), attached to ViT blocks by
- :func:`patch_timm`: an in-place drop-in for timm ``VisionTransformer`` models;
- :class:`PAD`: the Patch Abstraction Decoder (learnable queries over the kept tokens).

It calls only the public :mod:`bus_kernels` API.
"""
from .pad import PAD
from .timm_patch import patch_timm
from .tsps import TSPS, PruneState

__all__ = ["PAD", "PruneState", "TSPS", "patch_timm"]
