"""Image-caption pairs from a local folder and a COCO-style captions JSON (optional boxes)."""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import _check_geometry, _normalise_chw_uint8, boxes_to_patch_labels

__all__ = ["CaptionFolder", "DataWarning"]

logger = logging.getLogger(__name__)


class DataWarning(UserWarning):
    """Bad or unreadable records were skipped (see the message for the count and reasons)."""


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


def _read_meta(captions_json: str) -> Dict[str, Any]:
    with open(captions_json, "r", encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("annotations"), list) \
            or not isinstance(meta.get("images"), list):
        raise ValueError(f"{captions_json}: expected an object with 'images' and 'annotations' lists")
    return meta


def _index_images(entries: List[Any]) -> Tuple[Dict[int, Any], List[str]]:
    """``({id: entry}, reasons for the entries left out)``: each needs an int ``id`` and a
    non-empty ``file_name``; the first entry of a duplicated id wins."""
    images: Dict[int, Any] = {}
    bad: List[str] = []
    for k, im in enumerate(entries):
        if not isinstance(im, dict) or not _is_int(im.get("id")) \
                or not isinstance(im.get("file_name"), str) or not im["file_name"]:
            bad.append(f"images[{k}]: needs an int 'id' and a non-empty 'file_name'")
        elif im["id"] in images:
            bad.append(f"images[{k}]: duplicate id {im['id']} (first entry kept)")
        else:
            images[im["id"]] = im
    return images, bad


def _image_header(image_id: int, path: str) -> Tuple[Optional[Tuple[str, int, int]], Optional[str]]:
    """``((path, width, height), None)`` if the file exists and its header parses, else
    ``(None, reason)``."""
    from PIL import Image

    if not os.path.isfile(path):
        return None, f"image {image_id}: file not found: {path}"
    try:
        with Image.open(path) as pil:  # reads the header only
            w, h = pil.size
        return (path, w, h), None
    except Exception as e:  # PIL raises several types for bad files
        return None, f"image {image_id}: unreadable ({type(e).__name__}: {e})"


def _check_annotation(ann: Any, images: Dict[int, Any], check_image) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``(record, None)`` for a usable annotation, else ``(None, reason)``."""
    if not isinstance(ann, dict):
        return None, "not an object"
    if not _is_int(ann.get("image_id")):
        return None, f"missing or non-int image_id {ann.get('image_id')!r:.40}"
    if ann["image_id"] not in images:
        return None, f"unknown image_id {ann['image_id']}"
    if not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
        return None, f"missing or empty caption for image {ann['image_id']}"
    info, reason = check_image(ann["image_id"])
    if reason is not None:
        return None, reason
    path, w, h = info
    boxes = None
    if ann.get("boxes"):
        boxes, reason = _parse_boxes(ann["boxes"], w, h)
        if reason is not None:
            return None, reason
    return {"path": path, "image_id": ann["image_id"], "caption": ann["caption"].strip(), "boxes": boxes,
            "size": (w, h)}, None


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
        _check_geometry(image_size, patch_size)
        self.root = os.fspath(root)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        meta = _read_meta(captions_json)
        images, bad_image_entries = _index_images(meta["images"])
        # Image headers are read lazily, once per id, and only for ids an annotation uses:
        # opening headers of unreferenced files would be wasted I/O on large folders.
        checked: Dict[int, Tuple[Optional[Tuple[str, int, int]], Optional[str]]] = {}

        def check_image(image_id: int):
            if image_id not in checked:
                checked[image_id] = _image_header(image_id, os.path.join(self.root, images[image_id]["file_name"]))
            return checked[image_id]

        self.records: List[Dict[str, Any]] = []
        self.skipped: List[Tuple[int, str]] = []
        for k, ann in enumerate(meta["annotations"]):
            record, reason = _check_annotation(ann, images, check_image)
            if reason is not None:
                self.skipped.append((k, f"annotations[{k}]: {reason}"))
            else:
                self.records.append(record)

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
