"""``ActivationStore``: shuffled, rank-sharded, bounded-RAM, exactly resumable batches from a cache.

Shuffling, per epoch ``e`` (all randomness from ``seed`` and ``e``, so runs are reproducible):

1. Every shard is cut into blocks of ``block_rows`` consecutive rows; the blocks of all shards are
   permuted together (one global order per epoch).
2. The concatenated row stream is split into ``world_size`` equal contiguous parts (``N // world_size``
   rows each; the ``N mod world_size`` rows left over change every epoch): no row is served twice across
   ranks within an epoch, and every rank gets the same number of batches.
3. A rank reads its part in windows of ``shuffle_buffer_rows`` rows (many blocks from all over the
   cache), permutes each window's rows and serves batches from it. RAM is bounded by the window size,
   which ``max_ram_bytes`` sets.

Rows are read with positioned reads (``os.preadv``) of contiguous block ranges straight into the
window buffer rather than through long-lived memory maps, whose resident file pages would count
against the process's RSS and grow with the cache size. ``state_dict()`` holds (epoch, batch, seed):
resuming replays nothing but the window that holds the next batch.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sparsedict.cache.manifest import TOKENS, CacheError, read_manifest, write_json_atomic
from sparsedict.cache.writer import check_shard, read_header, st_dtype

_NP = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}


class _Column:
    """One hookpoint's shards: row offsets and positioned reads of row ranges."""

    def __init__(self, root: Path, manifest: dict, name: str, verify: bool) -> None:
        info = manifest["hookpoints"][name]
        self.name, self.d = name, int(info["d"])
        self.code = st_dtype(getattr(torch, info["dtype"]))
        self.files, self.offsets, self.rows = [], [], []
        for shard in manifest["shards"]:
            entry = shard["files"][name]
            path = root / entry["file"]
            header = check_shard(path, entry, {"activations": (self.code, (shard["rows"], self.d))}, verify)
            self.files.append(path)
            self.offsets.append(read_header(path)[1] + header["activations"]["data_offsets"][0])
            self.rows.append(int(shard["rows"]))
        self._fds: dict[int, int] = {}

    def read(self, shard: int, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of ``shard`` as a tensor ``[b - a, d]`` in the stored dtype."""
        arr = np.empty((b - a, self.d), dtype=_NP[self.code])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        view, pos = memoryview(arr).cast("B"), self.offsets[shard] + a * self.d * arr.itemsize
        while len(view):
            n = os.preadv(fd, [view], pos)
            if n == 0:
                raise CacheError(
                    f"shard {self.files[shard]} is truncated; delete it and re-run `sparsedict cache`"
                )
            view, pos = view[n:], pos + n
        out = torch.from_numpy(arr)
        return out.view(torch.bfloat16) if self.code == "BF16" else out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ActivationStore:
    """Batches ``(x [B, d_in], y [B, d_out] | None)`` from an activation cache directory.

    ``hookpoint``/``target`` accept the name given at caching time or its resolved module path.
    ``loop=True`` (default) iterates forever, epoch after epoch (``epoch`` counts them); ``loop=False``
    serves the rest of the current epoch. ``normalise=True`` multiplies x (and y) by
    ``c = sqrt(d) / sqrt(E‖x‖²)`` from :meth:`norm_stats` (so E‖c·x‖² = d); ``scale_in``/``scale_out``
    hold the constants.
    """

    def __init__(self, path: str | Path, hookpoint: str, target: str | None = None, batch_size: int = 4096,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer_rows: int = 262_144,
                 max_ram_bytes: int | None = None, dtype: torch.dtype = torch.float32, normalise: bool = False,
                 block_rows: int = 256, drop_last: bool = True, loop: bool = True, verify: bool = False,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        if self.manifest["status"] != "complete":
            raise CacheError(
                f"{self.root} is an incomplete cache ({len(self.manifest['shards'])} shards done); run the same "
                "`sparsedict cache` command again to finish it"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.hookpoint = self._name(hookpoint)
        self.target = self._name(target) if target is not None else None
        self._x = _Column(self.root, self.manifest, self.hookpoint, verify)
        self._y = _Column(self.root, self.manifest, self.target, verify) if self.target else None
        self.d_in = self._x.d
        self.d_out = self._y.d if self._y else None
        self.n_rows = int(sum(self._x.rows))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.block_rows, self.drop_last, self.loop = block_rows, drop_last, loop
        self.dtype, self.device = dtype, torch.device(device)
        if max_ram_bytes is not None:  # pieces, concatenation, permuted copy, allocator slack
            per_row = 5 * 4 * (self.d_in + (self.d_out or 0))  # measured: ~5 window copies at peak RSS
            shuffle_buffer_rows = max(batch_size, int(max_ram_bytes // per_row) - batch_size)
        self.shuffle_buffer_rows = int(shuffle_buffer_rows)
        self.rows_per_rank = self.n_rows // world_size
        per = self.rows_per_rank
        self.batches_per_epoch = per // batch_size if drop_last else math.ceil(per / batch_size)
        self.epoch, self._batch = 0, 0
        self.scale_in = self.scale_out = 1.0
        if normalise:
            self.scale_in = self._scale(self.hookpoint)
            self.scale_out = self._scale(self.target) if self.target else 1.0

    def _name(self, name: str) -> str:
        hps = self.manifest["hookpoints"]
        if name in hps:
            return name
        for alias, info in hps.items():
            if name in (info["path"], info["module_path"] + ":" + info["side"]):
                return alias
        raise KeyError(f"hookpoint {name!r} is not in the cache {self.root}; it holds "
                       f"{', '.join(a + ' (' + i['path'] + ')' for a, i in hps.items())}")  # fmt: skip

    # ----------------------------------------------------------------- epoch plan
    def _blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Permuted blocks ``(shard, start, stop)`` and the cumulative row count before each block."""
        shard, start = [], []
        for s, rows in enumerate(self._x.rows):
            starts = np.arange(0, rows, self.block_rows)
            shard.append(np.full(len(starts), s))
            start.append(starts)
        shard_a, start_a = np.concatenate(shard), np.concatenate(start)
        stop_a = np.minimum(start_a + self.block_rows, np.asarray(self._x.rows)[shard_a])
        order = np.random.default_rng([self.seed, epoch]).permutation(len(shard_a))
        shard_a, start_a, stop_a = shard_a[order], start_a[order], stop_a[order]
        cum = np.concatenate([[0], np.cumsum(stop_a - start_a)])
        return shard_a, start_a, stop_a, cum

    def _window(self, plan, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of window ``k`` of this rank's part of epoch ``epoch``, permuted."""
        shard, start, stop, cum = plan
        lo = self.rank * self.rows_per_rank + k * self.shuffle_buffer_rows
        hi = min(lo + self.shuffle_buffer_rows, (self.rank + 1) * self.rows_per_rank)
        first, last = np.searchsorted(cum, lo, "right") - 1, np.searchsorted(cum, hi, "left")
        xs, ys, pieces = [], [], []
        for j in range(first, last):
            a = int(start[j] + max(0, lo - cum[j]))
            b = int(stop[j] - max(0, cum[j + 1] - hi))
            pieces.append((int(shard[j]), a, b))
            xs.append(self._x.read(int(shard[j]), a, b))
            if self._y is not None:
                ys.append(self._y.read(int(shard[j]), a, b))
        perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, self.rank, k]).permutation(hi - lo))
        x = self._finite(self._x, torch.cat(xs), pieces)
        y = self._finite(self._y, torch.cat(ys), pieces) if ys else None
        del xs, ys
        x = x.to(self.dtype)[perm]
        y = y.to(self.dtype)[perm] if y is not None else None
        return x, y

    def _finite(self, col: _Column, x: torch.Tensor, pieces: list[tuple[int, int, int]]) -> torch.Tensor:
        """Check ``x`` (the concatenated ``pieces``) for NaN/inf: one cheap sum, then locate the shard."""
        if torch.isfinite(x.float().sum()):
            return x
        at = 0
        for shard, a, b in pieces:
            part = x[at : at + b - a]
            at += b - a
            if not torch.isfinite(part).all():
                raise CacheError(
                    f"shard {col.files[shard]} holds NaN/inf activations (rows {a}..{b}); delete it and re-run "
                    "the `sparsedict cache` command (with dtype bfloat16/float32 if it was float16)"
                )
        return x

    # ----------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.n_rows} rows over {self.world_size} rank(s) cannot fill one batch of {self.batch_size}; "
                "cache more tokens or use a smaller batch_size"
            )
        while True:
            yield from self._epoch_batches()
            if not self.loop:
                return

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        epoch, B = self.epoch, self.batch_size
        plan = self._blocks(epoch)
        n_windows = math.ceil(self.rows_per_rank / self.shuffle_buffer_rows)
        off = self._batch * B
        k = off // self.shuffle_buffer_rows
        skip = off - k * self.shuffle_buffer_rows
        tail_x = tail_y = None  # rows of the previous window that did not fill a batch (< B, a copy)
        while self._batch < self.batches_per_epoch and k < n_windows:
            x, y = self._window(plan, epoch, k)
            x, y = x[skip:], (y[skip:] if y is not None else None)
            skip, k = 0, k + 1
            pos, last = 0, k == n_windows
            if tail_x is not None and len(tail_x):
                pos = min(B - len(tail_x), len(x))
                tail_x = torch.cat([tail_x, x[:pos]])
                tail_y = torch.cat([tail_y, y[:pos]]) if y is not None else None
                if len(tail_x) == B or last:
                    self._batch += 1
                    yield (
                        self._out(tail_x, self.scale_in),
                        (self._out(tail_y, self.scale_out) if y is not None else None),
                    )
                    tail_x = tail_y = None
            while self._batch < self.batches_per_epoch and (len(x) - pos >= B or (last and pos < len(x))):
                bx, by = x[pos : pos + B], (y[pos : pos + B] if y is not None else None)
                pos += len(bx)
                self._batch += 1
                yield (
                    self._out(bx, self.scale_in),
                    (self._out(by, self.scale_out) if by is not None else None),
                )
            if pos < len(x):
                tail_x = torch.cat([tail_x, x[pos:]]) if tail_x is not None else x[pos:].clone()
                tail_y = (
                    (torch.cat([tail_y, y[pos:]]) if tail_y is not None else y[pos:].clone())
                    if y is not None
                    else None
                )
            x = y = bx = by = None  # free this window before reading the next
        self.epoch, self._batch = epoch + 1, 0

    def _out(self, t: torch.Tensor, scale: float) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        return t * scale if scale != 1.0 else t

    def state_dict(self) -> dict:
        """Position for exact resume: ``{"epoch", "batch", "seed", "rank", "world_size", "n_rows"}``."""
        return {"epoch": self.epoch, "batch": self._batch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "n_rows": self.n_rows, "batch_size": self.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_rows", "world_size", "batch_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"store state has {key}={state[key]} but this store has {getattr(self, key)}"
                )
        self.epoch, self._batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])

    # ----------------------------------------------------------------- random access
    def _gather(self, col: _Column, rows: np.ndarray) -> torch.Tensor:
        """Global row indices ``rows`` (sorted) -> ``[len(rows), d]`` in ``self.dtype``."""
        cum = np.concatenate([[0], np.cumsum(col.rows)])
        parts = []
        for s in range(len(col.rows)):
            sel = rows[(rows >= cum[s]) & (rows < cum[s + 1])] - cum[s]
            if len(sel):
                mm = np.memmap(col.files[s], dtype=_NP[col.code], mode="r", offset=col.offsets[s],
                               shape=(col.rows[s], col.d))  # fmt: skip
                t = torch.from_numpy(np.ascontiguousarray(mm[sel]))
                parts.append(t.view(torch.bfloat16) if col.code == "BF16" else t)
                del mm
        return torch.cat(parts).to(self.dtype)

    def sample(self, n_rows: int, seed: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n_rows`` random rows of the whole cache, ``x [n, d_in]`` (and ``y [n, d_out]``), e.g. for init."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.n_rows, size=min(n_rows, self.n_rows), replace=False))
        order = torch.from_numpy(rng.permutation(len(rows)))
        x = self._gather(self._x, rows)[order] * self.scale_in
        if self._y is None:
            return x
        return x, self._gather(self._y, rows)[order] * self.scale_out

    def rows(
        self, start: int = 0, stop: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, stop)`` in cache order (shard by shard), unshuffled: ``x`` (and ``y``)."""
        idx = np.arange(start, self.n_rows if stop is None else min(stop, self.n_rows))
        x = self._gather(self._x, idx) * self.scale_in
        return x if self._y is None else (x, self._gather(self._y, idx) * self.scale_out)

    def tokens(self, shards: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Stored contexts: ``token_ids [n_ctx, T]``, ``attention_mask``/``keep [n_ctx, T]`` bool,
        ``row_context [rows]`` (global context index), ``row_position [rows]``, ``doc_index [n_ctx]``.

        Row ``i`` of the store (shard order) is ``token_ids[row_context[i] - first, row_position[i]]``;
        ``keep`` marks the same positions (row-major), so eval can rebuild and splice the contexts.
        """
        from safetensors.torch import load_file

        out: dict[str, list[torch.Tensor]] = {}
        for s in shards if shards is not None else range(len(self.manifest["shards"])):
            entry = self.manifest["shards"][s]["files"][TOKENS]
            check_shard(self.root / entry["file"], entry, {}, checksum=False)
            for key, value in load_file(self.root / entry["file"]).items():
                out.setdefault(key, []).append(value)
        return {k: torch.cat(v) for k, v in out.items()}

    def verify(self) -> None:
        """Check every shard of this store's hookpoints against its sha256 (reads all the data)."""
        for col in (self._x, self._y):
            if col is not None:
                _Column(self.root, self.manifest, col.name, verify=True)

    # ----------------------------------------------------------------- statistics
    def norm_stats(self, hookpoint: str | None = None) -> dict:
        """``{"mean": [d], "mean_sq_norm", "mean_norm", "rows"}`` over the whole cache, computed once and
        stored in the manifest."""
        name = self._name(hookpoint) if hookpoint else self.hookpoint
        stats = self.manifest.setdefault("stats", {}).get(name)
        if stats is None:
            col = self._x if name == self.hookpoint else (self._y if name == self.target else None)
            col = col or _Column(self.root, self.manifest, name, verify=False)
            total = torch.zeros(col.d, dtype=torch.float64)
            sq = norm = 0.0
            for s, rows in enumerate(col.rows):
                for a in range(0, rows, 65536):
                    x = col.read(s, a, min(rows, a + 65536)).double()
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

    def _scale(self, name: str) -> float:
        stats = self.norm_stats(name)
        return math.sqrt(self.manifest["hookpoints"][name]["d"] / stats["mean_sq_norm"])

    def close(self) -> None:
        self._x.close()
        if self._y is not None:
            self._y.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


__all__ = ["ActivationStore"]
