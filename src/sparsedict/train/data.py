"""In-memory data source (tests, planted dictionaries, small data): a :class:`~sparsedict.cache.source.Source`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sparsedict.cache.store import HOLDOUT_STREAM


class TensorSource:
    """Shuffled minibatches of in-memory rows ``x [N, d_in]`` (and targets ``y [N, d_out]``), or of stacked
    hookpoints ``x [N, L, d_in]`` (``y [N, L', d_out]``).

    A :class:`~sparsedict.cache.source.Source` like :class:`sparsedict.cache.ActivationStore`: iterate for
    ``(x, y)`` batches (``y`` is None for an SAE), ``d_in``/``d_out``/``n_rows``, ``sample``, ``state_dict`` for
    exact resume. Each epoch is a fresh permutation drawn from ``seed + epoch`` (the same on every rank).
    ``batch_size`` is the per-rank batch ``b``; one step consumes the global batch of ``b · world_size``
    consecutive rows of the permutation and rank ``r`` takes rows ``[r·b, (r+1)·b)`` of it, so the union
    of the ranks' batches at every step is exactly the batch one process with ``batch_size = b · world``
    would read (data-parallel training is then equivalent to single-process training).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x, self.y = x, y
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self.meta: dict = {}

    @property
    def d_in(self) -> int:
        return self.x.shape[-1]

    @property
    def d_out(self) -> int | None:
        return None if self.y is None else self.y.shape[-1]

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def y_shape(self) -> tuple[int, ...] | None:
        return None if self.y is None else tuple(self.y.shape[1:])

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    def _order(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_rows, generator=g)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        step = self.batch_size * self.world_size
        while True:
            order = self._order()
            while self.position + step <= order.numel():
                start = self.position + self.rank * self.batch_size
                idx = order[start : start + self.batch_size]
                self.position += step
                yield self.x[idx], (self.y[idx] if self.y is not None else None)
            self.epoch, self.position = self.epoch + 1, 0

    def sample(self, n_rows: int, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.n_rows, generator=g)[:n_rows]
        return self.x[idx], (self.y[idx] if self.y is not None else None)

    holds_out = True
    """The trainer's automatic ``calibration_rows`` may hold rows out of this source."""

    def hold_out(self, n_rows: int, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """Take ``n_rows`` rows drawn with ``seed`` out of every epoch and return them (as
        :meth:`sparsedict.cache.ActivationStore.hold_out`; before the first batch)."""
        if not 0 < n_rows < self.n_rows:
            raise ValueError(f"hold_out: n_rows must be in (0, {self.n_rows}), not {n_rows}")
        if self.epoch or self.position:
            raise RuntimeError("hold_out() must come before the first batch of the source")
        held = torch.zeros(self.n_rows, dtype=torch.bool)
        pick = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(self.n_rows)[:n_rows]
        held[torch.from_numpy(pick)] = True
        out = self.x[held], (self.y[held] if self.y is not None else None)
        self.x, self.y = self.x[~held], (self.y[~held] if self.y is not None else None)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
