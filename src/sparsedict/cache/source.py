"""What the trainer reads activations from: the :class:`Source` protocol.

:class:`~sparsedict.cache.ActivationStore` (a disk cache), :class:`~sparsedict.cache.live.LiveSource` (the
running model, no disk) and :class:`~sparsedict.train.TensorSource` (rows in memory) implement it; the
trainer uses nothing else of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


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
