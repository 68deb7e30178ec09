"""What the trainer reads activations from: the :class:`Source` protocol, and the window order.

:class:`~sparsedict.cache.ActivationStore` (a disk cache), :class:`~sparsedict.cache.live.LiveSource` (the
running model, no disk) and :class:`~sparsedict.train.TensorSource` (rows in memory) implement it; the
trainer uses nothing else of them.

:class:`WindowOrder` is the one batching loop of the store and the live source: an epoch's rows (one stream per
rank) are cut into windows of ``shuffle_buffer_rows`` rows, each window's rows are permuted by
``np.random.default_rng([seed, epoch, rank, k])`` (``k``: the window's index in the rank's part) and batches are
taken in that order, a batch that straddles two windows taking the end of one and the start of the next. The
sources differ only in where a window's rows come from, so the same rows in the same windows give the same
batches, whichever source serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

WINDOW_ROWS = 262_144
"""Default ``shuffle_buffer_rows`` of the store and the live source: rows permuted together in one window."""


@runtime_checkable
class Source(Protocol):
    """Shuffled batches ``(x [B, d_in], y [B, d_out] | None)`` of one (hookpoint, target) pair, resumable.

    ``y`` is None for an SAE (the target is the input). Iteration goes on epoch after epoch (or ends after one
    with ``loop=False``); ``state_dict``/``load_state_dict`` hold the position, so a resumed run reads exactly
    the batches an uninterrupted one would have read.

    Several hookpoints per batch: a source opened with a list of L input hookpoints (and/or of L' targets)
    serves the same rows of each, stacked along dim 1: ``x [B, L, d_in]``, ``y [B, L', d_out]`` (the data of a
    cross-layer transcoder or of a transcoder set, from one shuffle). ``x_shape``/``y_shape`` say which.
    """

    d_in: int
    """Width of ``x`` (of each stacked hookpoint)."""
    d_out: int | None
    """Width of ``y`` (None: the source has no target)."""
    x_shape: tuple[int, ...]
    """Shape of one row of ``x``: ``(d_in,)``, or ``(L, d_in)`` for L stacked hookpoints."""
    y_shape: tuple[int, ...] | None
    """Shape of one row of ``y``: ``(d_out,)``, ``(L', d_out)`` stacked, None without a target."""
    n_rows: int | None
    """Rows in one epoch, over all ranks (None: unknown, e.g. a live source over a whole dataset)."""
    world_size: int
    """Data-parallel ranks sharing the rows; each rank's source serves its own part of every global batch."""
    meta: dict[str, Any]
    """Provenance recorded in the checkpoints trained on this source."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]: ...

    def sample(self, n_rows: int, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """``(x [n, *x_shape], y [n, *y_shape] | None)``, the same rows for the same seed (initialisation data)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # Optional (the store and TensorSource; not a live source): ``hold_out(n_rows, seed) -> (x, y | None)``
    # takes rows out of every epoch, before the first batch, and returns them (the trainer's calibration rows);
    # ``holds_out`` says whether the automatic ``calibration_rows`` uses it.


class EpochIterator:
    """``__iter__`` of a source made of epochs: ``_epoch_batches()`` serves the rest of the current epoch (from
    the saved position) and advances ``epoch``; with ``loop`` False iteration ends after that epoch."""

    loop: bool

    def _epoch_batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        while True:
            yield from self._epoch_batches()
            if not self.loop:
                return


class Window(NamedTuple):
    """One window of a rank's part of an epoch, as :meth:`WindowOrder._windows` hands it out."""

    rows: int
    """Rows in the window."""
    take: Callable[[Tensor], tuple[Tensor | None, ...]]
    """``take(idx)``: the window's rows ``idx`` as new tensors in the output dtype, one per column (None where
    the source has no such column)."""
    last: bool
    """The last window of the part (a partial final batch, where allowed, is served from it)."""


class WindowOrder(EpochIterator):
    """Batches of an epoch in the window order (module docstring) from the windows ``_windows`` yields.

    Subclasses set ``batch_size``, ``seed``, ``rank``, ``shuffle_buffer_rows``, ``epoch``, ``_batch`` (the
    position: batches served in this epoch) and ``batches_per_epoch`` (None: full batches until the windows run
    out), and implement ``_windows`` and ``_serve``. Resuming at batch ``j`` starts at the window holding row
    ``j * batch_size`` of the rank's part, so only that window is read (or computed) again.
    """

    batch_size: int
    seed: int
    rank: int
    shuffle_buffer_rows: int
    epoch: int
    _batch: int
    batches_per_epoch: int | None

    def _windows(self, epoch: int, first: int) -> Iterator[Window]:
        """Windows ``first, first + 1, ...`` of this rank's part of epoch ``epoch``."""
        raise NotImplementedError

    def _serve(self, cols: tuple[Tensor | None, ...]) -> Any:
        """What one batch is yielded as, from its columns."""
        raise NotImplementedError

    def _too_few(self) -> str:
        """The error message of an epoch that cannot fill one batch."""
        return f"the rows of one epoch cannot fill one batch of {self.batch_size}; use a smaller batch_size"

    def _after_window(self) -> None:
        """Called once a window's rows are all taken (the store returns freed memory here)."""

    def _epoch_batches(self) -> Iterator[Any]:
        limit, B, S = self.batches_per_epoch, self.batch_size, self.shuffle_buffer_rows
        if limit == 0:
            raise ValueError(self._too_few())
        epoch, start = self.epoch, self._batch
        k, skip = divmod(start * B, S)

        def more() -> bool:
            return limit is None or self._batch < limit

        windows = self._windows(epoch, k)
        # rows of earlier windows that did not fill a batch (< B)
        tail: tuple[Tensor | None, ...] | None = None
        try:
            while more():
                w = next(windows, None)
                if w is None:
                    break
                perm = torch.from_numpy(
                    np.random.default_rng([self.seed, epoch, self.rank, k]).permutation(w.rows)
                )
                perm, skip, k, pos = perm[skip:], 0, k + 1, 0
                if tail is not None:
                    pos = min(B - len(tail[0]), len(perm))
                    tail = _cat(tail, w.take(perm[:pos]))
                    if more() and (len(tail[0]) == B or w.last):
                        self._batch += 1
                        yield self._serve(tail)
                        tail = None
                while more() and (len(perm) - pos >= B or (w.last and pos < len(perm))):
                    idx = perm[pos : pos + B]
                    pos += len(idx)
                    cols = w.take(idx)
                    self._batch += 1
                    yield self._serve(cols)
                    cols = None
                if pos < len(perm):
                    rest = w.take(perm[pos:])
                    tail = rest if tail is None else _cat(tail, rest)
                w = perm = None
                self._after_window()
        finally:
            windows.close()
        if start == 0 and self._batch == 0:
            raise ValueError(self._too_few())
        self.epoch, self._batch = epoch + 1, 0


def check_order(state: dict, have: dict, what: str) -> None:
    """Refuse to resume from ``state`` when a key it shares with ``have`` (what fixes the order: config hash,
    rows, ranks, batch size, shuffle, window) differs: the resumed run would read other batches."""
    for key, value in have.items():
        if key in state and state[key] != value:
            raise ValueError(
                f"{what} state has {key}={state[key]!r} but this {what} has {value!r}: the resumed run would read "
                "other batches; resume with the run's original cache section, batch size, ranks and shuffle"
            )


def check_widths(what: str, names: list[str], widths: list[int]) -> None:
    """Refuse a list of hookpoints of different widths: a batch stacks them as ``[B, L, d]``."""
    if len(set(widths)) > 1:
        raise ValueError(
            f"{what}: the listed hookpoints {names} have different widths {widths}; a batch stacks them as "
            "[B, L, d], so list hookpoints of one width (one source per width)"
        )


def _cat(a: tuple[Tensor | None, ...], b: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    return tuple(None if x is None else torch.cat([x, y]) for x, y in zip(a, b))


def head_rows(shard_rows: Iterable[int], n_rows: int) -> int:
    """Rows of the first shards that hold at least ``n_rows`` together (all of them when fewer): what a
    window-order :func:`sample_rows` draws from, so a live source computes only those shards."""
    have = 0
    for rows in shard_rows:
        have += rows
        if have >= n_rows:
            break
    return have


def sample_rows(available: int, n_rows: int, seed: int) -> tuple[np.ndarray, Tensor]:
    """``(rows, order)``: ``min(n_rows, available)`` distinct row indices of ``range(available)`` drawn with
    ``seed``, sorted (to read them in order), and the order to serve them in (``x[rows][order]``)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(available, size=min(n_rows, available), replace=False))
    return rows, torch.from_numpy(rng.permutation(len(rows)))
