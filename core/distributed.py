"""torch.distributed plumbing for runs under torchrun: process group, rank checks, reductions, data sharding."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def init_from_env(device: torch.device, timeout_hours: float = 24.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Ranks other than 0 wait at barriers while rank 0 runs a long single-process stage.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=timeout_hours))
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes checkpoints, artifacts and the manifest."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device, active: bool = True) -> list[float]:
    """Sum a few numbers over all ranks (when `active`: every rank takes part in this stage)."""
    if not active or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any, active: bool = True) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not active or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def global_batches(n: int, batch_size: int, seed: int, epoch: int, me: int = 0, world: int = 1) -> list[list[int]]:
    """One epoch's batches of dataset indices, rank `me`'s share of each global batch.

    The global batches are the same for any number of ranks (a seeded permutation cut into
    `batch_size` pieces, the incomplete last one dropped), so N ranks see what one process would.
    """
    if batch_size % world:
        raise ValueError(f"data.batch_size {batch_size} must be divisible by the {world} processes")
    if n < batch_size:  # a tiny split: one global batch of what there is
        batch_size = n - n % world
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per = batch_size // world
    return [perm[i + me * per:i + (me + 1) * per] for i in range(0, n - batch_size + 1, batch_size)]
