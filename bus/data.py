"""Data for the BUS model layer: a synthetic captioned-shapes set, an image-caption folder, a
download-free tokenizer, and the collate / loader glue.

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
from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# BERT order, so [PAD] gets id 0 and matches BertConfig's default pad_token_id.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

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


class DataWarning(UserWarning):
    """Bad or unreadable records were skipped (see the message for the count and reasons)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# synthetic captioned shapes
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def _wrap_tokenizer(tok: Any, model_max_length: int = 512):
    """Give a ``tokenizers.Tokenizer`` BERT-style normalisation, [CLS] x [SEP] framing and a
    ``transformers`` front end with the special tokens registered."""
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        # The WordPiece decoder already re-attaches punctuation; a second cleanup pass would
        # also rewrite things like " n't", breaking decode(encode(x)) == x.lower().
        clean_up_tokenization_spaces=False,
    )


_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def _wordpiece_from_vocab(tokens: Iterable[str]):
    """A WordPiece tokenizer whose ids follow the order of ``tokens`` (specials first)."""
    from tokenizers import Tokenizer, models

    vocab: Dict[str, int] = {}
    for t in list(SPECIAL_TOKENS) + list(tokens):
        vocab.setdefault(t, len(vocab))
    model = models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    return _wrap_tokenizer(Tokenizer(model))


def build_tokenizer(captions: Iterable[str], *, vocab_size: int = 1000):
    """Build a small lowercase WordPiece tokenizer from ``captions`` (no download, deterministic).

    The vocabulary is: the special tokens, then single characters and their ``##`` continuations
    (a-z, 0-9 always, then other characters seen, most frequent first), then whole words by
    decreasing count (ties alphabetical) until ``vocab_size``. Frequent words are one token; rarer
    or unseen words fall back to characters, never to [UNK] for a-z/0-9 text.

    Not ``tokenizers.trainers.WordPieceTrainer``: its token ids (and, when ``vocab_size`` cuts
    through equal counts, its token set) change from process to process, so DDP ranks or a
    resumed run would disagree about ids. This selection is a pure function of the captions.

    BERT conventions: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``; BERT normalisation
    (lowercase, accents stripped) and pre-tokenisation (whitespace and punctuation); a single
    sequence encodes as ``[CLS] tokens [SEP]``, so a ``transformers.BertConfig(vocab_size=len(tok),
    pad_token_id=tok.pad_token_id)`` text model can use it.

    Args:
        captions: the text, any iterable of str (consumed once).
        vocab_size: upper bound on the vocabulary (a small corpus yields fewer tokens).
    Returns:
        ``transformers.PreTrainedTokenizerFast``; ``len(tok)`` is the vocabulary size.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    base = len(SPECIAL_TOKENS) + 2 * len(_ALPHABET)
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is too small: the specials and a-z/0-9 pieces need {base}")
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for caption in captions:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(str(caption))))
    chars: Counter = Counter()
    for w, n in words.items():
        for ch in w:
            chars[ch] += n

    tokens: List[str] = [c for c in _ALPHABET] + ["##" + c for c in _ALPHABET]
    budget = vocab_size - base
    for ch in sorted((c for c in chars if c not in _ALPHABET), key=lambda c: (-chars[c], c)):
        if budget < 2:
            break
        tokens += [ch, "##" + ch]
        budget -= 2
    for w in sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w)):
        if budget < 1:
            break
        tokens.append(w)
        budget -= 1
    return _wordpiece_from_vocab(tokens)


def synthetic_tokenizer():
    """The tokenizer for :class:`SyntheticShapes`: every caption word is a single token.

    Built from :func:`synthetic_vocabulary` (the generator's word lists, not sampled captions):
    specials, then the sorted words, then a-z/0-9 and their ``##`` continuations, so ids are the
    same on every machine and run. Same conventions as :func:`build_tokenizer`.

    Returns:
        ``transformers.PreTrainedTokenizerFast``.
    """
    return _wordpiece_from_vocab(synthetic_vocabulary() + list(_ALPHABET) + ["##" + c for c in _ALPHABET])


# --------------------------------------------------------------------------------------------
# image-caption folder
# --------------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true would pass isinstance(int)


def _parse_boxes(raw: Any, width: int, height: int) -> Tuple[Optional[List[List[float]]], Optional[str]]:
    """Validate COCO-ish ``[[x0, y0, x1, y1], ...]`` against the image size.

    Returns ``(boxes, None)`` or ``(None, reason)``. Overshoots up to one pixel are clipped
    (rounding in annotation tools), anything beyond is an error.
    """
    if not isinstance(raw, (list, tuple)):
        return None, f"boxes is not a list: {raw!r:.60}"
    out = []
    for b in raw:
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            return None, f"bad box {b!r:.60} (want [x0, y0, x1, y1])"
        try:
            x0, y0, x1, y1 = (float(v) for v in b)
        except (TypeError, ValueError):
            return None, f"bad box {b!r:.60} (non-numeric)"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            return None, f"bad box {b!r:.60} (non-finite)"
        if x1 <= x0 or y1 <= y0:
            return None, f"bad box {b!r:.60} (empty or inverted)"
        if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
            return None, f"bad box {b!r:.60} (outside the {width}x{height} image)"
        out.append([max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)])
    return out, None


class CaptionFolder(Dataset):
    """Image-caption pairs from a local folder and a COCO-style captions JSON.

    JSON layout::

        {"images": [{"id": int, "file_name": str, "width"?: int, "height"?: int}, ...],
         "annotations": [{"image_id": int, "caption": str,
                          "boxes"?: [[x0, y0, x1, y1], ...]}, ...]}

    One item per annotation. ``file_name`` is relative to ``root`` (absolute paths are kept).
    Boxes are in original-image pixels and are rescaled with the image (resized to a square
    ``image_size``, aspect ratio not kept, as ViT pre-training does). An annotation without
    boxes (key absent, null or empty) has ``patch_labels`` all -1 (= unknown) and ``boxes``
    [0, 4].

    Bad records (unknown image id, missing file, image whose header does not parse, missing or
    empty caption, malformed or out-of-image box) are skipped at construction and reported in
    one :class:`DataWarning` (count and first reasons); ``self.skipped`` keeps every
    ``(annotation_index, reason)``. An image that passes the header check but fails to decode
    later is replaced, with a warning, by the next item that loads, so a run never crashes on one
    file. The JSON itself being unreadable, or no valid record at all, raises.

    Args:
        root: folder the ``file_name``s are relative to.
        captions_json: path to the JSON.
        image_size: square output side (a multiple of ``patch_size``).
        patch_size: ViT patch side; sets the length of ``patch_labels``.
    """

    MAX_REASONS = 5

    def __init__(self, root: str, captions_json: str, *, image_size: int = 224, patch_size: int = 16) -> None:
        from PIL import Image

        _check_geometry(image_size, patch_size)
        self.root = os.fspath(root)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        with open(captions_json, "r", encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.get("annotations"), list) \
                or not isinstance(meta.get("images"), list):
            raise ValueError(f"{captions_json}: expected an object with 'images' and 'annotations' lists")

        # Image entries are checked lazily, once per id, and only for ids an annotation uses:
        # opening headers of unreferenced files would be wasted I/O on large folders.
        images: Dict[int, Any] = {}
        bad_image_entries: List[str] = []
        for k, im in enumerate(meta["images"]):
            if not isinstance(im, dict) or not _is_int(im.get("id")) \
                    or not isinstance(im.get("file_name"), str) or not im["file_name"]:
                bad_image_entries.append(f"images[{k}]: needs an int 'id' and a non-empty 'file_name'")
                continue
            if im["id"] in images:
                bad_image_entries.append(f"images[{k}]: duplicate id {im['id']} (first entry kept)")
                continue
            images[im["id"]] = im
        checked: Dict[int, Tuple[Optional[Tuple[str, int, int]], Optional[str]]] = {}

        def check_image(image_id: int):
            if image_id not in checked:
                im = images[image_id]
                path = os.path.join(self.root, im["file_name"])
                if not os.path.isfile(path):
                    checked[image_id] = (None, f"image {image_id}: file not found: {path}")
                else:
                    try:
                        with Image.open(path) as pil:  # reads the header only
                            w, h = pil.size
                        checked[image_id] = ((path, w, h), None)
                    except Exception as e:  # PIL raises several types for bad files
                        checked[image_id] = (None, f"image {image_id}: unreadable ({type(e).__name__}: {e})")
            return checked[image_id]

        self.records: List[Dict[str, Any]] = []
        self.skipped: List[Tuple[int, str]] = []
        for k, ann in enumerate(meta["annotations"]):
            reason = None
            if not isinstance(ann, dict):
                reason = "not an object"
            elif not _is_int(ann.get("image_id")):
                reason = f"missing or non-int image_id {ann.get('image_id')!r:.40}"
            elif ann["image_id"] not in images:
                reason = f"unknown image_id {ann['image_id']}"
            elif not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
                reason = f"missing or empty caption for image {ann['image_id']}"
            if reason is None:
                info, reason = check_image(ann["image_id"])
            boxes = None
            if reason is None and ann.get("boxes"):
                path, w, h = info
                boxes, reason = _parse_boxes(ann["boxes"], w, h)
            if reason is not None:
                self.skipped.append((k, f"annotations[{k}]: {reason}"))
                continue
            path, w, h = info
            self.records.append(
                {"path": path, "image_id": ann["image_id"], "caption": ann["caption"].strip(),
                 "boxes": boxes, "size": (w, h)}
            )

        if self.skipped or bad_image_entries:
            reasons = bad_image_entries + [r for _, r in self.skipped]
            msg = (
                f"CaptionFolder({captions_json}): skipped {len(self.skipped)} of "
                f"{len(meta['annotations'])} annotations"
                + (f" and {len(bad_image_entries)} image entries" if bad_image_entries else "")
                + "; first reasons: " + " | ".join(reasons[: self.MAX_REASONS])
            )
            warnings.warn(msg, DataWarning, stacklevel=2)
            logger.warning(msg)
        if not self.records:
            raise ValueError(f"{captions_json}: no valid annotation (see the DataWarning for reasons)")
        self._failed: set = set()

    @property
    def num_patches(self) -> int:
        """P = (image_size // patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        from PIL import Image

        s = self.image_size
        with Image.open(rec["path"]) as pil:
            w, h = pil.size
            img = np.asarray(pil.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.uint8)
        img = img.transpose(2, 0, 1)
        if rec["boxes"]:
            # Rescale by the decoded size, which is the truth even if the JSON's width/height lie.
            scale = torch.tensor([s / w, s / h, s / w, s / h], dtype=torch.float32)
            boxes = torch.tensor(rec["boxes"], dtype=torch.float32) * scale
            labels = boxes_to_patch_labels(boxes, s, self.patch_size)
        else:
            boxes = torch.zeros(0, 4, dtype=torch.float32)
            labels = torch.full((self.num_patches,), -1.0, dtype=torch.float32)
        return {
            "image": _normalise_chw_uint8(img),
            "caption": rec["caption"],
            "patch_labels": labels,
            "boxes": boxes,
            "image_id": int(rec["image_id"]),
        }

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self.records)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        for step in range(n):
            j = (index + step) % n
            if j in self._failed:
                continue
            try:
                return self._load(self.records[j])
            except Exception as e:  # any decode error: skip the file, keep the run alive
                self._failed.add(j)
                warnings.warn(
                    f"CaptionFolder: could not decode {self.records[j]['path']} "
                    f"({type(e).__name__}: {e}); using the next item instead",
                    DataWarning,
                    stacklevel=2,
                )
        raise RuntimeError("CaptionFolder: no image in the data set could be decoded")


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------

def collate(batch: Sequence[Dict[str, Any]], tokenizer, *, max_length: int = 32) -> Dict[str, Any]:
    """Batch items from :class:`SyntheticShapes` or :class:`CaptionFolder`.

    Args:
        batch: B item dicts.
        tokenizer: a ``transformers`` fast tokenizer with [CLS]/[SEP] framing
            (:func:`build_tokenizer`, :func:`synthetic_tokenizer`).
        max_length: captions longer than this (in tokens, [CLS] and [SEP] included) are truncated.
    Returns:
        dict with ``images`` float32 [B, 3, H, W]; ``input_ids`` int64 [B, L] ([CLS] first,
        [SEP] last real token, [PAD] after, L = longest in the batch <= max_length);
        ``attention_mask`` int64 [B, L] (1 = real token); ``patch_labels`` float32 [B, P];
        ``image_id`` int64 [B]; ``captions`` list[str] (B); ``boxes`` list of B float32 [m_i, 4].
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    captions = [item["caption"] for item in batch]
    enc = tokenizer(
        captions,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "input_ids": enc["input_ids"].to(torch.int64),
        "attention_mask": enc["attention_mask"].to(torch.int64),
        "patch_labels": torch.stack([item["patch_labels"] for item in batch]).to(torch.float32),
        "image_id": torch.tensor([int(item["image_id"]) for item in batch], dtype=torch.int64),
        "captions": captions,
        "boxes": [item["boxes"] for item in batch],
    }


def _seed_worker(worker_id: int) -> None:
    # Items are pure functions of their index, but user augmentations may draw from the global
    # numpy/random state: derive it from torch's per-worker seed so runs are reproducible.
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(
    dataset: Dataset,
    tokenizer,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    sampler: Optional[Sampler] = None,
    drop_last: bool = False,
    max_length: int = 32,
) -> DataLoader:
    """A ``DataLoader`` yielding :func:`collate` batches in a reproducible order.

    Args:
        dataset: any map-style data set of item dicts.
        tokenizer: passed to :func:`collate`.
        batch_size: B.
        shuffle: shuffle each epoch (seeded). Must be False with a ``sampler``: a
            ``DistributedSampler`` owns the order (its own ``shuffle``/``seed``; call
            ``sampler.set_epoch(epoch)`` each epoch).
        num_workers: worker processes (0 = load in the main process).
        seed: seeds the loader's generator (shuffle order and worker seeds).
        sampler: optional sampler, e.g. ``torch.utils.data.DistributedSampler``.
        drop_last: drop the last incomplete batch.
        max_length: token limit passed to :func:`collate`.
    Returns:
        ``torch.utils.data.DataLoader`` whose batches are :func:`collate` dicts.
    """
    if sampler is not None and shuffle:
        raise ValueError(
            "shuffle=True with a sampler: let the sampler shuffle (DistributedSampler(shuffle=True, "
            "seed=...)) and call sampler.set_epoch(epoch) each epoch"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, tokenizer=tokenizer, max_length=max_length),
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        # Not persistent: callers build a loader per epoch (sampler.set_epoch, resume skips), and
        # idle workers of an evaluation loader would sit on memory for the whole run.
        persistent_workers=False,
    )
