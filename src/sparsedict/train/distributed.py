"""The only module that touches ``torch.distributed``.

Launched by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment): :func:`init` creates the
process group (NCCL on CUDA, gloo on CPU) with a finite timeout so a dead rank turns into an error,
not a hang. Every helper is a no-op in a single process.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str = "cpu", timeout_min: float = 10.0) -> tuple[int, int, str]:
    """Initialise the process group from torchrun's environment; returns ``(rank, world, device)``."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_grads(model: nn.Module) -> None:
    """Average parameter gradients over ranks (one flat buffer, one collective)."""
    if not is_dist():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
