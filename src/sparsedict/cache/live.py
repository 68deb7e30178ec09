"""``LiveSource``: the ActivationStore iterator straight from the running model, no disk.

Contexts come from the same deterministic plan as the disk cache (:func:`plan_shards`); the plan's
chunks (``shard_rows`` rows each) with ``index % world_size == rank`` are run through the model with
hooks, accumulated into a shuffle buffer of ``shuffle_buffer_rows`` rows, permuted (seeded by
``seed``, epoch and buffer index) and served as ``(x [B, d_in], y [B, d_out] | None)``. An epoch is one
pass over the plan; with ``loop=True`` iteration continues with the next epoch (new permutations).
Resuming (``load_state_dict``) recomputes the epoch up to the saved batch, so it is exact but costs
the forward passes again. :meth:`LiveSource.sample` (initialisation data) runs the first contexts of the
plan, whatever the rank. A :class:`~sparsedict.cache.source.Source`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sparsedict.cache import hooks
from sparsedict.cache.config import CacheConfig
from sparsedict.cache.source import EpochIterator
from sparsedict.cache.tokens import plan_shards
from sparsedict.lm import load_model


class LiveSource(EpochIterator):
    """Batches from model hooks: the :class:`~sparsedict.cache.source.Source` of ``cfg`` without a disk cache.

    ``n_rows`` is ``cfg.max_tokens`` (None: the whole dataset, of unknown length).
    """

    def __init__(self, cfg: CacheConfig | str = "smollm2-135m", hookpoint: str | None = None,
                 target: str | None = None, batch_size: int = 4096, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer_rows: int = 65_536, dtype: torch.dtype = torch.float32,
                 loop: bool = True, model=None, tokenizer=None) -> None:  # fmt: skip
        if isinstance(cfg, str):
            names = [n for n in (hookpoint or "resid_post.14", target) if n]
            cfg = CacheConfig(model=cfg, hookpoints=names, progress=False)
        self.cfg = cfg
        self.hookpoint = hookpoint or cfg.hookpoints[0]
        self.target = target
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
        self.model, self.tok = model, tokenizer
        self._hps = [
            hooks.resolve(model, n) for n in dict.fromkeys([self.hookpoint, *([target] if target else [])])
        ]
        probe = torch.tensor([[tokenizer.bos_token_id or 0, 1, 2]], device=cfg.device)
        dims = {k: int(v.shape[-1]) for k, v in hooks.record(model, self._hps, probe).items()}
        self.d_in = dims[self.hookpoint]
        self.d_out = dims[target] if target else None
        self.x_shape, self.y_shape = (self.d_in,), ((self.d_out,) if target else None)
        self.n_rows = cfg.max_tokens
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer_rows, self.dtype, self.loop = max(shuffle_buffer_rows, batch_size), dtype, loop
        self.epoch, self._batch = 0, 0
        self.meta: dict = {}
        """Provenance recorded in the checkpoints trained on this source (none by default)."""

    def _chunks(self, every_rank: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Activations ``{hookpoint: [rows, d]}`` of the plan's shards (this rank's, or all of them)."""
        for plan in plan_shards(self.cfg, self.tok):
            if not every_rank and plan.index % self.world_size != self.rank:
                continue
            parts: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in self._hps}
            for a in range(0, len(plan.token_ids), self.cfg.batch_size):
                ids = torch.from_numpy(plan.token_ids[a : a + self.cfg.batch_size]).long().to(self.cfg.device)
                attn = torch.from_numpy(plan.attention_mask[a : a + self.cfg.batch_size]).to(self.cfg.device)
                acts = hooks.record(self.model, self._hps, ids, attention_mask=attn.long())
                keep = torch.from_numpy(plan.keep[a : a + self.cfg.batch_size]).to(self.cfg.device)
                for hp in self._hps:
                    parts[hp.name].append(acts[hp.name][keep].to(self.dtype))
            yield {k: torch.cat(v) for k, v in parts.items()}

    def sample(self, n_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x [n, d_in], y [n, d_out] | None)``: ``n_rows`` rows drawn with ``seed`` from the first shards of
        the plan that hold at least ``n_rows`` rows (all of it when it is shorter), the same on every rank."""
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        have = 0
        for chunk in self._chunks(every_rank=True):
            xs.append(chunk[self.hookpoint])
            if self.target:
                ys.append(chunk[self.target])
            have += len(xs[-1])
            if have >= n_rows:
                break
        if not have:
            raise ValueError(f"{self.cfg.dataset!r} gave no rows for {self.hookpoint!r}: nothing to sample")
        rng = np.random.default_rng(seed)
        rows = torch.from_numpy(np.sort(rng.choice(have, size=min(n_rows, have), replace=False)))
        rows = rows[torch.from_numpy(rng.permutation(len(rows)))]
        return torch.cat(xs)[rows], (torch.cat(ys)[rows] if ys else None)

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        epoch, B = self.epoch, self.batch_size
        skip, served = self._batch, 0
        buf_x: list[torch.Tensor] = []
        buf_y: list[torch.Tensor] = []
        rows, k = 0, 0

        def flush():
            nonlocal buf_x, buf_y, rows, k, served
            x = torch.cat(buf_x)
            y = torch.cat(buf_y) if buf_y else None
            perm = torch.from_numpy(
                np.random.default_rng([self.seed, epoch, self.rank, k]).permutation(len(x))
            )
            x, y, k = x[perm], (y[perm] if y is not None else None), k + 1
            n_full = len(x) // B
            for i in range(n_full):
                served += 1
                if served > skip:
                    self._batch = served
                    yield x[i * B : (i + 1) * B], (y[i * B : (i + 1) * B] if y is not None else None)
            rest = x[n_full * B :]
            buf_x = [rest]
            buf_y = [y[n_full * B :]] if y is not None else []
            rows = len(rest)

        for chunk in self._chunks():
            buf_x.append(chunk[self.hookpoint])
            if self.target:
                buf_y.append(chunk[self.target])
            rows += len(chunk[self.hookpoint])
            if rows >= self.shuffle_buffer_rows:
                yield from flush()
        if rows >= B:
            yield from flush()
        self.epoch, self._batch = epoch + 1, 0

    def state_dict(self) -> dict:
        """``{"epoch", "batch", "seed"}``: resuming recomputes the current epoch up to ``batch``."""
        return {"epoch": self.epoch, "batch": self._batch, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])
