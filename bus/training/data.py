"""The training run's data: the train / val sets and tokenizer a :class:`TrainConfig` names, and
per-epoch loaders whose order is a pure function of ``(seed, epoch)`` (exact resume)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .config import ConfigError, TrainConfig
from .distributed import Dist, barrier

__all__ = ["RunData", "SkipSampler", "build_data", "patch_size_of", "TrainBatches"]


class SkipSampler(Sampler):
    """The indices of ``base`` (for the current epoch) minus the first ``skip``: resumes an epoch
    mid-way without loading the batches already consumed."""

    def __init__(self, base: Sampler, skip: int = 0):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def patch_size_of(mcfg) -> int:
    """The ViT patch side of a :class:`bus.model.BUSConfig`, without building the model (the
    data needs it for patch labels): ``vit_kwargs["patch_size"]``, else ``patchNN`` in the
    timm name, else 16."""
    if "patch_size" in mcfg.vit_kwargs:
        return int(mcfg.vit_kwargs["patch_size"])
    m = re.search(r"patch(\d+)", mcfg.vit)
    return int(m.group(1)) if m else 16


@dataclass
class RunData:
    """What :func:`build_data` returns: the two sets, the tokenizer (a ``transformers`` fast
    tokenizer) and the model config sized to its vocabulary."""

    train_set: Dataset
    val_set: Dataset
    tokenizer: Any
    model_config: Any


def build_data(cfg: TrainConfig, d: Dist) -> RunData:
    """The data sets and tokenizer of ``cfg``. For a folder, the tokenizer is trained on the
    training captions once and saved in OUT/tokenizer (reused on resume and by every rank)."""
    from .. import data as D

    if cfg.data == "synthetic":
        tok = D.synthetic_tokenizer()
        mcfg = cfg.model_config(len(tok))
        ps = patch_size_of(mcfg)
        try:
            train = D.SyntheticShapes(cfg.train_samples, image_size=mcfg.img_size, patch_size=ps,
                                      seed=cfg.data_seed, split="train", max_objects=cfg.max_objects)
            val = D.SyntheticShapes(cfg.val_samples, image_size=mcfg.img_size, patch_size=ps,
                                    seed=cfg.data_seed, split="val", max_objects=cfg.max_objects)
        except ValueError as e:  # image size below 32 px, bad --max-objects, ...
            raise ConfigError(f"--data synthetic: {e}") from e
        return RunData(train, val, tok, mcfg)

    # Folder: image size and patch size do not depend on the vocabulary, so a provisional
    # config fixes the geometry before the tokenizer exists.
    geo = cfg.model_config(1)
    train_set, val_set, train_caps = _folder_sets(cfg, geo.img_size, patch_size_of(geo))
    tok = _folder_tokenizer(cfg, d, train_caps)
    return RunData(train_set, val_set, tok, cfg.model_config(len(tok)))


def _folder_sets(cfg: TrainConfig, image_size: int, patch_size: int):
    """(train set, val set, training captions): ``--val-captions``, else whole images held out."""
    from ..data import CaptionFolder

    try:
        full = CaptionFolder(cfg.root, cfg.captions, image_size=image_size, patch_size=patch_size)
        val_full = (CaptionFolder(cfg.root, cfg.val_captions, image_size=image_size, patch_size=patch_size)
                    if cfg.val_captions else None)
    except (OSError, ValueError) as e:  # unreadable JSON, no valid record, bad geometry
        raise ConfigError(f"--data folder: {e}") from e
    if val_full is not None:
        return full, val_full, [r["caption"] for r in full.records]
    # Hold out whole images (all their captions) so no val image is seen in training.
    ids = sorted({r["image_id"] for r in full.records})
    perm = np.random.default_rng([cfg.data_seed, 0xF01D]).permutation(len(ids))
    n_val = max(1, int(round(cfg.val_fraction * len(ids))))
    if n_val >= len(ids):
        raise ConfigError(f"{cfg.captions}: {len(ids)} image(s), too few to hold out a validation split")
    val_ids = {ids[i] for i in perm[:n_val]}
    tr_idx = [i for i, r in enumerate(full.records) if r["image_id"] not in val_ids]
    va_idx = [i for i, r in enumerate(full.records) if r["image_id"] in val_ids]
    return Subset(full, tr_idx), Subset(full, va_idx), [full.records[i]["caption"] for i in tr_idx]


def _folder_tokenizer(cfg: TrainConfig, d: Dist, train_caps):
    """OUT/tokenizer if it exists (a resumed run), else built by rank 0 and loaded by the rest:
    one vocabulary for every rank."""
    from transformers import PreTrainedTokenizerFast

    from ..data import build_tokenizer

    tok_dir = os.path.join(cfg.out, "tokenizer")
    if os.path.isdir(tok_dir):
        return PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok = None
    if d.main:
        tok = build_tokenizer(train_caps, vocab_size=cfg.tokenizer_vocab)
        os.makedirs(cfg.out, exist_ok=True)
        tok.save_pretrained(tok_dir)
    barrier(d)
    return tok if d.main else PreTrainedTokenizerFast.from_pretrained(tok_dir)


class TrainBatches:
    """Per-epoch training loaders for this rank: one ``DistributedSampler`` for 1..N ranks, so
    the order is the same pure function of ``(seed, epoch)``; only full batches (fixed in-batch
    negatives), captions cut at ``max_length`` tokens. ``steps_per_epoch`` optimizer steps make
    an epoch."""

    def __init__(self, cfg: TrainConfig, data: RunData, d: Dist, local_batch: int, max_length: int):
        self.cfg, self.data, self.local_batch, self.max_length = cfg, data, local_batch, max_length
        self.sampler = DistributedSampler(data.train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // local_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"training set of {len(data.train_set)} is smaller than one global batch "
                              f"({cfg.batch_size})")

    def epoch(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The loader of ``epoch`` without its first ``skip_batches`` batches (not loaded)."""
        from ..data import make_loader

        self.sampler.set_epoch(epoch)
        # Worker seeds come from the loader's own generator, seeded per epoch: no global RNG use.
        return make_loader(self.data.train_set, self.data.tokenizer, batch_size=self.local_batch, shuffle=False,
                           num_workers=self.cfg.num_workers, seed=self.cfg.seed * 100_003 + epoch,
                           sampler=SkipSampler(self.sampler, skip_batches * self.local_batch), drop_last=True,
                           max_length=self.max_length)
