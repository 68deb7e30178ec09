"""The one training loop for every architecture, for one or many dictionaries sharing a data pass.

``Trainer(dictionaries, sources, cfg)``: ``dictionaries`` maps a name to a :class:`Dictionary`;
``sources`` maps a ``(hookpoint, target)`` key to a data source (ActivationStore, LiveSource,
TensorSource). Dictionaries on the same key share each batch read; different keys are read in
lockstep. Gradient-trained dictionaries go through ``forward -> sum(losses) -> backward ->``
:class:`DictionaryOptimizer`; solver-trained ones (SNMF) through ``fit_step``. Checkpoints hold
everything needed to resume exactly (weights, optimiser state, dead-latent counters, RNG, the data
position of every source).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedict import distributed
from sparsedict.dictionaries.base import Dictionary
from sparsedict.train import checkpoint as ckpt
from sparsedict.train.config import TrainConfig
from sparsedict.train.dead import DeadLatentTracker
from sparsedict.train.logging import RunLogger
from sparsedict.train.optim import DictionaryOptimizer

SourceKey = tuple[str, str]


def source_key(model: Dictionary) -> SourceKey:
    return (model.cfg.hookpoint, model.cfg.target if model.cfg.is_transcoder else "")


@dataclass
class Member:
    """One dictionary being trained, with its optimiser and dead-latent counters."""

    name: str
    model: Dictionary
    key: SourceKey
    opt: DictionaryOptimizer | None
    dead: DeadLatentTracker


class Trainer:
    def __init__(self, dictionaries: dict[str, Dictionary], sources: dict[SourceKey, Any], cfg: TrainConfig,
                 logger: RunLogger | None = None):
        self.cfg = cfg
        self.sources = sources
        self.device = torch.device(cfg.device)
        for name, model in dictionaries.items():
            if source_key(model) not in sources:
                raise KeyError(f"dictionary {name!r} needs data for {source_key(model)}; sources: {list(sources)}")
        first = next(iter(sources.values()))
        self.world_size = getattr(first, "world_size", 1)
        self.local_batch = cfg.batch_size // self.world_size
        rows = min(s.n_rows for s in sources.values())
        self.total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * rows / cfg.batch_size))
        if cfg.shard_latents:
            from sparsedict.dictionaries.sharded import shard_dictionaries

            if self.world_size > 1:
                raise ValueError("shard_latents: every rank must read the same rows; open the sources with "
                                 "rank=0, world_size=1 and the global batch_size")

            dictionaries = shard_dictionaries(dictionaries, cfg)
        self.members = [
            Member(name, model.to(self.device), source_key(model),
                   DictionaryOptimizer(model, cfg, self.total_steps) if model.trains_by_gradient else None,
                   DeadLatentTracker(model.n_latents, cfg.dead_tokens, self.device,
                                     sync=not getattr(model, "latent_sharded", False)))
            for name, model in dictionaries.items()
        ]
        self.step = 0
        self.tokens = 0
        self.logger = logger or RunLogger(cfg)
        self._stop = False

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self) -> None:
        """Normalisation constants and b_dec from a data sample (before the first step)."""
        for m in self.members:
            sample = self.sources[m.key].sample(self.cfg.init_rows, seed=self.cfg.seed)
            x, y = sample if isinstance(sample, tuple) else (sample, None)
            x = x.to(self.device, torch.float32)
            y = x if y is None else y.to(self.device, torch.float32)
            m.model.input_scale.fill_(input_scale(x, self.cfg.normalise_inputs))
            c = float(m.model.input_scale)
            m.model.init_from_data(x * c, y * c)
            distributed.broadcast_model(m.model)  # replicas start identical (rank 0's values)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, batches: dict[SourceKey, tuple[Tensor, Tensor | None]]) -> dict[str, float]:
        """One optimiser step for every dictionary on its batch; returns scalar metrics by name.

        Loss terms and LR every step; batch FVU, L0 and dead fraction only on the steps :meth:`fit` logs.
        """
        metrics: dict[str, float] = {}
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.autocast == "bf16" else nullcontext()
        log_step = (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 >= self.total_steps
        for m in self.members:
            x, y = batches[m.key]
            c = float(m.model.input_scale)
            x = x.to(self.device, torch.float32, non_blocking=True)
            y = None if y is None else y.to(self.device, torch.float32, non_blocking=True)
            if c != 1.0:
                x, y = x * c, (None if y is None else y * c)
            m.model.on_step(self.step, self.total_steps)
            if m.opt is None:
                out_metrics = m.model.fit_step(x, y)
                metrics.update({f"{m.name}/{k}": float(v) for k, v in out_metrics.items()})
                continue
            lr = m.opt.set_step(self.step)
            m.model.set_dead_mask(m.dead.dead_mask())
            m.model.train()
            with amp:
                out = m.model(x, y)
            loss = sum(out.losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{m.name}: loss is {float(loss)} at step {self.step}; check the activations for NaN/inf "
                    f"or lower the learning rate (lr={lr:g})"
                )
            loss.backward()
            self.sync_grads(m)
            grad_norm = m.opt.step()
            m.model.after_step(out)
            m.dead.update(out.code, x.shape[0])
            metrics.update({f"{m.name}/{k}": float(v.detach()) for k, v in out.losses.items()})
            metrics[f"{m.name}/loss"] = float(loss.detach())
            metrics[f"{m.name}/lr"] = lr
            if log_step:  # batch FVU / L0 / dead only on the steps fit() logs (a few [B, d] passes each)
                with torch.no_grad():
                    target = x if y is None else y
                    res = (out.x_hat.float() - target).pow(2).sum()
                    var = (target - target.mean(0)).pow(2).sum()
                metrics[f"{m.name}/fvu"] = float(res / var)
                metrics[f"{m.name}/l0"] = float(out.code.l0().float().mean())
                metrics[f"{m.name}/dead"] = m.dead.dead_fraction()
            if grad_norm:
                metrics[f"{m.name}/grad_norm"] = grad_norm
        self.step += 1
        self.tokens += self.cfg.batch_size
        return metrics

    def sync_grads(self, m: Member) -> None:
        """Average gradients over data-parallel ranks (no-op in a single process)."""
        from sparsedict.distributed import all_reduce_grads

        all_reduce_grads(m.model)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict[str, float]:
        out_dir = Path(self.cfg.out_dir)
        state = ckpt.load_checkpoint(out_dir / "checkpoint") if resume else None
        if state is not None:
            self.load_state_dict(state)
        else:
            self.initialise()
        iters = {key: iter(src) for key, src in self.sources.items()}
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        last: dict[str, float] = {}
        t0, tok0 = time.perf_counter(), self.tokens
        try:
            with self.logger.progress(self.total_steps, self.step) as bar:
                while self.step < self.total_steps:
                    if distributed.any_rank(self._stop, self.device):  # all ranks stop at the same step
                        self._stop = True
                        break
                    batches = {key: _next_batch(iters, key, self.sources[key]) for key in iters}
                    last = self.train_step(batches)
                    tps = (self.tokens - tok0) / max(1e-9, time.perf_counter() - t0)
                    bar.update(1, tps, last)
                    if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                        last = distributed.mean_metrics(last, self.device)
                        self.logger.log(self.step, self.tokens, {**last, "tokens_per_s": tps})
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save_checkpoint()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self._stop:
            self.save_checkpoint()
            raise SystemExit(f"stopped by SIGTERM at step {self.step}; checkpoint saved, rerun to resume")
        for m in self.members:
            if m.opt is not None:
                m.opt.eval()
        self.logger.close()
        return last

    def _on_sigterm(self, *_: Any) -> None:
        self._stop = True

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "rng": ckpt.rng_state(),
            "sources": {f"{k[0]}|{k[1]}": s.state_dict() for k, s in self.sources.items()},
            "members": {
                m.name: {
                    "model": m.model.state_dict(),
                    "opt": m.opt.state_dict() if m.opt is not None else {},
                    "dead": m.dead.state_dict(),
                }
                for m in self.members
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        ckpt.set_rng_state(state["rng"])
        for k, s in self.sources.items():
            s.load_state_dict(state["sources"][f"{k[0]}|{k[1]}"])
        for m in self.members:
            ms = state["members"][m.name]
            m.model.load_state_dict(ms["model"])
            if m.opt is not None:
                m.opt.load_state_dict(ms["opt"])
            m.dead.load_state_dict(ms["dead"])

    def save_checkpoint(self) -> None:
        """Collective: each rank writes its RNG + data positions; dictionaries from rank 0 (or every shard)."""
        state = self.state_dict()
        if not (distributed.is_main() or self.cfg.shard_latents):
            del state["members"]  # data-parallel replicas equal rank 0's
        ckpt.save_checkpoint(Path(self.cfg.out_dir) / "checkpoint", state, self.step)

    def save(self, meta: dict[str, Any] | None = None) -> dict[str, Path]:
        """Save every dictionary with ``save_pretrained`` under ``out_dir/<name>``."""
        from sparsedict.distributed import is_main

        paths = {}
        for m in self.members:
            path = Path(self.cfg.out_dir) / m.name
            model = m.model.unshard() if getattr(m.model, "latent_sharded", False) else m.model  # collective
            if is_main():
                info = dict(getattr(self.sources[m.key], "meta", {}) or {})
                info.update(meta or {})
                info.update(training_tokens=self.tokens, training_steps=self.step,
                            normalisation=self.cfg.normalise_inputs)
                model.save_pretrained(path, info)
            paths[m.name] = path
        return paths


def _next_batch(iters: dict, key: SourceKey, source: Any) -> tuple[Tensor, Tensor | None]:
    """Next batch of ``key``; a source whose iterator ends after an epoch is restarted."""
    try:
        return next(iters[key])
    except StopIteration:
        iters[key] = iter(source)
        return next(iters[key])


def input_scale(x: Tensor, how: str) -> float:
    """Normalisation constant c (inputs are multiplied by c) from a sample ``x [N, d]``."""
    if how == "none":
        return 1.0
    if how == "sqrt_d":
        return x.shape[1] ** 0.5 / float(x.norm(dim=1).mean())
    if how == "unit_msn":
        return 1.0 / float(x.pow(2).sum(1).mean()) ** 0.5
    raise ValueError(f"unknown normalisation {how!r}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
