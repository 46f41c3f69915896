"""Batching: :func:`collate` (tokenise captions, stack images and labels) and :func:`make_loader`."""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["collate", "make_loader"]

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
