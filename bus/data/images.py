"""Image helpers shared by the data sets: ImageNet normalisation and box -> patch labels."""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "boxes_to_patch_labels", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_geometry(image_size: int, patch_size: int) -> None:
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"image_size ({image_size}) must be a positive multiple of patch_size ({patch_size})"
        )


def boxes_to_patch_labels(boxes: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Mark the patches that overlap any box.

    Args:
        boxes: float [m, 4] (x0, y0, x1, y1) in pixels of a square ``image_size`` image, x1/y1
            exclusive. ``m`` may be 0.
        image_size, patch_size: the image side and the ViT patch side (``image_size`` a multiple).
    Returns:
        float32 [(image_size // patch_size) ** 2], row-major over the patch grid (the ViT's token
        order): 1.0 where the patch and some box share a positive area, else 0.0.
    """
    _check_geometry(image_size, patch_size)
    g = image_size // patch_size
    labels = torch.zeros(g, g, dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    # A box edge that lands on a patch border after float rescaling (31.9999 or 32.0001) must
    # not claim the neighbouring patch: demand a sliver of overlap, not just touching.
    eps = 1e-3
    for x0, y0, x1, y1 in boxes.tolist():
        c0 = max(0, math.floor((x0 + eps) / patch_size))
        c1 = min(g, math.ceil((x1 - eps) / patch_size))
        r0 = max(0, math.floor((y0 + eps) / patch_size))
        r1 = min(g, math.ceil((y1 - eps) / patch_size))
        if c1 > c0 and r1 > r0:
            labels[r0:r1, c0:c1] = 1.0
    return labels.reshape(-1)


# Normalisation as one multiply-add per element: x * (1 / (255 std)) - mean / std.
_NORM_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, dtype=np.float32))).reshape(3, 1, 1)
_NORM_SHIFT = (
    -np.asarray(IMAGENET_MEAN, dtype=np.float32) / np.asarray(IMAGENET_STD, dtype=np.float32)
).reshape(3, 1, 1)


def _normalise_chw_uint8(img: np.ndarray) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [3, H, W], ImageNet-normalised (a fresh tensor)."""
    x = np.ascontiguousarray(img).astype(np.float32)
    x *= _NORM_SCALE
    x += _NORM_SHIFT
    return torch.from_numpy(x)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation, for viewing or pixel checks.

    Args:
        image: float [..., 3, H, W] as returned by the data sets.
    Returns:
        float32 [..., 3, H, W] in [0, 1] (clamped).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (image.float() * std + mean).clamp_(0.0, 1.0)
