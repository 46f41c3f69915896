"""The built-in captioned-shapes data set: coloured shapes on a dark background, a caption that
names one to three of them (with a spatial relation), and per-patch labels of what it names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import _check_geometry, _normalise_chw_uint8, boxes_to_patch_labels

__all__ = ["COLORS", "RELATIONS", "SHAPES", "SIZES", "Scene", "ShapeObject", "SyntheticShapes",
           "synthetic_vocabulary"]

# Colours are chosen far apart in RGB and all bright enough to stand out on the dark background,
# so the colour word in a caption is recoverable from the pixels.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Half-extent of an object as a fraction of the image side, per size word.
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.06, 0.08), "large": (0.12, 0.16)}
RELATIONS = ("left of", "right of", "above", "below", "next to")
_CAPTION_WORDS = ("a", "an", "and")

_SPLITS = {"train": 0, "val": 1, "test": 2}
# Mixed into every per-item seed so this stream never coincides with other users of
# SeedSequence([seed, ...]) in the project.
_STREAM_TAG = 0x5B05


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. ``box`` is the tight pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    color: str
    shape: str
    size: str
    box: Tuple[int, int, int, int]

    @property
    def center(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass(frozen=True)
class Scene:
    """Everything an item was generated from: all objects, which the caption mentions (indices
    into ``objects``, in caption order), the caption and the background colour."""

    objects: Tuple[ShapeObject, ...]
    mentioned: Tuple[int, ...]
    caption: str
    background: Tuple[int, int, int]
    noisy: bool = field(default=False)


def _phrase(obj: ShapeObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b`` in image coordinates (y grows downwards)."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    # A clear dominant axis gets a directional word; diagonal layouts would make "left of" vs
    # "above" a coin toss, so they get the symmetric "next to".
    if abs(dx) > 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "next to"


def _shape_mask(shape: str, side: int, thick: float) -> np.ndarray:
    """bool [side, side] footprint of a shape filling its square window."""
    c = (side - 1) / 2.0
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if shape == "circle":
        r = side / 2.0
        return (xx - c) ** 2 + (yy - c) ** 2 <= (r - 0.25) ** 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "triangle":
        # Apex at the top centre, base on the bottom row: half-width grows linearly with y.
        half = (yy + 1.0) / side * (side / 2.0)
        return np.abs(xx - c) <= half
    if shape == "cross":
        half = thick / 2.0
        return (np.abs(xx - c) <= half) | (np.abs(yy - c) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def synthetic_vocabulary() -> List[str]:
    """Every word a :class:`SyntheticShapes` caption can contain, sorted (deterministic)."""
    words = set(_CAPTION_WORDS) | set(COLORS) | set(SHAPES) | set(SIZES)
    for rel in RELATIONS:
        words.update(rel.split())
    return sorted(words)


class SyntheticShapes(Dataset):
    """Built-in captioned-shapes data set, generated on the fly and fully deterministic.

    Item ``i`` is a pure function of ``(seed, split, i)`` (its own ``numpy`` generator), so any
    worker, rank or epoch sees the same item, and the train/val/test streams never share items.

    Each image has a dark plain or lightly noised background and 1..``max_objects`` objects of
    distinct (colour, shape) pairs at non-overlapping positions. The caption names one object, or
    two with a spatial relation ("a red circle left of a small blue square"), sometimes plus a
    third ("... and a large white cross"); because colour+shape pairs are unique within an image,
    a caption always pins down which objects it means.

    Args:
        num_samples: length of the data set.
        image_size: square image side in pixels (a multiple of ``patch_size``).
        patch_size: ViT patch side; sets the length of ``patch_labels``.
        seed: stream seed.
        split: ``"train"``, ``"val"`` or ``"test"``.
        max_objects: most objects per image (>= 1).

    ``__getitem__(i)`` returns ``image`` float32 [3, H, W] (ImageNet-normalised), ``caption`` str,
    ``patch_labels`` float32 [P] (1 on patches overlapping a mentioned object's box, else 0),
    ``boxes`` float32 [m, 4] (the m mentioned objects, caption order, x0 y0 x1 y1 in pixels) and
    ``image_id`` int (= i).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 4,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        _check_geometry(image_size, patch_size)
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 to draw recognisable shapes, got {image_size}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 1 <= max_objects <= len(COLORS) * len(SHAPES):
            raise ValueError(f"max_objects must be in [1, {len(COLORS) * len(SHAPES)}], got {max_objects}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (SeedSequence entropy), got {seed}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.seed = int(seed)
        self.split = split
        self.max_objects = int(max_objects)

    @property
    def num_patches(self) -> int:
        """P = (image_size // patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([_STREAM_TAG, self.seed, _SPLITS[self.split], index])

    def _index(self, index: int) -> int:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return index

    def _layout(self, rng: np.random.Generator) -> List[Tuple[str, str, str, int, int, int]]:
        """Sample (color, shape, size, x0, y0, side) for non-overlapping objects."""
        s = self.image_size
        n = int(rng.integers(1, self.max_objects + 1))
        pairs = [(c, sh) for c in COLORS for sh in SHAPES]
        chosen = rng.choice(len(pairs), size=n, replace=False)
        gap = max(2, s // 56)  # keeps objects apart so their boxes (and patch labels) stay distinct
        placed: List[Tuple[str, str, str, int, int, int]] = []
        for k in chosen:
            color, shape = pairs[int(k)]
            size = "small" if rng.random() < 0.5 else "large"
            lo, hi = SIZES[size]
            side = max(5, 2 * int(round(rng.uniform(lo, hi) * s)))
            for _ in range(30):
                x0 = int(rng.integers(0, s - side + 1))
                y0 = int(rng.integers(0, s - side + 1))
                if all(
                    x0 >= px + ps + gap or px >= x0 + side + gap
                    or y0 >= py + ps + gap or py >= y0 + side + gap
                    for _, _, _, px, py, ps in placed
                ):
                    placed.append((color, shape, size, x0, y0, side))
                    break
            # An object that finds no free spot is dropped: the image just has fewer objects.
        return placed

    def _generate(self, index: int) -> Tuple[np.ndarray, Scene]:
        rng = self._rng(index)
        s = self.image_size
        bg = tuple(int(v) for v in rng.integers(10, 61, size=3))
        # Drawn channel-first so normalisation runs on contiguous memory (the per-item budget is
        # a few ms and the HWC -> CHW copy would be a third of it).
        img = np.empty((3, s, s), dtype=np.uint8)
        noisy = bool(rng.random() < 0.5)
        if noisy:
            # Luminance noise shared by the channels; bg in [10, 60] +- 8 never leaves uint8.
            noise = rng.integers(-8, 9, size=(s, s), dtype=np.int16)
            for c in range(3):
                np.add(noise, bg[c], out=img[c], casting="unsafe")
        else:
            img[...] = np.asarray(bg, dtype=np.uint8).reshape(3, 1, 1)

        objects: List[ShapeObject] = []
        for color, shape, size, x0, y0, side in self._layout(rng):
            mask = _shape_mask(shape, side, thick=side * float(rng.uniform(0.3, 0.4)))
            rgb = np.asarray(COLORS[color], dtype=np.int16) + rng.integers(-15, 16, size=3, dtype=np.int16)
            img[:, y0:y0 + side, x0:x0 + side][:, mask] = np.clip(rgb, 0, 255).astype(np.uint8)[:, None]
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
            objects.append(ShapeObject(color, shape, size, box))

        n = len(objects)
        if n == 1:
            m = 1
        else:
            # Two objects + a relation is the common case; a third mention happens sometimes so
            # the PTM labels are not always exactly two blobs.
            m = 3 if n >= 3 and rng.random() < 0.3 else 2
        mentioned = tuple(int(k) for k in rng.permutation(n)[:m])
        with_size = [bool(rng.random() < 0.5) for _ in mentioned]
        parts = [_phrase(objects[mentioned[0]], with_size[0])]
        if m >= 2:
            a, b = objects[mentioned[0]], objects[mentioned[1]]
            parts += [_relation(a, b), _phrase(b, with_size[1])]
        if m >= 3:
            parts += ["and", _phrase(objects[mentioned[2]], with_size[2])]
        caption = " ".join(parts)

        return img, Scene(tuple(objects), mentioned, caption, bg, noisy)  # type: ignore[arg-type]

    def scene(self, index: int) -> Scene:
        """The full description item ``index`` was drawn from (all objects, not just mentioned)."""
        return self._generate(self._index(index))[1]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = self._index(index)
        img, scene = self._generate(index)
        boxes = torch.tensor(
            [scene.objects[k].box for k in scene.mentioned], dtype=torch.float32
        ).reshape(-1, 4)
        return {
            "image": _normalise_chw_uint8(img),
            "caption": scene.caption,
            "patch_labels": boxes_to_patch_labels(boxes, self.image_size, self.patch_size),
            "boxes": boxes,
            "image_id": index,
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(num_samples={self.num_samples}, image_size={self.image_size}, "
            f"patch_size={self.patch_size}, seed={self.seed}, split={self.split!r}, "
            f"max_objects={self.max_objects})"
        )
