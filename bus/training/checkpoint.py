"""Checkpoints: written atomically and durably, read without running anything from the file.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, None, and
lists / tuples / dicts of them), RNG states included, so ``torch.load(weights_only=True)``
reads it: a file whose pickle asks to call or build anything else (``os.system``, a class) is
refused before any of it runs. Keys::

    format_version  int (FORMAT_VERSION)
    model           {name: Tensor}               BUSModel.state_dict()
    optimizer       AdamW.state_dict()
    scheduler       LambdaLR.state_dict()
    scaler          GradScaler.state_dict()
    step            int                          optimizer steps done
    model_config    dict                         BUSConfig.to_dict(): what the weights are
    train_config    dict                         TrainConfig as a dict
    rng             [rng_state() per rank]       see rng_state
    world_size      int
    data_state      {seed, epoch, batch_in_epoch, steps_per_epoch}

A file that is not such a dict (another program's checkpoint, a truncated or foreign file)
gets a :class:`CheckpointError` naming the file and what is wrong or missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import sys
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from .config import TRAJECTORY_KEYS, ConfigError, TrainConfig
from .distributed import Dist, all_gather_object, barrier

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_checkpoint", "model_config_from", "restore",
           "resume_path", "rng_state", "save_checkpoint", "seed_all", "set_rng_state", "write_checkpoint"]

FORMAT_VERSION = 1
# Key -> the type it must have; everything resume reads.
_REQUIRED = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "step": int,
             "model_config": dict, "rng": list}
_RNG_KEYS = ("torch", "numpy", "python")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: unsafe, foreign, incomplete or not fitting."""


# ------------------------------------------------------------------------------ RNG state
def rng_state() -> Dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states as tensors and plain values
    (what ``weights_only=True`` loads): ``torch`` uint8 Tensor, ``cuda`` list of uint8 Tensors
    or None, ``numpy`` ``[name, int64 Tensor [624] (the uint32 key), pos, has_gauss, cached_gaussian]``,
    ``python`` ``[version, list of 625 ints, gauss_next]``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        # int64, not uint32: torch's plain-pickle path (all_gather_object) cannot rebuild uint32 storages.
        "numpy": [str(name), torch.from_numpy(np.array(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": [int(version), list(internal), gauss_next],
    }


def set_rng_state(s: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA only where CUDA is available)."""
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------- write
def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry is on disk; POSIX only (Windows
    # cannot open a directory, and its os.replace is already journaled by NTFS).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically and durably: into ``path.tmp``, fsync'd, renamed
    over ``path``, then the directory fsync'd. A kill or power loss at any point leaves either
    the old file or the complete new one, never a truncated ``last.pt``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def checkpoint_state(run, at: int, rng: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The checkpoint dict of ``run`` (a :class:`bus.training.loop.Run`) after step ``at``."""
    cfg, spe = run.cfg, run.batches.steps_per_epoch
    return {
        "format_version": FORMAT_VERSION,
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(), "step": at, "model_config": run.mcfg.to_dict(),
        "train_config": dataclasses.asdict(cfg), "rng": rng, "world_size": run.d.world,
        # The data order is a pure function of these (DistributedSampler(seed).set_epoch).
        "data_state": {"seed": cfg.seed, "epoch": at // spe, "batch_in_epoch": at % spe, "steps_per_epoch": spe},
    }


def write_checkpoint(run, at: int) -> None:
    """Checkpoint ``run`` after step ``at``: every rank's RNG streams (so each resumes its own),
    written by rank 0 to ``last.pt`` and, every ``--ckpt-every`` steps, ``ckpt_step{at}.pt``."""
    rng = all_gather_object(run.d, rng_state())
    if run.d.main:
        state = checkpoint_state(run, at, rng)
        cfg = run.cfg
        if cfg.ckpt_every and at % cfg.ckpt_every == 0:
            save_checkpoint(state, os.path.join(cfg.out, f"ckpt_step{at}.pt"))
        save_checkpoint(state, os.path.join(cfg.out, "last.pt"))
    barrier(run.d)


# ----------------------------------------------------------------------------------- read
def resume_path(cfg: TrainConfig, d: Dist) -> Optional[str]:
    """The checkpoint ``--resume`` names: ``PATH``, or ``OUT/last.pt`` for ``auto`` (None, with
    a note, when it does not exist yet). ``FileNotFoundError`` for a missing explicit PATH."""
    if not cfg.resume:
        return None
    path = os.path.join(cfg.out, "last.pt") if cfg.resume == "auto" else cfg.resume
    if os.path.exists(path):
        return path
    if cfg.resume != "auto":
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    if d.main:
        print(f"bus.train: --resume auto: no {path}, starting fresh", file=sys.stderr)
    return None


def _load_failure(path: str, e: BaseException) -> CheckpointError:
    text = str(e)
    m = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", text)
    if m:
        what = (m.group(1) or m.group(2)).rstrip(".")
        origin = ("a bus.train checkpoint from before RNG states were stored as plain values (numpy arrays), "
                  "which cannot be resumed safely" if what.startswith("numpy") else
                  "not a checkpoint written by this bus.train")
        return CheckpointError(
            f"--resume {path}: refused: its pickle asks to call or build {what}, and a checkpoint may hold "
            "only tensors and plain Python values (loaded with torch.load(weights_only=True); nothing in the "
            f"file was run). This is {origin}; do not load it with weights_only=False unless you trust where "
            "it came from")
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if \
            "WeightsUnpickler error:" in text else "not tensors and plain values"
        return CheckpointError(
            f"--resume {path}: refused by the safe loader torch.load(weights_only=True) ({detail}); nothing in the "
            "file was run. Not a checkpoint written by this bus.train")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return CheckpointError(f"--resume {path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first[:200]})")


def _check_rng(path: str, rng: list) -> None:
    if not rng:
        raise CheckpointError(f"--resume {path}: 'rng' is empty (one RNG state per rank expected)")
    for i, s in enumerate(rng):
        missing = [k for k in _RNG_KEYS if not isinstance(s, dict) or k not in s]
        if missing:
            raise CheckpointError(f"--resume {path}: rng[{i}] lacks {', '.join(missing)}")
        if not isinstance(s["torch"], Tensor) or not isinstance(s["numpy"], (list, tuple)) \
                or len(s["numpy"]) != 5 or not isinstance(s["numpy"][1], Tensor) \
                or not isinstance(s["python"], (list, tuple)) or len(s["python"]) != 3:
            raise CheckpointError(f"--resume {path}: rng[{i}] is not in the layout of bus.training.checkpoint.rng_state")


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and check a checkpoint safely (``torch.load(weights_only=True)``, on CPU).

    Raises :class:`CheckpointError` naming ``path`` for a file that asks to run code, is not a
    PyTorch file, is not a dict, lacks a required key (all missing ones listed) or holds one of
    the wrong type; ``FileNotFoundError`` if it does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), KeyError (bare pickle bytes), EOFError
        raise _load_failure(path, e) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"--resume {path}: holds a {type(ckpt).__name__}, not a bus.train checkpoint dict")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        have = ", ".join(sorted(map(str, ckpt))[:12]) or "nothing"
        raise CheckpointError(f"--resume {path}: not a complete bus.train checkpoint: missing "
                              f"{', '.join(missing)} (it has: {have})")
    wrong = [f"{k} ({type(ckpt[k]).__name__}, want {t.__name__})" for k, t in _REQUIRED.items()
             if not isinstance(ckpt[k], t) or (t is int and isinstance(ckpt[k], bool))]
    if wrong:
        raise CheckpointError(f"--resume {path}: wrong type for {', '.join(wrong)}")
    if ckpt["step"] < 0:
        raise CheckpointError(f"--resume {path}: step {ckpt['step']} is negative")
    if not all(isinstance(v, Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"--resume {path}: 'model' is not a state dict of tensors")
    version = ckpt.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"--resume {path}: format_version {version!r} is newer than this bus.train "
                              f"reads ({FORMAT_VERSION})")
    _check_rng(path, ckpt["rng"])
    return ckpt


def model_config_from(ckpt: Dict[str, Any], path: str, cfg: TrainConfig, d: Dist):
    """The :class:`bus.model.BUSConfig` the checkpoint's weights were trained as; warns (rank
    0) when a setting that shapes the trajectory differs from the checkpoint's run."""
    from ..model import BUSConfig

    fields = {f.name for f in dataclasses.fields(BUSConfig)}
    unknown = sorted(set(ckpt["model_config"]) - fields)
    if unknown:
        raise CheckpointError(f"--resume {path}: model_config has fields this BUSConfig lacks: {', '.join(unknown)} "
                              "(written by another version of bus.model)")
    try:
        mcfg = BUSConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"--resume {path}: model_config does not make a BUSConfig: {e}") from e
    old = ckpt.get("train_config", {})
    old = old if isinstance(old, dict) else {}
    diff = [k for k in TRAJECTORY_KEYS if k in old and old[k] != getattr(cfg, k)]
    if diff and d.main:
        warnings.warn(f"resuming with changed {', '.join(diff)}: the run will not match an uninterrupted one",
                      stacklevel=2)
    return mcfg


def _load_weights(model: torch.nn.Module, weights: Dict[str, Tensor], path: str) -> None:
    if any(".bus_tsps.ptm_head." in k for k in weights):
        raise CheckpointError(f"--resume {path}: this checkpoint has per-patch PTM heads (written before PTM "
                              "trained the selector's own scores); its weights and optimizer state do not fit "
                              "this version")
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        raise CheckpointError(f"--resume {path}: its weights do not fit the model"
                              + (f"; missing {few(missing)}" if missing else "")
                              + (f"; unexpected {few(unexpected)}" if unexpected else ""))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"--resume {path}: its weights do not fit the model: {e}") from e


def restore(ckpt: Dict[str, Any], path: str, model, opt, sched, scaler, d: Dist) -> int:
    """Load weights, optimizer, schedule, scaler and this rank's RNG streams from ``ckpt``;
    returns the step to continue from."""
    _load_weights(model, ckpt["model"], path)
    try:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"--resume {path}: optimizer / scheduler / scaler state does not fit "
                              f"({type(e).__name__}: {e})") from e
    rng = ckpt["rng"]
    if len(rng) != d.world and d.main:
        warnings.warn(f"checkpoint from {len(rng)} rank(s), resuming on {d.world}: RNG streams differ",
                      stacklevel=2)
    set_rng_state(rng[d.rank % len(rng)])
    return int(ckpt["step"])
