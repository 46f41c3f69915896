"""Training CLI for :class:`bus.model.BUSModel` and its baseline: ``python -m bus.train``.

Examples::

    python -m bus.train --size tiny --steps 200 --out runs/tiny            # synthetic shapes
    python -m bus.train --config configs/tiny_synthetic.yaml --lr 5e-4      # flags override YAML
    python -m bus.train --data folder --root imgs/ --captions caps.json --size base
    python -m bus.train --out runs/tiny --resume auto                       # continue a run
    torchrun --nproc_per_node 2 -m bus.train --size tiny --steps 100        # DDP

Configuration: built-in defaults < ``--config`` YAML (keys are the flag names, ``-`` or ``_``)
< command-line flags. ``--model-arg KEY=VALUE`` (repeatable; YAML: ``model_args: {...}``)
overrides any :class:`bus.model.BUSConfig` field, e.g. ``--model-arg fusion_layers=1``.

Outputs in ``--out``: ``metrics.jsonl`` (one JSON object per line: ``kind`` = ``train`` for
per-step losses, ``eval`` for retrieval results), ``ckpt_step{N}.pt`` and ``last.pt``,
``relevance_step{N}.png`` (BUS only: the patches TSPS keeps for each caption), ``config.yaml``
(the resolved configuration) and, for folder data, ``tokenizer/``.

Exact resume: the data order is a pure function of ``(seed, epoch)`` (a seeded
``DistributedSampler`` with ``set_epoch``, also for one process) and a resumed epoch skips its
consumed batches by index without loading them; checkpoints hold the model, optimizer,
scheduler, grad scaler, step and every process's torch / CUDA / numpy / python RNG states;
evaluation runs inside ``torch.random.fork_rng`` so it never shifts the training RNG stream. A
run stopped after step k and resumed therefore logs bit-identical losses for steps k+1.. on the
same hardware, thread count and world size.

Distributed (``torchrun``, ``WORLD_SIZE > 1``): gloo on CPU, nccl on CUDA; each rank draws its
own shard per epoch. Rank 0 writes logs, checkpoints and pictures and runs the evaluation while
the others wait at a barrier. Note that ITC and ITM use **in-batch negatives per rank** (the
model does not all-gather embeddings): a global batch of B on N ranks trains with the negatives
of a batch of B / N, like N independent small-batch contrastive runs with averaged gradients.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, Sampler, Subset

__all__ = ["ConfigError", "TrainConfig", "build_parser", "parse_config", "evaluate_retrieval", "main", "train"]


# ---------------------------------------------------------------------------------- config
class ConfigError(ValueError):
    """A setting that cannot work (found while parsing or while setting the run up)."""


@dataclass
class TrainConfig:
    """Everything one training run is a function of (the resolved CLI / YAML configuration)."""

    # model
    model: str = "bus"  # bus | baseline
    size: str = "tiny"  # tiny -> BUSConfig.tiny(), base -> BUSConfig()
    img_size: Optional[int] = None
    keep: Optional[float] = None
    mass: Optional[float] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "synthetic"  # synthetic | folder
    train_samples: int = 2048
    val_samples: int = 256
    data_seed: int = 0
    max_objects: int = 4
    root: Optional[str] = None
    captions: Optional[str] = None
    val_captions: Optional[str] = None
    val_fraction: float = 0.05
    tokenizer_vocab: int = 1000
    num_workers: int = 0
    # optimisation
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: Optional[int] = None  # None: 5% of steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    guidance: Optional[str] = None
    itc_text_free: Optional[float] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    # evaluation / logging / checkpoints
    eval_every: int = 500
    eval_batch_size: int = 128
    itm_rerank: int = 0
    viz_samples: int = 4
    ckpt_every: int = 500
    log_every: int = 1
    out: str = "runs/bus"
    resume: Optional[str] = None  # PATH | auto
    stop_after: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` with a readable message for any inconsistent setting."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {list(options)}, got {getattr(self, name)!r}")

        choice("model", ("bus", "baseline"))
        choice("size", ("tiny", "base"))
        choice("data", ("synthetic", "folder"))
        choice("precision", ("fp32", "bf16", "fp16"))
        choice("device", ("auto", "cpu", "cuda"))
        positive = ("batch_size", "steps", "train_samples", "val_samples", "eval_batch_size", "log_every",
                    "tokenizer_vocab")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "ckpt_every", "itm_rerank", "viz_samples", "num_workers", "seed", "data_seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be >= 2 (ITC/ITM need in-batch negatives)")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.itc_text_free is not None and self.itc_text_free < 0:
            raise ConfigError(f"--itc-text-free must be >= 0, got {self.itc_text_free}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("--weight-decay and --grad-clip must be >= 0 and --min-lr-ratio in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ConfigError(f"--keep must be in (0, 1], got {self.keep}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ConfigError(f"--mass must be in (0, 1], got {self.mass}")
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f"--img-size must be positive, got {self.img_size}")
        if self.data == "folder" and (not self.root or not self.captions):
            raise ConfigError("--data folder needs --root DIR and --captions FILE")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ConfigError(f"--stop-after must be positive, got {self.stop_after}")
        if not isinstance(self.model_args, dict):
            raise ConfigError("model_args must be a mapping of BUSConfig fields")
        self.model_config(1)  # unknown --model-arg keys fail here, before any work

    def model_config(self, vocab_size: int):
        """The :class:`bus.model.BUSConfig` this run trains (size preset, then overrides)."""
        from .model import BUSConfig

        base = BUSConfig.tiny() if self.size == "tiny" else BUSConfig()
        fields = {f.name for f in dataclasses.fields(BUSConfig)}
        over: Dict[str, Any] = {}
        for k, v in self.model_args.items():
            if k not in fields:
                raise ConfigError(f"--model-arg {k}: not a BUSConfig field (one of {sorted(fields)})")
            # Dict fields (vit_kwargs) merge into the preset so one key can be changed alone.
            over[k] = {**getattr(base, k), **v} if isinstance(getattr(base, k), dict) and isinstance(v, dict) else v
        if self.img_size is not None:
            over["img_size"] = self.img_size
        if self.keep is not None:
            over["keep"] = self.keep
        if self.mass is not None:
            over["mass"] = self.mass
        if self.guidance is not None:
            over["guidance"] = self.guidance
        if self.itc_text_free is not None:
            over["itc_text_free"] = self.itc_text_free
        over["vocab_size"] = vocab_size
        return dataclasses.replace(base, **over)


# Keys whose change between a checkpoint and its resume would make the continued run differ
# from the uninterrupted one; a mismatch is reported (not refused: it may be intended).
_TRAJECTORY_KEYS = ("model", "size", "img_size", "keep", "mass", "model_args", "data", "train_samples",
                    "data_seed", "root", "captions", "batch_size", "steps", "lr", "weight_decay",
                    "warmup_steps", "min_lr_ratio", "grad_clip", "precision", "seed")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m bus.train`` argument parser. Every default is ``SUPPRESS`` so that only
    flags actually given override the YAML config and the :class:`TrainConfig` defaults."""
    p = argparse.ArgumentParser(prog="python -m bus.train", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["bus", "baseline"], help="BUS (TSPS + PAD) or the unpruned baseline")
    g.add_argument("--size", choices=["tiny", "base"], help="BUSConfig.tiny() or BUSConfig() (default tiny)")
    g.add_argument("--img-size", type=int, help="image side in pixels (model and data)")
    g.add_argument("--keep", type=float, help="TSPS keep ratio per pruning layer")
    g.add_argument("--mass", type=float, help="TSPS relevance mass (per-sample counts, varlen)")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", dest="model_arg",
                   help="override a BUSConfig field (VALUE parsed as YAML), repeatable")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["synthetic", "folder"], help="built-in captioned shapes or an image folder")
    g.add_argument("--train-samples", type=int, help="synthetic training set size")
    g.add_argument("--val-samples", type=int, help="synthetic held-out set size")
    g.add_argument("--data-seed", type=int, help="seed of the synthetic data set's content")
    g.add_argument("--max-objects", type=int, help="most objects per synthetic image (default 4)")
    g.add_argument("--root", help="image folder (--data folder)")
    g.add_argument("--captions", help="COCO-style captions JSON (--data folder)")
    g.add_argument("--val-captions", help="held-out captions JSON; default: --val-fraction of the images")
    g.add_argument("--val-fraction", type=float, help="share of folder images held out (default 0.05)")
    g.add_argument("--tokenizer-vocab", type=int, help="WordPiece vocabulary bound for folder data")
    g.add_argument("--num-workers", type=int, help="data loader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch size (split over DDP ranks)")
    g.add_argument("--steps", type=int, help="total optimizer steps")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine decay (default 5%%)")
    g.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, help="gradient norm clip (0 = off)")
    g.add_argument("--guidance", choices=["image", "text"],
                   help="what guides TSPS in training (BUSConfig.guidance, default image: one ViT "
                        "pass, the image [CLS]; text: each caption guides its own image)")
    g.add_argument("--itc-text-free", type=float, metavar="W",
                   help="guidance=text: weight of the ITC loss on the text-free (CLS-guided) image "
                        "embedding that retrieval evaluation uses (BUSConfig.itc_text_free, default 1)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="torch.autocast dtype")
    g.add_argument("--seed", type=int, help="seed of init, data order, dropout and ITM negatives")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--itm-rerank", type=int, metavar="K", help="re-rank the top-K images per caption with ITM")
    g.add_argument("--viz-samples", type=int, help="images in the relevance picture (0 = none)")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0 = only last.pt at the end)")
    g.add_argument("--log-every", type=int, help="write train metrics every N steps")
    g.add_argument("--out", help="output directory")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' (or no value) = OUT/last.pt if present")
    g.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop (with a checkpoint) after this global step; the schedule still targets --steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no-progress", action="store_false", dest="progress", help="no tqdm bar")
    return p


def _parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Resolve defaults < YAML (``--config``) < flags into a validated :class:`TrainConfig`.
    Invalid input exits with status 2 and a ``python -m bus.train: error: ...`` message."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    values: Dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        if "config" in ns:
            import yaml

            with open(ns.pop("config"), "r", encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ConfigError("the config file must hold a mapping of option: value")
            for k, v in loaded.items():
                key = str(k).replace("-", "_")
                if key not in known:
                    raise ConfigError(f"config file: unknown option {k!r}")
                values[key] = v
        model_arg = ns.pop("model_arg", None)
        values.update(ns)
        if model_arg:
            values["model_args"] = {**values.get("model_args", {}), **_parse_model_args(model_arg)}
        cfg = TrainConfig(**values)
        cfg.validate()
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    return cfg


# ---------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _init_distributed(device_kind: str) -> _Dist:
    """Join the process group set up by torchrun (env vars), if there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _barrier(d: _Dist) -> None:
    if d.on:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------- data
class SkipSampler(Sampler):
    """The indices of ``base`` (for the current epoch) minus the first ``skip``: resumes an epoch
    mid-way without loading the batches already consumed."""

    def __init__(self, base: Sampler, skip: int = 0):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def _patch_size(mcfg) -> int:
    """The ViT patch side, without building the model (the data needs it for patch labels)."""
    if "patch_size" in mcfg.vit_kwargs:
        return int(mcfg.vit_kwargs["patch_size"])
    m = re.search(r"patch(\d+)", mcfg.vit)
    return int(m.group(1)) if m else 16


def _build_data(cfg: TrainConfig, d: _Dist, patch_size_fn):
    """(train set, val set, tokenizer). For a folder, the tokenizer is trained on the training
    captions once and saved in OUT/tokenizer (reused on resume and by every rank)."""
    from . import data as D

    if cfg.data == "synthetic":
        tok = D.synthetic_tokenizer()
        mcfg = cfg.model_config(len(tok))
        ps = patch_size_fn(mcfg)
        try:
            train = D.SyntheticShapes(cfg.train_samples, image_size=mcfg.img_size, patch_size=ps,
                                      seed=cfg.data_seed, split="train", max_objects=cfg.max_objects)
            val = D.SyntheticShapes(cfg.val_samples, image_size=mcfg.img_size, patch_size=ps,
                                    seed=cfg.data_seed, split="val", max_objects=cfg.max_objects)
        except ValueError as e:  # image size below 32 px, bad --max-objects, ...
            raise ConfigError(f"--data synthetic: {e}") from e
        return train, val, tok, mcfg

    # Folder: image size and patch size do not depend on the vocabulary, so a provisional
    # config fixes the geometry before the tokenizer exists.
    geo = cfg.model_config(1)
    ps = patch_size_fn(geo)
    try:
        full = D.CaptionFolder(cfg.root, cfg.captions, image_size=geo.img_size, patch_size=ps)
        val_full = (D.CaptionFolder(cfg.root, cfg.val_captions, image_size=geo.img_size, patch_size=ps)
                    if cfg.val_captions else None)
    except (OSError, ValueError) as e:  # unreadable JSON, no valid record, bad geometry
        raise ConfigError(f"--data folder: {e}") from e
    if val_full is not None:
        train_set, val_set = full, val_full
        train_caps = [r["caption"] for r in full.records]
    else:
        # Hold out whole images (all their captions) so no val image is seen in training.
        ids = sorted({r["image_id"] for r in full.records})
        perm = np.random.default_rng([cfg.data_seed, 0xF01D]).permutation(len(ids))
        n_val = max(1, int(round(cfg.val_fraction * len(ids))))
        if n_val >= len(ids):
            raise ConfigError(f"{cfg.captions}: {len(ids)} image(s), too few to hold out a validation split")
        val_ids = {ids[i] for i in perm[:n_val]}
        tr_idx = [i for i, r in enumerate(full.records) if r["image_id"] not in val_ids]
        va_idx = [i for i, r in enumerate(full.records) if r["image_id"] in val_ids]
        train_set, val_set = Subset(full, tr_idx), Subset(full, va_idx)
        train_caps = [full.records[i]["caption"] for i in tr_idx]
    tok_dir = os.path.join(cfg.out, "tokenizer")
    if os.path.isdir(tok_dir):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        if d.main:
            tok = D.build_tokenizer(train_caps, vocab_size=cfg.tokenizer_vocab)
            os.makedirs(cfg.out, exist_ok=True)
            tok.save_pretrained(tok_dir)
        _barrier(d)  # the other ranks load rank 0's tokenizer: one vocabulary for everyone
        if not d.main:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    return train_set, val_set, tok, cfg.model_config(len(tok))


# --------------------------------------------------------------------------- optimisation
def _param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices only: biases, norms, embeddings' scale-like vectors and the logit scale
    are not regularised towards zero."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------ RNG state
def _rng_state() -> Dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ evaluation
def _recall(ranks: Tensor, ks=(1, 5)) -> Dict[int, float]:
    return {k: float((ranks < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, loader, device: torch.device, *, precision: str = "fp32",
                       itm_rerank: int = 0) -> Dict[str, float]:
    """Image<->text retrieval on a held-out loader: recall@1/5 both ways from ITC embeddings.

    Image embeddings come from :meth:`BUSModel.image_embedding`, the text-free (CLS-guided)
    forward, so no caption ever guides the pruning of an image it is scored against. Each item's
    own caption is its only positive (the synthetic set can have look-alike captions, which only
    makes the numbers conservative). With ``itm_rerank = K > 0`` the top-K images of each caption
    are re-ranked by :meth:`BUSModel.itm_scores` (text-guided pruning is fine there: every
    candidate is pruned for the query caption alike) and ``t2i_itm_r@k`` are added.
    """
    model.eval()
    img_emb, txt_emb, images, ids, masks = [], [], [], [], []
    with _autocast(device, precision):
        for batch in loader:
            x = batch["images"].to(device)
            i, m = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            img_emb.append(model.image_embedding(x).float())
            txt_emb.append(model.text_embedding(i, m).float())
            if itm_rerank > 0:
                images.append(x)
                # Captions of different batches have different padded lengths: keep per item.
                ids.extend(i.unbind(0))
                masks.extend(m.unbind(0))
    I, T = torch.cat(img_emb), torch.cat(txt_emb)
    n = I.shape[0]
    sim = I @ T.t()  # [images, captions]
    gt = torch.arange(n, device=sim.device)
    # rank of the true item = number of candidates scored strictly higher
    i2t_rank = (sim > sim[gt, gt][:, None]).sum(1)
    t2i_rank = (sim.t() > sim[gt, gt][:, None]).sum(1)
    out = {"n": n}
    for k, v in _recall(i2t_rank).items():
        out[f"i2t_r@{k}"] = v
    for k, v in _recall(t2i_rank).items():
        out[f"t2i_r@{k}"] = v
    if itm_rerank > 0:
        K = min(itm_rerank, n)
        X = torch.cat(images)
        top = sim.t().topk(K, dim=1).indices  # [captions, K]
        ranks = []
        with _autocast(device, precision):
            for c in range(n):
                cand = top[c]
                score = model.itm_scores(X[cand], ids[c].expand(K, -1), masks[c].expand(K, -1)).float()
                order = cand[score.argsort(descending=True)]
                hit = (order == c).nonzero()
                # outside the top-K: keep its ITC rank (re-ranking only permutes the top K)
                ranks.append(int(hit[0, 0]) if hit.numel() else int(t2i_rank[c]))
        for k, v in _recall(torch.tensor(ranks)).items():
            out[f"t2i_itm_r@{k}"] = v
    return out


@torch.no_grad()
def relevance_picture(model: nn.Module, batch: dict, device: torch.device, path: str, *,
                      precision: str = "fp32", title: Optional[str] = None) -> Optional[str]:
    """Write the relevance PNG for ``batch``: each image pruned under its own caption (a
    text-guided forward), kept patches outlined, dropped ones dimmed. None for the baseline."""
    from .data import denormalize
    from .viz import kept_patch_mask, relevance_figure

    if not getattr(model, "use_tsps", False):
        return None
    model.eval()
    with _autocast(device, precision):
        model.itm_scores(batch["images"].to(device), batch["input_ids"].to(device),
                         batch["attention_mask"].to(device))
    pe = model.vision.patch_embed
    kept = kept_patch_mask(model.vision.pruning_state(), pe.num_patches)
    return relevance_figure(denormalize(batch["images"].cpu()), kept, batch["captions"], pe.patch_size[0],
                            path, title=title)


# -------------------------------------------------------------------------------- logging
class _Metrics:
    """Append-only JSON lines (rank 0 only)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def write(self, rec: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a killed run may have logged past its last
        checkpoint; the resumed run logs those steps again)."""
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path, "r", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)


def _save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write never leaves a truncated last.pt


# ---------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) one training run; returns the summary dict (also printed on rank 0)."""
    from .data import make_loader
    from .model import BUSModel

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available")
    kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = _init_distributed(kind)
    device = torch.device(f"cuda:{d.local_rank}" if kind == "cuda" else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    if cfg.batch_size % d.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the world size {d.world}")
    local_bs = cfg.batch_size // d.world
    if local_bs < 2:
        raise ConfigError(f"--batch-size {cfg.batch_size} gives {local_bs} per rank; ITC/ITM need >= 2")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
    _barrier(d)

    # Resume target (resolved before anything random happens).
    ckpt = None
    if cfg.resume:
        path = os.path.join(cfg.out, "last.pt") if cfg.resume == "auto" else cfg.resume
        if os.path.exists(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        elif cfg.resume != "auto":
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        elif d.main:
            print(f"bus.train: --resume auto: no {path}, starting fresh", file=sys.stderr)

    _seed_all(cfg.seed)
    train_set, val_set, tok, mcfg = _build_data(cfg, d, _patch_size)
    if ckpt is not None:
        from .model import BUSConfig

        mcfg = BUSConfig(**ckpt["model_config"])  # what the weights were trained as
        old = ckpt.get("train_config", {})
        diff = [k for k in _TRAJECTORY_KEYS if k in old and old[k] != getattr(cfg, k)]
        if diff and d.main:
            warnings.warn(f"resuming with changed {', '.join(diff)}: the run will not match an uninterrupted one",
                          stacklevel=2)
    model = BUSModel(mcfg, bus=cfg.model == "bus").to(device)
    # Each rank's own stream for dropout and ITM negative sampling (init above is shared: seed).
    torch.manual_seed(cfg.seed + 1_000_003 * d.rank)

    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.05 * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total=cfg.steps, warmup=warmup, min_ratio=cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    step = 0
    if ckpt is not None:
        if any(".bus_tsps.ptm_head." in k for k in ckpt["model"]):
            raise ConfigError("--resume: this checkpoint has per-patch PTM heads (written before PTM trained "
                              "the selector's own scores); its weights and optimizer state do not fit this version")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        rng = ckpt["rng"]
        if len(rng) != d.world and d.main:
            warnings.warn(f"checkpoint from {len(rng)} rank(s), resuming on {d.world}: RNG streams differ",
                          stacklevel=2)
        _set_rng_state(rng[d.rank % len(rng)])

    net: nn.Module = model
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # PTM heads get no gradient when a batch has no known patch labels (folder data without
        # boxes); only then is DDP's unused-parameter search (an extra graph walk) needed.
        net = DDP(net, device_ids=[device.index] if kind == "cuda" else None,
                  find_unused_parameters=cfg.model == "bus" and cfg.data == "folder")

    # One sampler type for 1..N ranks, so the order is the same pure function of (seed, epoch).
    base_sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                      seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(base_sampler) // local_bs  # full batches only: fixed in-batch negatives
    if steps_per_epoch == 0:
        raise ConfigError(f"training set of {len(train_set)} is smaller than one global batch ({cfg.batch_size})")

    def epoch_loader(epoch: int, skip_batches: int):
        base_sampler.set_epoch(epoch)
        # Worker seeds come from the loader's own generator, seeded per epoch: no global RNG use.
        return make_loader(train_set, tok, batch_size=local_bs, shuffle=False, num_workers=cfg.num_workers,
                           seed=cfg.seed * 100_003 + epoch, sampler=SkipSampler(base_sampler, skip_batches * local_bs),
                           drop_last=True, max_length=mcfg.max_text_len)

    val_loader = make_loader(val_set, tok, batch_size=cfg.eval_batch_size, shuffle=False,
                             num_workers=cfg.num_workers, max_length=mcfg.max_text_len) if d.main else None
    metrics = _Metrics(os.path.join(cfg.out, "metrics.jsonl") if d.main else None)
    if d.main:
        import yaml

        if ckpt is not None:
            metrics.truncate_after(step)
        with open(os.path.join(cfg.out, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump({"train": dataclasses.asdict(cfg), "model": mcfg.to_dict(), "world_size": d.world}, f,
                           sort_keys=False)

    def do_eval(at: int) -> Dict[str, Any]:
        # fork_rng: evaluation must not shift the training RNG stream (exact resume with any
        # --eval-every); it runs on rank 0 with the unwrapped model, the others wait.
        res: Dict[str, Any] = {}
        if d.main:
            devs = [device.index] if kind == "cuda" else []
            with torch.random.fork_rng(devices=devs):
                t0 = time.time()
                res = evaluate_retrieval(model, val_loader, device, precision=cfg.precision, itm_rerank=cfg.itm_rerank)
                if cfg.viz_samples > 0 and cfg.model == "bus":
                    vb = next(iter(make_loader(Subset(val_set, range(min(cfg.viz_samples, len(val_set)))), tok,
                                               batch_size=cfg.viz_samples, shuffle=False,
                                               max_length=mcfg.max_text_len)))
                    png = relevance_picture(model, vb, device, os.path.join(cfg.out, f"relevance_step{at}.png"),
                                            precision=cfg.precision, title=f"{cfg.model} step {at}")
                    if png:
                        res["picture"] = os.path.basename(png)
                res["eval_s"] = round(time.time() - t0, 3)
            metrics.write({"kind": "eval", "step": at, **res})
            model.train()
        _barrier(d)
        return res

    def do_ckpt(at: int) -> None:
        rng = [_rng_state()]
        if d.on:  # every rank's RNG streams, so each resumes its own
            import torch.distributed as dist

            rng = [None] * d.world
            dist.all_gather_object(rng, _rng_state())
        if d.main:
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "step": at, "model_config": mcfg.to_dict(),
                "train_config": dataclasses.asdict(cfg), "rng": rng, "world_size": d.world,
                # The data order is a pure function of these (DistributedSampler(seed).set_epoch).
                "data_state": {"seed": cfg.seed, "epoch": at // steps_per_epoch,
                               "batch_in_epoch": at % steps_per_epoch, "steps_per_epoch": steps_per_epoch},
            }
            if cfg.ckpt_every and at % cfg.ckpt_every == 0:
                _save(state, os.path.join(cfg.out, f"ckpt_step{at}.pt"))
            _save(state, os.path.join(cfg.out, "last.pt"))
        _barrier(d)

    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    last_loss, last_eval, evaluated_at, ckpt_at = float("nan"), {}, -1, -1
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.model}", dynamic_ncols=True, file=sys.stderr)
    model.train()
    ema_ips = None
    while step < end:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        for batch in epoch_loader(epoch, in_epoch):
            t0 = time.perf_counter()
            inputs = {k: batch[k].to(device, non_blocking=True)
                      for k in ("images", "input_ids", "attention_mask", "patch_labels")}
            with _autocast(device, cfg.precision):
                losses = net(inputs)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr = sched.get_last_lr()[0]
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            ips = cfg.batch_size / max(dt, 1e-9)
            ema_ips = ips if ema_ips is None else 0.9 * ema_ips + 0.1 * ips
            if d.main and (step % cfg.log_every == 0 or step == end):
                vals = {k: float(v.detach()) for k, v in losses.items()}  # rank 0's losses
                last_loss = vals["loss"]
                metrics.write({"kind": "train", "step": step, "epoch": epoch, "lr": lr, **vals,
                               "img_per_s": round(ips, 2)})
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ema_ips:.1f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0:
                last_eval, evaluated_at = do_eval(step), step
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                do_ckpt(step)
                ckpt_at = step
            if step >= end:
                break
    if bar is not None:
        bar.close()
    if step >= cfg.steps and evaluated_at != step:
        last_eval = do_eval(step)  # the finished run always ends with an evaluation
    if ckpt_at != step:
        do_ckpt(step)

    summary = {"steps": step, "final_loss": last_loss, "i2t_r@1": last_eval.get("i2t_r@1"),
               "t2i_r@1": last_eval.get("t2i_r@1"), "out": cfg.out, "world_size": d.world}
    if d.main:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        print(f"bus.train done: steps={step}/{cfg.steps} final_loss={fmt(last_loss)} "
              f"i2t_R@1={fmt(summary['i2t_r@1'])} t2i_R@1={fmt(summary['t2i_r@1'])} out={cfg.out}", flush=True)
    if d.on:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """CLI entry point: parse ``argv`` (default ``sys.argv[1:]``), train, return the summary."""
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        # Problems found after parsing (data set too small, bad folder) get the same
        # "prog: error:" shape and exit status as bad flags.
        build_parser().error(str(e))


if __name__ == "__main__":
    main()
    sys.exit(0)
