"""The one training loop for every architecture, for one or many dictionaries sharing a data pass.

``Trainer(dictionaries, sources, cfg)``: ``dictionaries`` maps a name to a :class:`Dictionary` or a
:class:`~sparsedict.dictionaries.TranscoderSet`; ``sources`` maps a ``(hookpoint, target)`` key to a
:class:`~sparsedict.cache.source.Source` (ActivationStore, LiveSource, TensorSource). Dictionaries on the same
key share each batch read; different keys are read in lockstep. A multi-layer dictionary (a cross-layer
transcoder) reads the ``[B, L, d]`` batches of its key (tuples of hookpoints) whole; the members of a
transcoder set (``<name>/layer<l>``, each with its own optimiser) read slice i of the set's key, so a CLT and a
PLT set over the same layers train on the same rows of one source. Gradient-trained dictionaries go through ``forward -> sum(losses) -> backward ->``
:class:`DictionaryOptimizer`; solver-trained ones (SNMF) through ``fit_step``. The logged FVU and L0 are
those of :class:`~sparsedict.metrics.ReconstructionStats` over the step's global batch (sums merged across
ranks); ``dead`` is the fraction of latents that have not fired for ``dead_tokens`` training tokens.
Checkpoints hold everything needed to resume exactly (weights, optimiser state, dead-latent counters, RNG,
the data position of every source).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedict import distributed
from sparsedict.cache.source import Source
from sparsedict.dictionaries.base import Dictionary, Output
from sparsedict.dictionaries.sharded import shard
from sparsedict.dictionaries.transcoder_set import TranscoderSet
from sparsedict.metrics import ReconstructionStats
from sparsedict.train import checkpoint as ckpt
from sparsedict.train.config import TrainConfig
from sparsedict.train.dead import DeadLatentTracker
from sparsedict.train.logging import RunLogger
from sparsedict.train.optim import DictionaryOptimizer

SourceKey = tuple[Any, Any]
AUTO_CALIBRATION_ROWS = 8192
"""``calibration_rows = -1``: rows held out for the end-of-run calibrations of a run that repeats its rows."""


def source_key(model: Dictionary) -> SourceKey:
    """The ``(hookpoint, target)`` a dictionary reads (target ``""`` for an SAE; tuples for several layers)."""
    return model.cfg.source_key


@dataclass
class Member:
    """One dictionary being trained, with its optimiser and dead-latent counters."""

    name: str
    model: Dictionary
    key: SourceKey
    opt: DictionaryOptimizer | None
    dead: DeadLatentTracker
    normalisation: str
    """The input normalisation this member trains with ('none', 'sqrt_d' or 'unit_msn')."""
    slot: int | None = None
    """Position of this member's layer in its source's stacked batches (members of a transcoder set)."""


class Trainer:
    def __init__(self, dictionaries: dict[str, Dictionary], sources: dict[SourceKey, Source], cfg: TrainConfig,
                 logger: RunLogger | None = None):  # fmt: skip
        self.cfg = cfg
        self.sources = sources
        self.device = torch.device(cfg.device)
        for name, model in dictionaries.items():
            if source_key(model) not in sources:
                raise KeyError(
                    f"dictionary {name!r} needs data for {source_key(model)}; sources: {list(sources)}"
                )
        self.world_size = next(iter(sources.values())).world_size
        self.total_steps = cfg.max_steps or self._steps_from_epochs()
        self.sets = {name: model for name, model in dictionaries.items() if isinstance(model, TranscoderSet)}
        """The transcoder sets among the dictionaries (their members train as ``<name>/layer<l>``)."""
        flat = {}  # name -> (model, key, slot)
        for name, model in dictionaries.items():
            if isinstance(model, TranscoderSet):
                for i, (layer, member) in enumerate(model.items()):
                    flat[f"{name}/layer{layer}"] = (member, model.source_key, i)
            else:
                flat[name] = (model, source_key(model), None)
        if cfg.shard_latents:
            sharded = shard_dictionaries({n: v[0] for n, v in flat.items()}, cfg, self.world_size)
            flat = {n: (sharded[n], key, slot) for n, (_, key, slot) in flat.items()}
        self.members = [
            Member(name, model.to(self.device), key,
                   DictionaryOptimizer(model, cfg, self.total_steps) if model.trains_by_gradient else None,
                   DeadLatentTracker(model.n_latents, cfg.dead_tokens, self.device, sync=not model.latent_sharded),
                   type(model).input_normalisation if cfg.normalise_inputs == "auto" else cfg.normalise_inputs,
                   slot)
            for name, (model, key, slot) in flat.items()
        ]  # fmt: skip
        self.step = 0
        self.tokens = 0
        self.logger = logger or RunLogger(cfg)
        self.batch_stats: dict[str, ReconstructionStats] = {}
        """This rank's reconstruction statistics of the last logged step, by member name."""
        self._stop = False
        self.held = self._hold_out()
        """Rows held out of training for the end-of-run calibrations (``calibration_rows``), by source."""

    def _steps_from_epochs(self) -> int:
        rows = [s.n_rows for s in self.sources.values()]
        if None in rows:
            raise ValueError(
                "a source has no known length (a LiveSource with max_tokens=None): set train.max_steps"
            )
        return max(1, math.floor(self.cfg.epochs * min(rows) / self.cfg.batch_size))

    def _repeats_rows(self, src: Source) -> bool:
        """Whether this run reads more rows from ``src`` than one pass holds."""
        return (
            src.n_rows is not None and self.total_steps * self.cfg.batch_size * self.world_size > src.n_rows
        )

    @staticmethod
    def _calibrates(m) -> bool:
        """Whether member ``m`` takes the end-of-run calibration on held-out rows (latent-sharded ones do not)."""
        return m.model.calibrates and not m.model.latent_sharded

    def _hold_out(self) -> dict[SourceKey, tuple[Tensor, Tensor | None]]:
        """Take the calibration rows out of the sources of the members that calibrate (``calibration_rows``)."""
        held, want = {}, self.cfg.calibration_rows
        for key in dict.fromkeys(m.key for m in self.members if self._calibrates(m)):
            src = self.sources[key]
            n = want
            if want == -1:
                can = getattr(src, "holds_out", False) and self._repeats_rows(src)
                n = min(AUTO_CALIBRATION_ROWS, src.n_rows // 10) if can else 0
            elif want > 0 and not hasattr(src, "hold_out"):
                raise ValueError(
                    f"train.calibration_rows={want}: the source of {key_name(key)} (live) cannot hold rows out; "
                    "set it to -1 or 0, or train from a cache"
                )
            if n > 0:
                held[key] = src.hold_out(n, seed=self.cfg.seed)
        return held

    @torch.no_grad()
    def calibrate(self) -> None:
        """The end-of-run calibrations of the members that calibrate, on their source's held-out rows."""
        for m in self.members:
            if m.key not in self.held or not self._calibrates(m):
                continue
            x, _ = _slot(self.held[m.key], m.slot)
            x = x.to(self.device, torch.float32) * float(m.model.input_scale)
            m.model.calibrate(list(x.split(self.cfg.batch_size)))

    def is_log_step(self, step: int) -> bool:
        """Whether the step that ends with ``self.step == step`` is logged (every ``log_every``, and the last)."""
        return step % self.cfg.log_every == 0 or step >= self.total_steps

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self) -> None:
        """Normalisation constants and b_dec from a data sample (before the first step)."""
        samples: dict[SourceKey, tuple[Tensor, Tensor | None]] = {}
        for m in self.members:
            if m.key not in samples:  # one sample per source (members of a set share it)
                samples[m.key] = self.sources[m.key].sample(self.cfg.init_rows, seed=self.cfg.seed)
            x, y = _slot(samples[m.key], m.slot)
            x = x.to(self.device, torch.float32)
            y = x if y is None else y.to(self.device, torch.float32)
            m.model.input_scale.fill_(input_scale(x.reshape(-1, x.shape[-1]), m.normalisation))
            c = float(m.model.input_scale)
            m.model.init_from_data(x * c, y * c)
            distributed.broadcast_model(m.model)  # replicas start identical (rank 0's values)
            if m.opt is not None:
                m.opt.apply_lr_factors()  # LR factors the init set (rank 0's)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, batches: dict[SourceKey, tuple[Tensor, Tensor | None]]) -> dict[str, float]:
        """One optimiser (or solver) step for every dictionary on its batch; returns scalar metrics by name.

        Loss terms and LR every step; this rank's batch FVU, L0 and the dead fraction on the steps :meth:`fit`
        logs (their statistics are kept in ``batch_stats`` for the cross-rank merge).
        """
        metrics: dict[str, float] = {}
        amp = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.cfg.autocast == "bf16"
            else nullcontext()
        )
        log_step = self.is_log_step(self.step + 1)
        for m in self.members:
            x, y = _slot(batches[m.key], m.slot)
            c = float(m.model.input_scale)
            x = x.to(self.device, torch.float32, non_blocking=True)
            y = None if y is None else y.to(self.device, torch.float32, non_blocking=True)
            if c != 1.0:
                x, y = x * c, (None if y is None else y * c)
            m.model.on_step(self.step, self.total_steps)
            out, extra = (m.model.fit_step(x, y), {}) if m.opt is None else self._gradient_step(m, x, y, amp)
            m.dead.update(out.code, x.shape[0])
            metrics.update(
                {f"{m.name}/{k}": float(v.detach()) for k, v in {**out.losses, **out.logs}.items()}
            )
            metrics.update({f"{m.name}/{k}": v for k, v in extra.items()})
            if log_step:  # a few [B, d] passes: only on the steps fit() logs
                stats = m.model.new_stats()
                stats.update(x if y is None else y, out.x_hat.detach(), out.code)
                self.batch_stats[m.name] = stats
                metrics.update({f"{m.name}/{k}": v for k, v in stats.logged().items()})
                metrics[f"{m.name}/dead"] = m.dead.dead_fraction()
        self.step += 1
        self.tokens += self.cfg.batch_size
        return metrics

    def _gradient_step(self, m: Member, x: Tensor, y: Tensor | None, amp) -> tuple[Output, dict[str, float]]:
        """forward -> sum(losses) -> backward -> gradients averaged over ranks -> optimiser; ``(out, loss/lr)``."""
        lr = m.opt.set_step(self.step)
        m.model.set_dead_mask(m.dead.dead_mask())
        m.model.train()
        with amp:
            out = m.model(x, y)
        loss = sum(out.losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{m.name}: loss is {float(loss.detach())} at step {self.step}; check the activations for NaN/inf "
                f"or lower the learning rate (lr={lr:g})"
            )
        loss.backward()
        distributed.all_reduce_grads(m.model)
        grad_norm = m.opt.step()
        m.model.after_step(out)
        extra = {"loss": float(loss.detach()), "lr": lr}
        if grad_norm:
            extra["grad_norm"] = grad_norm
        return out, extra

    def merged_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` of a logged step over all ranks: losses averaged, FVU and L0 from the summed statistics."""
        out = distributed.mean_metrics(metrics, self.device)
        if distributed.is_dist():
            for name, stats in self.batch_stats.items():
                merged = stats.from_packed(distributed.all_reduce_sum(stats.packed().to(self.device)).cpu())
                out.update({f"{name}/{k}": v for k, v in merged.logged().items()})
        return out

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict[str, float]:
        out_dir = Path(self.cfg.out_dir)
        state = ckpt.load_checkpoint(out_dir / "checkpoint") if resume else None
        if state is not None:
            self.load_state_dict(state)
            self.logger.note(
                f"resuming from step {self.step} of {self.total_steps} ({out_dir / 'checkpoint'})"
            )
        else:
            self.initialise()
        for m in self.members:
            if m.opt is not None:
                self.logger.note(f"{m.name}: {m.opt.describe()}")
        for (hookpoint, target), (x, _) in self.held.items():
            self.logger.note(f"{hookpoint}{f' -> {target}' if target else ''}: {len(x):,} training rows held out of "
                             "every epoch; the end-of-run calibration (θ / final L0) is set on them")  # fmt: skip
        for m in self.members:
            if m.model.calibrates and m.key not in self.held and self._repeats_rows(self.sources[m.key]):
                self.logger.note(f"{m.name}: the run repeats its rows and none are held out (calibration_rows), "
                                 "so its calibration uses rows already trained on: held-out L0 may exceed "
                                 "the target")  # fmt: skip
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
                    if self.is_log_step(self.step):
                        last = self.merged_metrics(last)
                        self.logger.log(self.step, self.tokens, {**last, "tokens_per_s": tps})
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save_checkpoint()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self._stop:
            self.save_checkpoint()
            raise SystemExit(f"stopped by SIGTERM at step {self.step}; checkpoint saved, rerun to resume")
        self.calibrate()
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
            "sources": {key_name(k): s.state_dict() for k, s in self.sources.items()},
            "members": {
                m.name: {
                    "model": m.model.state_dict(),
                    "opt": m.opt.state_dict() if m.opt is not None else {},
                    "dead": m.dead.state_dict(),
                    "train_state": m.model.train_state(),
                }
                for m in self.members
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        ckpt.set_rng_state(state["rng"])
        for k, s in self.sources.items():
            s.load_state_dict(state["sources"][key_name(k)])
        for m in self.members:
            ms = state["members"][m.name]
            m.model.load_state_dict(ms["model"])
            if m.opt is not None:
                m.opt.load_state_dict(ms["opt"])
            m.dead.load_state_dict(ms["dead"])
            m.model.load_train_state(ms.get("train_state") or {})

    def save_checkpoint(self) -> None:
        """Collective: each rank writes its RNG + data positions; dictionaries from rank 0 (or every shard)."""
        state = self.state_dict()
        if not (distributed.is_main() or self.cfg.shard_latents):
            del state["members"]  # data-parallel replicas equal rank 0's
        ckpt.save_checkpoint(Path(self.cfg.out_dir) / "checkpoint", state, self.step)

    def save(self, meta: dict[str, Any] | None = None) -> dict[str, Path]:
        """Save every dictionary with ``save_pretrained`` under ``out_dir/<name>`` (a transcoder set as one
        directory, its members' provenance inside)."""
        paths, members = {}, {}
        for m in self.members:
            model = m.model.unshard() if m.model.latent_sharded else m.model  # collective
            if m.slot is None:
                paths[m.name] = Path(self.cfg.out_dir) / m.name
            if not distributed.is_main():
                continue
            info = {**self.sources[m.key].meta, **(meta or {})}
            info.update(training_tokens=self.tokens, training_steps=self.step, normalisation=m.normalisation,
                        dead_tokens=self.cfg.dead_tokens)  # fmt: skip
            if model.train_state():  # e.g. the coefficient a controller steered to, as the run ended
                info["train_state"] = model.train_state()
            if m.slot is None:
                model.save_pretrained(paths[m.name], info)
            else:
                model.meta = info
                members[m.name] = model
        for name, tset in self.sets.items():
            paths[name] = Path(self.cfg.out_dir) / name
            if distributed.is_main():
                key = tset.source_key
                parts = {layer: members[f"{name}/layer{layer}"] for layer in tset.layers}
                whole = TranscoderSet(tset.cfg, parts)
                info = {**self.sources[key].meta, **(meta or {}), "training_tokens": self.tokens,
                        "training_steps": self.step, "dead_tokens": self.cfg.dead_tokens}  # fmt: skip
                whole.save_pretrained(paths[name], info)
        return paths


def shard_dictionaries(
    dictionaries: dict[str, Dictionary], cfg: TrainConfig, world: int
) -> dict[str, Dictionary]:
    """Replace every dictionary by this rank's latent slice (``TrainConfig.shard_latents``).

    Each rank keeps only its own slice of the freshly built dictionary; the slices need not agree on
    anything (their initialisations are independent), while ``b_dec`` and ``input_scale`` are set from
    data and broadcast from rank 0 in :meth:`Trainer.initialise`.
    """
    if world > 1:
        raise ValueError(
            "shard_latents: every rank must read the same rows; open the sources with rank=0, world_size=1 and "
            "the global batch_size"
        )
    if cfg.grad_clip > 0:
        raise ValueError(
            "grad_clip with shard_latents would clip each shard by its own norm; set grad_clip: 0"
        )
    rank, ranks = distributed.rank(), distributed.world_size()
    return {name: shard(model, rank, ranks) for name, model in dictionaries.items()}


def key_name(key: SourceKey) -> str:
    """``"hookpoint|target"`` of a source key (tuples of hookpoints joined by commas)."""
    return "|".join(",".join(k) if isinstance(k, tuple) else k for k in key)


def _slot(batch: tuple[Tensor, Tensor | None], slot: int | None) -> tuple[Tensor, Tensor | None]:
    """A set member's layer of a stacked ``[B, L, d]`` batch (the whole batch for ``slot`` None)."""
    if slot is None:
        return batch
    x, y = batch
    return x[:, slot], (None if y is None else y[:, slot])


def _next_batch(iters: dict, key: SourceKey, source: Source) -> tuple[Tensor, Tensor | None]:
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
    return threading.current_thread() is threading.main_thread()
