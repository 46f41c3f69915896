"""Data for the BUS model layer, one module per duty:

- :mod:`.synthetic`: :class:`SyntheticShapes`, the built-in captioned-shapes set;
- :mod:`.caption_folder`: :class:`CaptionFolder`, image-caption pairs from a local folder;
- :mod:`.tokenizer`: :func:`build_tokenizer`, :func:`synthetic_tokenizer` (download-free WordPiece);
- :mod:`.images`: ImageNet normalisation, :func:`boxes_to_patch_labels`, :func:`denormalize`;
- :mod:`.loader`: :func:`collate` and :func:`make_loader`.

Every item is a dict::

    image         float32 [3, H, W]   ImageNet-normalised
    caption       str
    patch_labels  float32 [P]         P = (image_size // patch_size) ** 2; 1 = the patch overlaps an
                                      object the caption mentions, 0 = it does not, -1 = unknown
                                      (ignored by the Patch-Text Matching loss)
    boxes         float32 [m, 4]      mentioned objects, (x0, y0, x1, y1) in pixels of the resized
                                      image, x1/y1 exclusive
    image_id      int

Nothing here downloads anything: images are drawn with numpy or read from a local folder, and the
tokenizer vocabulary is built locally, deterministically, and run by ``tokenizers``.
"""
from .caption_folder import CaptionFolder, DataWarning
from .images import IMAGENET_MEAN, IMAGENET_STD, boxes_to_patch_labels, denormalize
from .loader import collate, make_loader
from .synthetic import COLORS, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, SyntheticShapes, synthetic_vocabulary
from .tokenizer import SPECIAL_TOKENS, build_tokenizer, synthetic_tokenizer

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPECIAL_TOKENS",
    "COLORS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "DataWarning",
    "ShapeObject",
    "Scene",
    "SyntheticShapes",
    "CaptionFolder",
    "boxes_to_patch_labels",
    "denormalize",
    "synthetic_vocabulary",
    "build_tokenizer",
    "synthetic_tokenizer",
    "collate",
    "make_loader",
]
