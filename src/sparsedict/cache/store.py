"""``ActivationStore``: shuffled, rank-sharded, bounded-RAM, exactly resumable batches from a cache.

Shuffling, per epoch ``e`` (all randomness from ``seed`` and ``e``, so runs are reproducible):

1. ``shuffle="global"`` (default): every shard is cut into blocks of ``block_rows`` consecutive rows; the
   blocks of all shards are permuted together (one global order per epoch). ``shuffle="window"``: the
   rows stay in cache order (shard by shard), the order a :class:`~sparsedict.cache.live.LiveSource`
   computes them in.
2. The concatenated row stream is split into ``world_size`` equal contiguous parts (``N // world_size``
   rows each; the ``N mod world_size`` rows left over change every epoch under "global"): no row is served
   twice across ranks within an epoch, and every rank gets the same number of batches.
3. A rank reads its part in windows of ``shuffle_buffer_rows`` rows (under "global", many blocks from all
   over the cache) into one reusable buffer, permutes each window's rows and gathers batches from it in
   that order (:class:`~sparsedict.cache.source.WindowOrder`, shared with the live source). RAM is bounded
   by the window size, which ``max_ram_bytes`` sets; by default the bound is a share of the host's available
   memory (:func:`auto_ram_bytes`) and the window at most ``DEFAULT_WINDOW_ROWS``.

Under "window" the store serves exactly the batches (and :meth:`ActivationStore.sample` the rows) that a
``LiveSource`` of the cache's config serves with the same seed, batch size, ranks and window.

Rows are read with positioned reads (``os.preadv``) of contiguous block ranges straight into the
window buffer rather than through long-lived memory maps, whose resident file pages would count
against the process's RSS and grow with the cache size. ``state_dict()`` holds (epoch, batch, seed):
resuming replays nothing but the window that holds the next batch.

Every read path (iteration, ``sample``, ``rows``, ``tokens``, ``norm_stats``) checks each shard's digest the
first time the process touches that shard, before any of its rows are served (``verify=False`` skips it; the
rule and its cost are in :mod:`sparsedict.cache.digest`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from sparsedict.cache import digest
from sparsedict.cache.columns import SCRATCH_BYTES, Column, trim
from sparsedict.cache.hooks import split_head
from sparsedict.cache.manifest import TOKENS, CacheError, read_manifest
from sparsedict.cache.source import (
    WINDOW_ROWS,
    Window,
    WindowOrder,
    check_order,
    check_widths,
    head_rows,
    sample_rows,
)
from sparsedict.cache.tokens import Exclusions
from sparsedict.cache.writer import expected_tensors, load_shard
from sparsedict.util import write_json_atomic

RAM_SLACK = 1.1
"""Factor on the window's read buffer (page rounding, small temporaries)."""
RAM_BATCHES = 8
"""Batch-sized blocks (in the output dtype) allowed for: the batch the caller holds, the one being built, the
tail, and freed blocks the allocator has not yet handed back (glibc keeps several; measured)."""
RAM_FIXED = 20 << 20
"""Bytes for the store's fixed costs (first use of torch ops in the process, epoch plan, file handles)."""
DEFAULT_WINDOW_ROWS = WINDOW_ROWS
"""Rows of the default shuffle window when the RAM bound allows (1024 blocks of 256 rows from all over the
cache: a batch of 4096 takes about 4 rows from each block it touches)."""
MIN_WINDOW_BATCHES = 16
"""Floor on the shuffle quality of a default window: it holds at least this many batches (or the whole part of
the cache a rank reads), so a batch takes on average at most ``block_rows / 16`` rows (16 at 256) from any one
block of consecutive tokens. A RAM bound that cannot hold it is an error naming the fix, never a worse shuffle."""
AUTO_RAM_FRACTION = 0.5
"""Share of the host's available memory that the default bounds of all shuffle windows together may take."""
HOLDOUT_STREAM = 7_919
"""Second seed word of the generator that picks :meth:`ActivationStore.hold_out`'s blocks (apart from the epochs')."""


def local_ranks() -> int:
    """Processes of this job on this host (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def auto_ram_bytes(sources: int = 1) -> tuple[int, str]:
    """Default RAM bound of one store's window and how it was derived: ``AUTO_RAM_FRACTION`` of the host's
    available memory (``psutil.virtual_memory().available``), divided among the local ranks and ``sources``
    (the stores each rank opens)."""
    import psutil

    available, ranks = psutil.virtual_memory().available, local_ranks()
    bound = int(AUTO_RAM_FRACTION * available / (ranks * max(1, sources)))
    how = (f"{AUTO_RAM_FRACTION:.0%} of {available / 2**30:.1f} GiB available / {ranks} local rank(s)"
           + (f" / {sources} sources" if sources > 1 else ""))  # fmt: skip
    return bound, how


def provenance(manifest: dict, names: dict[str, tuple[str, int | None]]) -> dict:
    """What a dictionary trained on this cache records about its data (``meta`` of the checkpoint): the model
    (id, revision, dtype), the module path of each hookpoint it reads (``names``: the name the dictionary uses ->
    (cached hookpoint, head)), the dataset and split, the context length and the exclusion rules (with the token ids they use)."""
    paths = {}
    for name, (cached, head) in names.items():
        path = manifest["hookpoints"][cached]["path"]
        paths[name] = path if head is None else f"{path}.h{head}"
    model = manifest.get("model", {})
    return {
        "model": model.get("id"),
        "model_revision": model.get("revision"),
        "model_dtype": model.get("dtype"),
        "hookpoint_paths": paths,
        "dataset": manifest.get("dataset"),
        "context_length": manifest.get("context_length"),
        "exclusions": Exclusions.from_manifest(manifest).record(),
        "cache_config_hash": manifest.get("config_hash"),
    }


class ActivationStore(WindowOrder):
    """Batches ``(x [B, d_in], y [B, d_out] | None)`` from an activation cache directory.

    ``hookpoint``/``target`` accept the name given at caching time or its resolved module path.
    Several hookpoints in one batch: a list for ``hookpoint`` (and/or ``target``) serves the same rows of every
    listed hookpoint stacked along dim 1, ``x [B, L, d_in]`` (``y [B, L', d_out]``), from one shuffle and one
    read window (a cross-layer transcoder's inputs and targets, or a transcoder set's); the listed hookpoints
    share one width. ``x_shape``/``y_shape`` give a row's shape either way (``(d_in,)`` or ``(L, d_in)``).
    Attention z (``attn_z.L``, cached merged as ``[rows, n_heads·d_head]``, the input of the output
    projection; SAELens' ``hook_z`` with ``reshape_activations: hook_z``) is also served one head at a time:
    ``"attn_z.6.h3"`` yields head 3's slice ``[B, d_head]`` (SAELens' ``hook_head_index=3``); the
    manifest's ``n_heads``/``d_head`` (also ``self.n_heads``/``self.d_head``) give the layout, so the merged
    batch reshapes with ``x.view(B, n_heads, d_head)``. A head store reads whole rows and keeps the slice.
    ``loop=True`` (default) iterates forever, epoch after epoch (``epoch`` counts them); ``loop=False``
    serves the rest of the current epoch. Batches are raw activations: input normalisation is the trainer's
    (``TrainConfig.normalise_inputs``). A :class:`~sparsedict.cache.source.Source`.

    RAM: the window is one read buffer ``[shuffle_buffer_rows, d]`` in the storage dtype; every batch is
    gathered from it in shuffled order into a new tensor (the caller may keep batches without pinning the
    window). ``max_ram_bytes`` sets ``shuffle_buffer_rows`` to the largest window with
    ``RAM_SLACK · buffer + RAM_BATCHES batch-sized blocks + RAM_FIXED <= max_ram_bytes`` (a bound too small
    for a window of one batch is an error). Peak RSS above the process before the store stays under the
    bound for float32 and bfloat16 caches larger than it (measured in tests/test_cache_ram.py). With neither
    given, the bound is :func:`auto_ram_bytes` and the window the largest under it up to
    ``DEFAULT_WINDOW_ROWS``, never below ``MIN_WINDOW_BATCHES`` batches (``ram_sources``: the stores a rank
    opens together, which share that bound); :meth:`window_summary` says which.

    ``shuffle``: "global" (blocks of the whole cache, then windows) or "window" (cache order, then windows: the
    order of a live source, so training on the store equals training live; see the module docstring).

    ``verify=True`` (default): a shard is hashed in full (read through one ``digest.WINDOW``-byte buffer, counted
    in the bound) and checked against the manifest the first time this process reads any of it; a mismatch,
    truncation or missing file raises :class:`~sparsedict.cache.digest.ShardError` naming the shard and the fix.
    """

    def __init__(self, path: str | Path, hookpoint: str | Sequence[str], target: str | Sequence[str] | None = None,
                 batch_size: int = 4096, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer_rows: int | None = None, max_ram_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32,
                 block_rows: int = 256, drop_last: bool = True, loop: bool = True, verify: bool = True,
                 device: str | torch.device = "cpu", shuffle: str = "global", ram_sources: int = 1) -> None:  # fmt: skip
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        if self.manifest["status"] != "complete":
            raise CacheError(
                f"{self.root} is an incomplete cache ({len(self.manifest['shards'])} shards done); run the same "
                "`sparsedict cache` command again to finish it"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if shuffle not in ("global", "window"):
            raise ValueError(f"shuffle must be 'global' or 'window', not {shuffle!r}")
        self.shuffle = shuffle
        self.hookpoint, self._xs = self._columns(hookpoint, verify, "hookpoint")
        self._x = self._xs[0]
        info = self.manifest["hookpoints"][self._x.name]
        self.head, self.n_heads, self.d_head = self._x.head, info.get("n_heads"), info.get("d_head")
        self.target, self._ys = None, []
        if target is not None:
            self.target, self._ys = self._columns(target, verify, "target")
        self._cols = [*self._xs, *self._ys]
        self.d_in = self._x.d
        self.d_out = self._ys[0].d if self._ys else None
        self.x_shape = (self.d_in,) if isinstance(self.hookpoint, str) else (len(self._xs), self.d_in)
        self.y_shape = None
        if self.target is not None:
            self.y_shape = (self.d_out,) if isinstance(self.target, str) else (len(self._ys), self.d_out)
        self.n_rows = int(sum(self._x.rows))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.block_rows, self.drop_last, self.loop = block_rows, drop_last, loop
        self.dtype, self.device = dtype, torch.device(device)
        self.held_rows = 0
        """Rows :meth:`hold_out` took out of every epoch (0: none)."""
        self._held: np.ndarray | None = None  # per block of the cache (cache order): held out of the epochs
        self.rows_per_rank = self.n_rows // world_size
        if max_ram_bytes is not None:
            shuffle_buffer_rows = self._window_rows(max_ram_bytes)
            self._window_how = f"the largest under max_ram_bytes={max_ram_bytes / 2**30:.2f} GiB"
        elif shuffle_buffer_rows is not None:
            self._window_how = "set by shuffle_buffer_rows"
        elif shuffle == "window":  # the live source's default window, so both serve the same batches
            shuffle_buffer_rows, self._window_how = WINDOW_ROWS, "the live source's default"
        else:
            shuffle_buffer_rows = self._auto_window(ram_sources)
        self.shuffle_buffer_rows = max(1, int(shuffle_buffer_rows))
        self._plan_epochs()
        self.epoch, self._batch = 0, 0
        listed = [h for names in (hookpoint, target) if names is not None
                  for h in ([names] if isinstance(names, str) else names)]  # fmt: skip
        names = {h: (c.name, c.head) for h, c in zip(listed, self._cols)}
        self.meta: dict = provenance(self.manifest, names)
        """Provenance recorded in the checkpoints trained on this store (:func:`provenance`)."""

    def _plan_epochs(self) -> None:
        """``rows_per_rank`` and ``batches_per_epoch`` from the rows an epoch serves (all but the held-out)."""
        self.rows_per_rank = (self.n_rows - self.held_rows) // self.world_size
        per, b = self.rows_per_rank, self.batch_size
        self.batches_per_epoch = per // b if self.drop_last else math.ceil(per / b)

    def _columns(
        self, names: str | Sequence[str], verify: bool, what: str
    ) -> tuple[str | list[str], list[Column]]:
        """``(resolved name(s), columns)`` of one hookpoint name or a list of them (one width for a list)."""
        listed = [names] if isinstance(names, str) else list(names)
        if not listed:
            raise ValueError(f"{what}: an empty list of hookpoints; name at least one")
        cols, resolved = [], []
        for name in listed:
            base, head = self._resolve(name)
            cols.append(Column(self.root, self.manifest, base, verify, head))
            resolved.append(base if head is None else f"{base}.h{head}")
        check_widths(what, resolved, [c.d for c in cols])
        return (resolved[0] if isinstance(names, str) else resolved), cols

    def _auto_window(self, sources: int) -> int:
        """The default window: the largest under :func:`auto_ram_bytes`, at most ``DEFAULT_WINDOW_ROWS`` rows."""
        bound, how = auto_ram_bytes(sources)
        floor = min(MIN_WINDOW_BATCHES * self.batch_size, self.rows_per_rank)
        rows = min(DEFAULT_WINDOW_ROWS, self._fit_rows(bound)[0])
        if rows < floor:
            raise ValueError(
                f"the default shuffle window of {self.root} would hold {max(rows, 0)} rows under its RAM bound of "
                f"{bound / 2**30:.2f} GiB ({how}), below the floor of {MIN_WINDOW_BATCHES} batches of "
                f"{self.batch_size}: free host memory, lower the batch size, or set the bound explicitly "
                "(train.shuffle_ram_gib, or ActivationStore(max_ram_bytes=...))"
            )
        cap = "the default cap" if rows == DEFAULT_WINDOW_ROWS else "the largest under the bound"
        self._window_how = f"{cap}; RAM bound {bound / 2**30:.2f} GiB = {how}"
        return rows

    def window_summary(self) -> str:
        """One line: the shuffle window's rows and bytes, and how they were chosen."""
        rows = min(self.shuffle_buffer_rows, self.rows_per_rank)
        nbytes = rows * sum(c.d * c.np_dtype.itemsize for c in self._cols)
        return (f"{self.hookpoint}{f' -> {self.target}' if self.target else ''}: shuffle window {rows:,} rows "
                f"({nbytes / 2**30:.2f} GiB; {self._window_how})")  # fmt: skip

    def _fit_rows(self, max_ram_bytes: int) -> tuple[int, int, float]:
        """``(rows, fixed bytes, bytes per row)``: the largest window under ``max_ram_bytes``."""
        out = torch.empty((), dtype=self.dtype).element_size()
        cols = self._cols
        per_row = RAM_SLACK * sum(c.d * c.np_dtype.itemsize for c in cols)  # the window's read buffer
        # batch-sized blocks: held by the caller, being gathered (storage dtype) and converted, the tail and its
        # extension, plus those the allocator keeps after they are freed (measured: <= RAM_BATCHES in all)
        batch = self.batch_size * sum(c.d * (RAM_BATCHES * out + 2 * c.np_dtype.itemsize) for c in cols)
        fixed = RAM_FIXED + batch + SCRATCH_BYTES * sum(c.head is not None for c in cols)
        fixed += digest.WINDOW if self._x.verify else 0
        return int((max_ram_bytes - fixed) // per_row), fixed, per_row

    def _window_rows(self, max_ram_bytes: int) -> int:
        """Largest window with ``RAM_SLACK · buffer + batch allowance + RAM_FIXED <= max_ram_bytes``."""
        rows, fixed, per_row = self._fit_rows(max_ram_bytes)
        if rows < self.batch_size:
            need = int(fixed + self.batch_size * per_row)
            d = sum(c.d for c in self._cols)
            raise ValueError(
                f"max_ram_bytes={max_ram_bytes} is too small for batch_size={self.batch_size} "
                f"(d={d}): a window of one batch needs about {need} bytes; raise "
                "max_ram_bytes or lower batch_size"
            )
        return rows

    def _name(self, name: str, missing_ok: bool = False) -> str | None:
        """Cached hookpoint called ``name`` (alias or resolved path)."""
        hps = self.manifest["hookpoints"]
        if name in hps:
            return name
        for alias, info in hps.items():
            if name in (info["path"], info["module_path"] + ":" + info["side"]):
                return alias
        if missing_ok:
            return None
        raise KeyError(f"hookpoint {name!r} is not in the cache {self.root}; it holds "
                       f"{', '.join(a + ' (' + i['path'] + ')' for a, i in hps.items())}")  # fmt: skip

    def _resolve(self, name: str) -> tuple[str, int | None]:
        """``(cached hookpoint, head)``: a cached name, or an attention z name with a ``.h<k>`` head suffix."""
        found = self._name(name, missing_ok=True)
        if found is not None:
            return found, None
        base, head = split_head(name)
        found = self._name(base, missing_ok=True) if head is not None else None
        if found is None:
            self._name(name)  # raises the "not in the cache" error
        info = self.manifest["hookpoints"][found]
        if "n_heads" not in info:
            raise KeyError(
                f"hookpoint {name!r}: {found!r} in {self.root} has no per-head layout ('.h<k>' selects a head of "
                "an attention z hookpoint, attn_z.L, cached by this version); cache the head directly "
                f"(hookpoints=[{name!r}]) or re-create the cache"
            )
        if not 0 <= head < info["n_heads"]:
            raise KeyError(f"hookpoint {name!r}: head {head} out of range, {found} has {info['n_heads']} heads "
                           f"(0..{info['n_heads'] - 1})")  # fmt: skip
        return found, head

    # ----------------------------------------------------------------- epoch plan
    def _cache_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every block ``(shard, start, stop)`` of the cache, in cache order."""
        shard, start = [], []
        for s, rows in enumerate(self._x.rows):
            starts = np.arange(0, rows, self.block_rows)
            shard.append(np.full(len(starts), s))
            start.append(starts)
        shard_a, start_a = np.concatenate(shard), np.concatenate(start)
        return shard_a, start_a, np.minimum(start_a + self.block_rows, np.asarray(self._x.rows)[shard_a])

    def _blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Permuted blocks ``(shard, start, stop)`` of an epoch (the held-out ones left out) and the cumulative
        row count before each block."""
        shard_a, start_a, stop_a = self._cache_blocks()
        if self._held is not None:
            keep = ~self._held
            shard_a, start_a, stop_a = shard_a[keep], start_a[keep], stop_a[keep]
        if self.shuffle == "global":
            order = np.random.default_rng([self.seed, epoch]).permutation(len(shard_a))
            shard_a, start_a, stop_a = shard_a[order], start_a[order], stop_a[order]
        cum = np.concatenate([[0], np.cumsum(stop_a - start_a)])
        return shard_a, start_a, stop_a, cum

    def _fill(self, plan, epoch: int, k: int, bufs: list[np.ndarray]) -> tuple[int, list]:
        """Read window ``k`` of this rank's part of epoch ``epoch`` into ``bufs`` (one reusable
        ``[window, d]`` array per column, storage dtype); return its row count and ``(shard, a, b)`` pieces."""
        shard, start, stop, cum = plan
        lo = self.rank * self.rows_per_rank + k * self.shuffle_buffer_rows
        hi = min(lo + self.shuffle_buffer_rows, (self.rank + 1) * self.rows_per_rank)
        first, last = np.searchsorted(cum, lo, "right") - 1, np.searchsorted(cum, hi, "left")
        pieces, at = [], 0
        for j in range(first, last):
            a = int(start[j] + max(0, lo - cum[j]))
            b = int(stop[j] - max(0, cum[j + 1] - hi))
            pieces.append((int(shard[j]), a, b))
            for col, buf in zip(self._cols, bufs):
                col.read_into(int(shard[j]), a, b, buf[at : at + b - a])
            at += b - a
        return hi - lo, pieces

    def _take(
        self, col: Column | None, src: torch.Tensor | None, idx: torch.Tensor, pieces
    ) -> torch.Tensor | None:
        """Rows ``src[idx]`` as a new ``[len(idx), d]`` tensor in ``self.dtype``; NaN/inf raise naming the shard."""
        if col is None:
            return None
        part = src[idx]
        if not torch.isfinite(part.sum(dtype=torch.float32)):
            self._locate_nonfinite(col, src, pieces)
        return part.to(self.dtype)

    def _locate_nonfinite(self, col: Column, x: torch.Tensor, pieces: list[tuple[int, int, int]]) -> None:
        """Raise naming the shard whose rows in ``x`` (the concatenated ``pieces``) hold NaN/inf."""
        at = 0
        for shard, a, b in pieces:
            part = x[at : at + b - a]
            at += b - a
            if not torch.isfinite(part).all():
                raise CacheError(
                    f"shard {col.files[shard]} holds NaN/inf activations (rows {a}..{b}); delete it and re-run "
                    "the `sparsedict cache` command (with dtype bfloat16/float32 if it was float16)"
                )

    # ----------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return self.batches_per_epoch

    def _windows(self, epoch: int, first: int) -> Iterator[Window]:
        """Windows of this rank's part, read into one reusable buffer per column (storage dtype)."""
        plan = self._blocks(epoch)
        n_windows = math.ceil(self.rows_per_rank / self.shuffle_buffer_rows)
        cap = min(self.shuffle_buffer_rows, self.rows_per_rank)
        cols = self._cols
        bufs = [np.empty((cap, c.d), dtype=c.np_dtype) for c in cols]
        for k in range(first, n_windows):
            n, pieces = self._fill(plan, epoch, k, bufs)
            srcs = [c.as_torch(buf[:n]) for c, buf in zip(cols, bufs)]

            def take(idx: torch.Tensor, srcs=srcs, pieces=pieces) -> tuple[torch.Tensor, ...]:
                return tuple(self._take(c, src, idx, pieces) for c, src in zip(cols, srcs))

            yield Window(n, take, k + 1 == n_windows)
            srcs = take = None

    def _serve(self, cols: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._assemble(list(cols), self._out)

    def _too_few(self) -> str:
        return (f"{self.n_rows} rows over {self.world_size} rank(s) cannot fill one batch of {self.batch_size}; "
                "cache more tokens or use a smaller batch_size")  # fmt: skip

    def _after_window(self) -> None:
        trim()  # hand the freed batch-sized blocks back to the OS (glibc keeps them otherwise)

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _assemble(self, parts: list[torch.Tensor], out=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, y)`` from one tensor per column: listed hookpoints stacked along dim 1; ``out`` moves them."""
        nx = len(self._xs)
        x = parts[0] if isinstance(self.hookpoint, str) else torch.stack(parts[:nx], 1)
        y = None
        if self._ys:
            y = parts[nx] if isinstance(self.target, str) else torch.stack(parts[nx:], 1)
        if out is not None:
            x, y = out(x), (None if y is None else out(y))
        return x, y

    def state_dict(self) -> dict:
        """Position for exact resume (``epoch``, ``batch``, ``seed``) and what fixes the order, checked on resume
        (the keys a live source records too: a run may resume live where it read a cache in window order)."""
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.seed,
            "rank": self.rank,
        } | self._order()

    def _order(self) -> dict:
        order = {"world_size": self.world_size, "n_rows": self.n_rows, "held_rows": self.held_rows,
                 "batch_size": self.batch_size,
                 "shuffle": self.shuffle, "shuffle_buffer_rows": self.shuffle_buffer_rows,
                 "config_hash": self.manifest["config_hash"]}  # fmt: skip
        return {**order, "block_rows": self.block_rows} if self.shuffle == "global" else order

    def load_state_dict(self, state: dict) -> None:
        check_order(state, self._order(), "store")
        self.epoch, self._batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])

    @property
    def holds_out(self) -> bool:
        """Whether the trainer's automatic ``calibration_rows`` holds rows out of this store: under the global
        shuffle only (the window order stays the batches a live source, which cannot hold rows out, serves)."""
        return self.shuffle == "global"

    def hold_out(self, n_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Take about ``n_rows`` rows out of every epoch and return them, ``(x, y | None)`` in cache order.

        The rows are whole blocks of ``block_rows`` drawn with ``seed`` from the whole cache (at least
        ``n_rows`` rows: so they follow the cache's mix of documents), the same on every rank. The epochs then
        serve the other rows only (``held_rows`` counts those taken). Called before the first batch and before
        :meth:`load_state_dict` (the resume check includes ``held_rows``); a second call with the same
        arguments returns the same rows.
        """
        if n_rows <= 0:
            raise ValueError(f"hold_out: n_rows must be > 0, not {n_rows}")
        if self.epoch or self._batch:
            raise RuntimeError("hold_out() must come before the first batch of the store")
        shard, start, stop = self._cache_blocks()
        order = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(len(shard))
        sizes = (stop - start)[order]
        n_blocks = min(len(order), int(np.searchsorted(np.cumsum(sizes), n_rows)) + 1)
        held = np.zeros(len(shard), dtype=bool)
        held[order[:n_blocks]] = True
        if self._held is not None and not np.array_equal(held, self._held):
            raise RuntimeError(f"{self.root}: rows were already held out with other arguments")
        self._held, self.held_rows = held, int(sizes[:n_blocks].sum())
        self._plan_epochs()
        offsets = np.concatenate([[0], np.cumsum(self._x.rows)])[shard[held]]
        rows = np.concatenate([np.arange(o + a, o + b) for o, a, b in zip(offsets, start[held], stop[held])])
        return self._assemble([self._gather(c, rows) for c in self._cols])

    # ----------------------------------------------------------------- random access
    def _gather(self, col: Column, rows: np.ndarray) -> torch.Tensor:
        """Global row indices ``rows`` (sorted) -> ``[len(rows), d]`` in ``self.dtype``."""
        cum = np.concatenate([[0], np.cumsum(col.rows)])
        lo, hi = col.cols or (0, col.d)
        parts = []
        for s in range(len(col.rows)):
            sel = rows[(rows >= cum[s]) & (rows < cum[s + 1])] - cum[s]
            if len(sel):
                mm = col.memmap(s)
                parts.append(col.as_torch(np.ascontiguousarray(mm[sel, lo:hi])))
                del mm
        return torch.cat(parts).to(self.dtype)

    def sample(self, n_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x [n, d_in], y [n, d_out] | None)``: ``n_rows`` random rows (e.g. for init) of the whole cache, or
        under ``shuffle="window"`` of its first shards holding ``n_rows`` (what a live source samples)."""
        available = self.n_rows if self.shuffle == "global" else head_rows(self._x.rows, n_rows)
        rows, order = sample_rows(available, n_rows, seed)
        return self._assemble([self._gather(c, rows)[order] for c in self._cols])

    def rows(
        self, start: int = 0, stop: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, stop)`` in cache order (shard by shard), unshuffled: ``x`` (and ``y``)."""
        idx = np.arange(start, self.n_rows if stop is None else min(stop, self.n_rows))
        x, y = self._assemble([self._gather(c, idx) for c in self._cols])
        return x if y is None else (x, y)

    def tokens(self, shards: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Stored contexts: ``token_ids [n_ctx, T]``, ``attention_mask``/``keep [n_ctx, T]`` bool,
        ``row_context [rows]`` (global context index), ``row_position [rows]``, ``doc_index [n_ctx]``.

        Row ``i`` of the store (shard order) is ``token_ids[row_context[i] - first, row_position[i]]``;
        ``keep`` marks the same positions (row-major), so eval can rebuild and splice the contexts.
        """
        out: dict[str, list[torch.Tensor]] = {}
        for s in shards if shards is not None else range(len(self.manifest["shards"])):
            for key, value in read_tokens(self.root, self.manifest, s, self._x.verify).items():
                out.setdefault(key, []).append(value)
        return {k: torch.cat(v) for k, v in out.items()}

    def verify(self) -> None:
        """Hash every shard of this store's hookpoints and its tokens now and check them (reads all the data)."""
        for col in self._cols:
            for path, entry in zip(col.files, col.entries):
                digest.verify_file(path, entry, fresh=True)
        for shard in self.manifest["shards"]:
            if TOKENS in shard["files"]:
                entry = shard["files"][TOKENS]
                digest.verify_file(self.root / entry["file"], entry, fresh=True)

    # ----------------------------------------------------------------- statistics
    def norm_stats(self, hookpoint: str | None = None) -> dict:
        """``{"mean": [d], "mean_sq_norm", "mean_norm", "rows"}`` over the whole cache, computed once and
        stored in the manifest. A store of several hookpoints needs ``hookpoint`` named."""
        if hookpoint is None and not isinstance(self.hookpoint, str):
            raise ValueError(f"norm_stats: this store serves {self.hookpoint}; name one with hookpoint=...")
        col = self._column(hookpoint or self.hookpoint)
        name = col.name if col.head is None else f"{col.name}.h{col.head}"
        stats = self.manifest.setdefault("stats", {}).get(name)
        if stats is None:
            total = torch.zeros(col.d, dtype=torch.float64)
            sq = norm = 0.0
            for s, rows in enumerate(col.rows):
                for a in range(0, rows, 16384):
                    x = col.read(s, a, min(rows, a + 16384)).double()
                    total += x.sum(0)
                    n2 = (x * x).sum(1)
                    sq, norm = sq + float(n2.sum()), norm + float(n2.sqrt().sum())
            n = sum(col.rows)
            stats = {"mean": (total / n).tolist(), "mean_sq_norm": sq / n, "mean_norm": norm / n, "rows": n}
            fresh = read_manifest(self.root)
            fresh.setdefault("stats", {})[name] = stats
            write_json_atomic(self.root / "manifest.json", fresh)
            self.manifest["stats"][name] = stats
        return {**stats, "mean": torch.tensor(stats["mean"], dtype=torch.float32)}

    def _column(self, name: str) -> Column:
        """The open column for ``name`` (input or target), else a new one."""
        base, head = self._resolve(name)
        for col in self._cols:
            if (col.name, col.head) == (base, head):
                return col
        return Column(self.root, self.manifest, base, verify=self._x.verify, head=head)

    def close(self) -> None:
        for col in self._cols:
            col.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def read_tokens(root: str | Path, manifest: dict, shard: int, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tokens file of shard ``shard`` (``token_ids``, ``attention_mask``, ``keep``, ``row_context``,
    ``row_position``, ``doc_index``), read once and checked against its digest (once a process)."""
    info = manifest["shards"][shard]
    entry = info["files"][TOKENS]
    return load_shard(Path(root) / entry["file"], entry, expected_tensors(manifest, info, TOKENS), verify)


__all__ = ["ActivationStore", "read_tokens"]
