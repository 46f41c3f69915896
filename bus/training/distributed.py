"""Process-group plumbing for ``torchrun``: which rank this is, barriers, gathers. One process
(``WORLD_SIZE`` unset or 1) needs no process group and every helper is a no-op."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch

from .config import ConfigError

__all__ = ["Dist", "all_gather_object", "barrier", "init_distributed", "shutdown", "select_device"]


@dataclass
class Dist:
    """Where this process stands: its global ``rank``, the ``world`` size, its ``local_rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and pictures."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        """More than one process."""
        return self.world > 1


def init_distributed(device_kind: str) -> Dist:
    """Join the process group set up by torchrun (env vars), if there is more than one rank:
    gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def select_device(requested: str):
    """``(Dist, torch.device)`` for ``--device auto|cpu|cuda``: joins the process group and
    binds this rank to its local GPU. :class:`ConfigError` if CUDA is asked for and absent."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available")
    kind = "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"
    d = init_distributed(kind)
    device = torch.device(f"cuda:{d.local_rank}" if kind == "cuda" else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    return d, device


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op for one process)."""
    if d.on:
        import torch.distributed as dist

        dist.barrier()


def all_gather_object(d: Dist, obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not d.on:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def shutdown(d: Dist) -> None:
    """Leave the process group (no-op for one process)."""
    if d.on:
        import torch.distributed as dist

        dist.destroy_process_group()
