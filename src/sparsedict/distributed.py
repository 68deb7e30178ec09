"""The only module that touches ``torch.distributed``: process group, collectives, differentiable reductions.

It sits at the bottom of the package (it imports nothing of ours) because the cache's torchrun mode, the
dictionaries' cross-rank statistics (BatchTopK's threshold, latent sharding) and the trainer all use it.

Launched by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment): :func:`init` creates the
process group (NCCL on CUDA, gloo on CPU) with a finite timeout so a dead or stuck rank turns into an
error, not a hang; torchrun (default ``--max-restarts 0``) then tears the whole job down. Every helper
is a no-op in a single process, and every rank must call every collective helper the same number of
times in the same order.

Two layouts: data parallel (every rank holds the whole dictionary, reads its own rows,
gradients averaged by :func:`all_reduce_grads`) and latent parallel (``sparsedict.dictionaries.sharded``: each
rank owns a slice of the latents and sees the same rows; its collectives are :func:`all_gather`,
:func:`all_reduce_sum` and the autograd pair :class:`CopyToShards` / :class:`ReduceFromShards`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, was killed, or did not arrive within the timeout."""


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


_TIMEOUT_MIN = 10.0


def init(device: str = "cpu", timeout_min: float = 10.0) -> tuple[int, int, str]:
    """Initialise the process group from torchrun's environment; returns ``(rank, world, device)``.

    ``timeout_min`` bounds every collective: a rank that waits longer for its peers raises instead of
    hanging (gloo raises in the waiting call; NCCL's watchdog aborts the communicator).
    """
    global _TIMEOUT_MIN
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1, device
    _TIMEOUT_MIN = timeout_min
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        init_process_group("nccl" if use_cuda else "gloo", datetime.timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size(), device


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """``torch.distributed.init_process_group`` from torchrun's environment, made safe to tear down.

    ``torch._dynamo`` is imported first. torch imports it lazily (loading a transformers model, the first
    optimiser's ``add_param_group``), and with it modules whose functions take ``group=dist.group.WORLD``
    as a default argument (``torch.distributed.nn.functional``, fsdp's ``ShardedGradScaler``). Imported
    after the group exists, those defaults keep the group alive for good: ``destroy_process_group`` cannot
    free it and its gloo worker threads run on into interpreter shutdown. There the worker that drops the
    last collective's tensors takes the GIL to free their Python objects, CPython ends it with
    ``pthread_exit``, and that unwind through a ``noexcept`` destructor aborts a finished run ("terminate
    called without an active exception", SIGABRT). Imported first, the defaults are ``None`` and
    :func:`destroy` frees the group and joins its threads.
    """
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend=backend, timeout=timeout)


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Run a collective; turn a backend failure into an error that says what probably happened."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as err:
        raise DistributedError(
            f"rank {rank()}/{world_size()}: collective {what} failed: another rank crashed, was killed, or "
            f"did not reach it within dist_timeout_min={_TIMEOUT_MIN:g} min (torchrun's summary names the "
            f"failed rank; its own traceback is above). Resume with the same command to continue from the "
            f"last checkpoint. Backend error: {err}"
        ) from err


def barrier() -> None:
    if is_dist():
        _collective("barrier", dist.barrier)


def all_reduce_grads(model: nn.Module) -> None:
    """Average parameter gradients over data-parallel ranks (one flat buffer, one collective).

    Latent-sharded dictionaries (``model.latent_sharded``) already hold complete gradients: skipped.
    """
    if not is_dist() or model.latent_sharded:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    _collective("all_reduce(grads)", lambda: dist.all_reduce(flat))
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (same shapes on every rank) with rank ``src``'s values, in place."""
    if not is_dist():
        return
    for t in tensors:
        buf = t.detach().contiguous()
        _collective("broadcast", lambda b=buf: dist.broadcast(b, src))
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)


def broadcast_model(model: nn.Module) -> None:
    """Make a dictionary's replicated parameters and buffers identical to rank 0's.

    Called after initialisation from data (b_dec, input_scale) so that data-parallel replicas start
    equal. A latent-sharded model broadcasts only what it replicates (``model.replicated_tensors()``).
    """
    if not is_dist():
        return
    if model.latent_sharded:
        tensors = list(model.replicated_tensors())
    else:
        tensors = [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    broadcast_tensors(tensors)


def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. 'SIGTERM received': all ranks stop together)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    _collective("all_reduce(stop flag)", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return bool(t.item() > 0)


def mean_metrics(metrics: dict[str, float], device: str | torch.device = "cpu") -> dict[str, float]:
    """Average scalar metrics over ranks (keys must match on every rank); identity in one process."""
    if not is_dist() or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    _collective("all_reduce(metrics)", lambda: dist.all_reduce(t))
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_gather(t: Tensor) -> Tensor:
    """Stack ``t`` from every rank: ``[R, *t.shape]`` (same shape on every rank; not differentiable)."""
    if not is_dist():
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    _collective("all_gather", lambda: dist.all_gather(out, t.contiguous()))
    return torch.stack(out)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks into a new tensor (not differentiable; see :class:`ReduceFromShards`)."""
    if not is_dist():
        return t
    out = t.contiguous().clone()
    _collective("all_reduce", lambda: dist.all_reduce(out))
    return out


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks into a new tensor (identity in one process)."""
    if not is_dist():
        return t
    return all_reduce_sum(t) / dist.get_world_size()


class CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (a replicated input used by every shard)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return all_reduce_sum(g)


class ReduceFromShards(torch.autograd.Function):
    """Forward sums per-shard partial results over ranks; backward passes the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return all_reduce_sum(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


def destroy() -> None:
    """The last collective: once every rank got here, tear the process group down (its backend threads are
    joined; see :func:`init_process_group`). After it every helper here acts as in one process, so code
    that runs afterwards on one rank only (the held-out evaluation) can wait on nothing."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def launch_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 alone), valid also after :func:`destroy`."""
    return int(os.environ.get("RANK", "0"))
