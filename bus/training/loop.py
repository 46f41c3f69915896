"""The optimisation side of a run: optimizer and schedule, one training step, one epoch, and the
metrics log. :class:`Run` holds what these share (built by :func:`bus.train.train`)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .config import TrainConfig
from .data import RunData, TrainBatches
from .distributed import Dist

__all__ = ["Metrics", "Run", "autocast", "build_optimizer", "lr_lambda", "param_groups", "train_epoch",
           "train_step"]


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``bf16`` / ``fp16``; a null context for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: nn.Module, weight_decay: float):
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


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """``(AdamW, LambdaLR warmup + cosine, GradScaler)`` for ``cfg`` (the scaler is active for
    fp16 only)."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.05 * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total=cfg.steps, warmup=warmup, min_ratio=cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return opt, sched, scaler


class Metrics:
    """Append-only JSON lines (rank 0 only: ``path`` None elsewhere)."""

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


@dataclass
class Run:
    """One run's moving parts. ``model`` is the bare module (evaluation, checkpoints); ``net``
    is what the step calls (``model`` or its DDP wrapper). ``step`` counts optimizer steps."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    data: RunData
    mcfg: Any  # the BUSConfig being trained (the checkpoint's on resume)
    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    batches: TrainBatches
    metrics: Metrics
    step: int = 0
    val_loader: Any = None
    bar: Any = None
    last_loss: float = float("nan")
    last_eval: Dict[str, Any] = field(default_factory=dict)
    evaluated_at: int = -1
    ckpt_at: int = -1
    ema_ips: Optional[float] = None


def train_step(run: Run, batch: dict):
    """One optimizer step on ``batch``; returns ``(losses dict, lr used)``. Gradients are
    clipped on the unscaled values; the schedule advances after the step."""
    inputs = {k: batch[k].to(run.device, non_blocking=True)
              for k in ("images", "input_ids", "attention_mask", "patch_labels")}
    with autocast(run.device, run.cfg.precision):
        losses = run.net(inputs)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(losses["loss"]).backward()
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    lr = run.sched.get_last_lr()[0]
    run.sched.step()
    return losses, lr


def _log_step(run: Run, epoch: int, end: int, lr: float, losses: dict, seconds: float) -> None:
    ips = run.cfg.batch_size / max(seconds, 1e-9)
    run.ema_ips = ips if run.ema_ips is None else 0.9 * run.ema_ips + 0.1 * ips
    if run.d.main and (run.step % run.cfg.log_every == 0 or run.step == end):
        vals = {k: float(v.detach()) for k, v in losses.items()}  # rank 0's losses
        run.last_loss = vals["loss"]
        run.metrics.write({"kind": "train", "step": run.step, "epoch": epoch, "lr": lr, **vals,
                           "img_per_s": round(ips, 2)})
        if run.bar is not None:
            run.bar.set_postfix(loss=f"{run.last_loss:.4f}", img_s=f"{run.ema_ips:.1f}", refresh=False)
    if run.bar is not None:
        run.bar.update(1)


def train_epoch(run: Run, end: int, after_step: Callable[[int], None]) -> None:
    """Train from ``run.step`` to the end of its epoch or to step ``end``, whichever is first,
    calling ``after_step(step)`` after each step (evaluation, checkpoints). A resumed epoch
    starts at its first unconsumed batch."""
    epoch, in_epoch = divmod(run.step, run.batches.steps_per_epoch)
    for batch in run.batches.epoch(epoch, in_epoch):
        t0 = time.perf_counter()
        losses, lr = train_step(run, batch)
        run.step += 1
        _log_step(run, epoch, end, lr, losses, time.perf_counter() - t0)
        after_step(run.step)
        if run.step >= end:
            break
