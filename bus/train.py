"""Training CLI for :class:`bus.model.BUSModel` and its baseline: ``python -m bus.train``.

Examples::

    python -m bus.train --size tiny --steps 200 --out runs/tiny            # synthetic shapes
    python -m bus.train --preset tiny --steps 200 --out runs/tiny          # the same, by preset name
    python -m bus.train --config configs/tiny_synthetic.yaml --lr 5e-4      # flags override YAML
    python -m bus.train --data folder --root imgs/ --captions caps.json --size base
    python -m bus.train --out runs/tiny --resume auto                       # continue a run
    torchrun --nproc_per_node 2 -m bus.train --size tiny --steps 100        # DDP

Configuration: built-in defaults < ``--config`` YAML (keys are the flag names, ``-`` or ``_``;
read with ``yaml.safe_load``) < command-line flags. The model starts from a preset:
``--preset NAME`` is ``BUSConfig.NAME()`` (``base`` = ``BUSConfig()``; the names are whatever
presets :class:`bus.model.BUSConfig` defines, e.g. ``tiny``), and without it ``--size tiny|base``
picks one as before. ``--model-arg KEY=VALUE`` (repeatable; YAML: ``model_args: {...}``) then
overrides any BUSConfig field, e.g. ``--model-arg fusion_layers=1``.

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

Safe resume: a checkpoint holds only tensors and plain Python values (the RNG states too) and is
read with ``torch.load(weights_only=True)``, so a crafted ``last.pt`` runs nothing; a foreign,
truncated or incomplete file is refused with an error naming it and what is wrong or missing.
Checkpoints are written to ``*.tmp``, fsync'd, renamed, and the directory fsync'd.

Distributed (``torchrun``, ``WORLD_SIZE > 1``): gloo on CPU, nccl on CUDA; each rank draws its
own shard per epoch. Rank 0 writes logs, checkpoints and pictures and runs the evaluation while
the others wait at a barrier. Note that ITC and ITM use **in-batch negatives per rank** (the
model does not all-gather embeddings): a global batch of B on N ranks trains with the negatives
of a batch of B / N, like N independent small-batch contrastive runs with averaged gradients.
The paper stack's ITC queue is the exception: every rank enqueues the momentum features of the
whole global batch (all-gathered, as ALBEF), so the ranks keep one identical queue.

This module wires the run together; the parts live in :mod:`bus.training` (``config``,
``distributed``, ``data``, ``loop``, ``checkpoint``, ``evaluate``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .training import config as _config
from .training.checkpoint import (CheckpointError, load_checkpoint, model_config_from, restore, resume_path,
                                  seed_all, write_checkpoint)
from .training.config import ConfigError, TrainConfig, available_presets, build_parser
from .training.data import SkipSampler, TrainBatches, build_data
from .training.distributed import Dist, barrier, select_device, shutdown
from .training.evaluate import evaluate_retrieval, relevance_picture, run_evaluation
from .training.loop import Metrics, Run, build_optimizer, lr_lambda, train_epoch

__all__ = ["CheckpointError", "ConfigError", "SkipSampler", "TrainConfig", "available_presets", "build_parser",
           "evaluate_retrieval", "lr_lambda", "main", "parse_config", "relevance_picture", "train"]


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Resolve defaults < YAML (``--config``) < flags into a validated :class:`TrainConfig`.
    Invalid input exits with status 2 and a ``python -m bus.train: error: ...`` message."""
    return _config.parse_config(argv, description=__doc__.split("\n\n")[0])


def _setup(cfg: TrainConfig):
    """(Dist, device, per-rank batch size); creates OUT on rank 0."""
    d, device = select_device(cfg.device)
    if cfg.batch_size % d.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the world size {d.world}")
    local_bs = cfg.batch_size // d.world
    if local_bs < 2:
        raise ConfigError(f"--batch-size {cfg.batch_size} gives {local_bs} per rank; ITC/ITM need >= 2")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
    barrier(d)
    return d, device, local_bs


def _wrap_ddp(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    if not d.on:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # PTM heads get no gradient when a batch has no known patch labels (folder data without
    # boxes); only then is DDP's unused-parameter search (an extra graph walk) needed.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=cfg.model == "bus" and cfg.data == "folder")


def _start_outputs(run: Run, resumed: bool) -> None:
    """Rank 0: the eval loader, the progress bar, metrics trimmed to the resume step, config.yaml."""
    from .data import make_loader

    cfg, d = run.cfg, run.d
    if not d.main:
        return
    import yaml

    run.val_loader = make_loader(run.data.val_set, run.data.tokenizer, batch_size=cfg.eval_batch_size,
                                 shuffle=False, num_workers=cfg.num_workers, max_length=run.mcfg.max_text_len)
    if resumed:
        run.metrics.truncate_after(run.step)
    with open(os.path.join(cfg.out, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({"train": dataclasses.asdict(cfg), "model": run.mcfg.to_dict(), "world_size": d.world}, f,
                       sort_keys=False)
    if cfg.progress:
        from tqdm import tqdm

        run.bar = tqdm(total=cfg.steps, initial=run.step, desc=cfg.model, dynamic_ncols=True, file=sys.stderr)


def _after_step(run: Run, at: int) -> None:
    cfg = run.cfg
    if cfg.eval_every and at % cfg.eval_every == 0:
        run.last_eval, run.evaluated_at = run_evaluation(run, at), at
    if cfg.ckpt_every and at % cfg.ckpt_every == 0:
        write_checkpoint(run, at)
        run.ckpt_at = at


def _summary(run: Run) -> Dict[str, Any]:
    cfg, e = run.cfg, run.last_eval
    summary = {"steps": run.step, "final_loss": run.last_loss, "i2t_r@1": e.get("i2t_r@1"),
               "t2i_r@1": e.get("t2i_r@1"), "out": cfg.out, "world_size": run.d.world}
    if run.d.main:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        print(f"bus.train done: steps={run.step}/{cfg.steps} final_loss={fmt(run.last_loss)} "
              f"i2t_R@1={fmt(summary['i2t_r@1'])} t2i_R@1={fmt(summary['t2i_r@1'])} out={cfg.out}", flush=True)
    return summary


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) one training run; returns the summary dict (also printed on rank 0)."""
    from .model import BUSModel

    d, device, local_bs = _setup(cfg)
    path = resume_path(cfg, d)  # resolved and checked before anything random happens
    ckpt = load_checkpoint(path) if path else None
    seed_all(cfg.seed)
    data = build_data(cfg, d)
    mcfg = model_config_from(ckpt, path, cfg, d) if ckpt else data.model_config  # what the weights are
    model = BUSModel(mcfg, bus=cfg.model == "bus").to(device)
    # Each rank's own stream for dropout and ITM negative sampling (init above is shared: seed).
    torch.manual_seed(cfg.seed + 1_000_003 * d.rank)
    opt, sched, scaler = build_optimizer(model, cfg, device)
    step = restore(ckpt, path, model, opt, sched, scaler, d) if ckpt else 0

    run = Run(cfg=cfg, d=d, device=device, data=data, mcfg=mcfg, model=model, net=_wrap_ddp(model, cfg, d, device),
              opt=opt, sched=sched, scaler=scaler, batches=TrainBatches(cfg, data, d, local_bs, mcfg.max_text_len),
              metrics=Metrics(os.path.join(cfg.out, "metrics.jsonl") if d.main else None), step=step)
    _start_outputs(run, resumed=ckpt is not None)
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    model.train()
    while run.step < end:
        train_epoch(run, end, lambda at: _after_step(run, at))
    if run.bar is not None:
        run.bar.close()
    if run.step >= cfg.steps and run.evaluated_at != run.step:
        run.last_eval = run_evaluation(run, run.step)  # the finished run always ends with an evaluation
    if run.ckpt_at != run.step:
        write_checkpoint(run, run.step)
    summary = _summary(run)
    shutdown(d)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """CLI entry point: parse ``argv`` (default ``sys.argv[1:]``), train, return the summary."""
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        # Problems found after parsing (data set too small, bad folder, bad checkpoint) get the
        # same "prog: error:" shape and exit status as bad flags.
        build_parser().error(str(e))


if __name__ == "__main__":
    main()
    sys.exit(0)
