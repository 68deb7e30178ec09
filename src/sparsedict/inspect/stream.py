"""One streaming pass over an activation cache: per-latent statistics and example tables.

The cache is read in its stored order, shard by shard, in batches of whole contexts (a context's rows
are consecutive and a shard holds whole contexts), so every token window around a firing lies in the
batch that holds the firing: when an entry enters a table, the latent's activation on the window's
other tokens is read from the same batch's codes. Positions the cache excluded (BOS, attention sinks,
special tokens) have no row and no activation; their window value is NaN.

Per latent, over the rows read (memory independent of their number):

- ``count`` (firings: non-zero activations), ``total`` (sum of activations, float64), ``max``;
- ``hist``: counts of positive activations in fixed log-spaced bins (``BINS_PER_OCTAVE`` per factor 2,
  from ``2**HIST_LOW`` to ``2**HIST_HIGH``; values outside fall into the end bins), and ``hist_neg`` the
  same for ``|v|`` of negative activations (codes of both signs: MP with ``absolute``);
- ``top``: the ``top_n`` largest activations (ties: the earlier row first), exact;
- ``sample``: a uniform random sample without replacement of ``samples`` firings, the firings with the
  largest :func:`priority` key (a hash of seed, row and latent, so the sample does not depend on the
  batch size); the browser splits it into activation-quantile bands.

Both tables are :class:`TopTable`: ``[n, size]`` keys and payloads, merged per batch with a threshold
filter (only entries beating a latent's current worst key are looked at) and one batched sort of the
affected latents' old and new entries — no per-latent Python loop and no dense ``[rows, n]`` sort.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BINS_PER_OCTAVE = 4
"""Histogram bins per factor of 2 (bin width 2**0.25 ≈ 1.19)."""
HIST_LOW, HIST_HIGH = -20, 20
"""log2 of the histogram's lowest and highest edges."""
N_BINS = (HIST_HIGH - HIST_LOW) * BINS_PER_OCTAVE
_MASK32 = 0xFFFFFFFF


def hist_edges() -> np.ndarray:
    """The ``N_BINS + 1`` histogram bin edges."""
    return 2.0 ** (HIST_LOW + np.arange(N_BINS + 1) / BINS_PER_OCTAVE)


def hist_bin(v: Tensor) -> Tensor:
    """Histogram bin of each positive value (int64, clamped into ``[0, N_BINS)``)."""
    b = torch.floor(torch.log2(v.double()) * BINS_PER_OCTAVE).long() - HIST_LOW * BINS_PER_OCTAVE
    return b.clamp_(0, N_BINS - 1)


def _mix32(x: Tensor) -> Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def priority(seed: int, rows: Tensor, latents: Tensor) -> Tensor:
    """Pseudo-random key in ``[0, 2**32)`` (int64) of each firing (global row, latent) for seed ``seed``."""
    h = _mix32(rows.long() ^ ((seed * 0x9E3779B1) & _MASK32))
    h = _mix32(h ^ (rows.long() >> 32))
    return _mix32(h ^ ((latents.long() * 0x85EBCA77) & _MASK32))


@dataclass
class Batch:
    """A batch of whole contexts read from the cache."""

    x: Tensor
    """Rows ``[B, d]``."""
    row0: int
    """Global index of the batch's first row."""
    ctx: Tensor
    """Context of each row within the batch ``[B]`` (0 = the batch's first context)."""
    pos: Tensor
    """Position of each row in its context ``[B]``."""
    pos2row: Tensor
    """``[contexts, T]``: batch row of each position, -1 where the position has no row."""
    ctx0: int = 0
    """Global index of the batch's first context."""


def firings(code, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Non-zero entries of a batch's code as ``(row, latent, value)``, rows ascending, one per pair."""
    vals = code.values
    if code.indices is None:
        r, lat = vals.nonzero(as_tuple=True)
        return r, lat, vals[r, lat].float()
    idx = code.indices
    m = vals != 0
    r = torch.arange(vals.shape[0], device=vals.device).unsqueeze(1).expand_as(idx)[m]
    lat, v = idx[m], vals[m].float()
    if idx.shape[1] > 1:
        marked = torch.where(m, idx, -1 - torch.arange(idx.shape[1], device=idx.device))
        s = marked.sort(dim=1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):  # a latent listed twice in a row: sum its entries
            key, inv = torch.unique(r * n + lat, return_inverse=True)
            v = torch.zeros(len(key), dtype=v.dtype, device=v.device).index_add_(0, inv, v)
            nz = v != 0
            key, v = key[nz], v[nz]
            r, lat = key // n, key % n
    return r, lat, v


DENSE_LOOKUP = 1 << 24
"""A sparse batch code with at most this many ``rows · n`` entries is densified for window lookups."""


class CodeLookup:
    """Activation of any (batch row, latent) pair of one batch's code: direct indexing of a dense code (or
    of a small sparse one densified), else a binary search in the sorted ``row · n + latent`` keys (no
    ``[B, n]`` densification; built on first use)."""

    def __init__(self, code, n: int, rows: Tensor, lat: Tensor, values: Tensor) -> None:
        self.dense = code.values if code.indices is None else None
        self.n, self.firings, self.batch = n, (rows, lat, values), code.values.shape[0]
        self.keys: Tensor | None = None

    def __call__(self, rows: Tensor, lat: Tensor) -> Tensor:
        if self.dense is None and self.keys is None and self.batch * self.n <= DENSE_LOOKUP:
            r, la, v = self.firings
            self.dense = torch.zeros(self.batch, self.n, dtype=torch.float32)
            self.dense[r, la] = v
        if self.dense is not None:
            return self.dense[rows, lat].float()
        if self.keys is None:
            r, la, v = self.firings
            self.keys, order = torch.sort(r * self.n + la)
            self.values = v[order]
        if not len(self.keys):
            return torch.zeros(rows.shape)
        q = rows * self.n + lat
        i = torch.searchsorted(self.keys, q).clamp_(max=len(self.keys) - 1)
        return torch.where(self.keys[i] == q, self.values[i], 0.0)


def window_values(lookup: CodeLookup, batch: Batch, lat: Tensor, rows: Tensor, half: int) -> Tensor:
    """Latent ``lat[e]``'s activation at positions ``pos - half .. pos + half`` of row ``rows[e]``'s context.

    ``[E, 2·half + 1]`` float32; NaN where the position has no row (excluded, padding or outside the context).
    """
    offs = torch.arange(-half, half + 1, device=rows.device)
    T = batch.pos2row.shape[1]
    pp = batch.pos[rows].long()[:, None] + offs
    inside = (pp >= 0) & (pp < T)
    rr = batch.pos2row[batch.ctx[rows].long()[:, None], pp.clamp(0, T - 1)]
    ok = inside & (rr >= 0)
    v = lookup(rr.clamp_min(0), lat[:, None].expand_as(rr))
    return v.masked_fill(~ok, math.nan)


class TopTable:
    """Per latent, the ``size`` entries with the largest keys (ties: earlier rows first) and their payloads.

    ``key [n, size]`` sorted descending (``empty`` in unused slots), ``value [n, size]`` (the activation),
    ``row [n, size]`` (global row, -1 unused) and ``ptr [n, size]``: the entry's row in ``pool [n·size, W]``,
    which holds its window (activations around the row). A merge moves keys and pointers only; the windows
    of entries that enter are written into the pool rows of the entries they evict.
    """

    def __init__(self, n: int, size: int, width: int, key_dtype: torch.dtype) -> None:
        self.size = size
        self.empty = -math.inf if key_dtype.is_floating_point else -1
        self.key = torch.full((n, size), self.empty, dtype=key_dtype)
        self.value = torch.zeros((n, size), dtype=torch.float32)
        self.row = torch.full((n, size), -1, dtype=torch.int64)
        self.ptr = torch.arange(n * size, dtype=torch.int64).view(n, size)
        self.pool = torch.full((n * size, width), math.nan, dtype=torch.float32)

    @property
    def window(self) -> Tensor:
        """Windows ``[n, size, W]`` in table order."""
        return self.pool[self.ptr]

    def offer(self, lat: Tensor, key: Tensor, rows: Tensor, value: Tensor, row0: int, window) -> None:
        """Merge candidate entries (batch ``rows`` ascending); ``window(lat, rows)`` gives ``[E, W]``."""
        S = self.size
        if S == 0:
            return
        m = key > self.key[lat, S - 1]
        if not bool(m.any()):
            return
        lat, key, rows, value = lat[m], key[m], rows[m], value[m]
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(lat[order], stable=True)]
        lat, key, rows, value = lat[order], key[order], rows[order], value[order]
        u, cnt = torch.unique_consecutive(lat, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(u)), cnt)
        rank = torch.arange(len(lat)) - (torch.cumsum(cnt, 0) - cnt)[group]
        keep = rank < S
        lat, key, rows, value, group, rank = (t[keep] for t in (lat, key, rows, value, group, rank))
        U = len(u)
        cand_key = torch.full((U, S), self.empty, dtype=self.key.dtype)
        cand_key[group, rank] = key
        cand_id = torch.full((U, S), -1, dtype=torch.int64)
        cand_id[group, rank] = torch.arange(len(lat))
        merged = torch.cat([self.key[u], cand_key], 1)
        pick = torch.argsort(merged, dim=1, descending=True, stable=True)[:, :S]
        fresh = pick >= S
        old = pick.clamp(max=S - 1)
        gi, si = fresh.nonzero(as_tuple=True)  # row-major: grouped by latent
        ent = cand_id[gi, (pick - S)[gi, si]]
        kept = torch.zeros((U, S), dtype=torch.bool)  # old slots still in the table
        ki, ks = (~fresh).nonzero(as_tuple=True)
        kept[ki, pick[ki, ks]] = True
        old_ptr = self.ptr[u]
        new_ptr = old_ptr.gather(1, old)
        new_ptr[gi, si] = old_ptr[~kept]  # evicted pool rows (as many per latent as entries that enter)
        new_value = self.value[u].gather(1, old)
        new_value[gi, si] = value[ent]
        new_row = self.row[u].gather(1, old)
        new_row[gi, si] = rows[ent].long() + row0
        self.pool[new_ptr[gi, si]] = window(lat[ent], rows[ent])
        self.key[u] = merged.gather(1, pick)
        self.value[u], self.row[u], self.ptr[u] = new_value, new_row, new_ptr


class LatentStats:
    """Everything the pass accumulates for one dictionary of ``n`` latents."""

    def __init__(self, n: int, top_n: int, samples: int, half_window: int, seed: int,
                 latents: Tensor | None = None) -> None:  # fmt: skip
        self.n, self.half, self.seed = n, half_window, seed
        self.latents = torch.arange(n) if latents is None else latents.long()
        """Latents with example tables (slot ``j`` of the tables is latent ``latents[j]``)."""
        self.slot = torch.full((n,), -1, dtype=torch.int64)
        self.slot[self.latents] = torch.arange(len(self.latents))
        self.count = torch.zeros(n, dtype=torch.int64)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.max = torch.full((n,), -math.inf, dtype=torch.float32)
        self.hist = torch.zeros((n, N_BINS), dtype=torch.int32)
        self.hist_neg: Tensor | None = None
        width = 2 * half_window + 1
        self.top = TopTable(len(self.latents), top_n, width, torch.float32)
        self.sample = TopTable(len(self.latents), samples, width, torch.int64)
        self.sink = None
        """Optional ``sink(batch, rows, latents, values)`` receiving every tabulated firing (batch rows)."""

    threads = 1
    """CPU threads of :meth:`update` (0: torch's setting). One, as its tensors are small (about batch · k
    entries); ``benchmarks/features.py --compare_threads`` times the choice."""

    def update(self, code, batch: Batch) -> None:
        """Fold one batch's code (``SparseCode`` on the CPU) into the statistics, on ``threads`` threads."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        try:
            self._update(code, batch)
        finally:
            torch.set_num_threads(threads)

    def _update(self, code, batch: Batch) -> None:
        r, lat, v = firings(code, self.n)
        if not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"the dictionary produced NaN/inf codes on rows {batch.row0}..{batch.row0 + len(batch.x)} "
                "of the cache: check the checkpoint (and the cache's activations) for NaN/inf"
            )
        if not len(v):
            return
        self.count += torch.bincount(lat, minlength=self.n)
        self.total += torch.bincount(lat, weights=v.double(), minlength=self.n)
        self.max.scatter_reduce_(0, lat, v, reduce="amax")
        pos = v > 0
        flat = self.hist.view(-1)
        flat.index_add_(
            0, lat[pos] * N_BINS + hist_bin(v[pos]), torch.ones(int(pos.sum()), dtype=torch.int32)
        )
        if not bool(pos.all()):
            neg = v < 0
            if self.hist_neg is None:
                self.hist_neg = torch.zeros_like(self.hist)
            self.hist_neg.view(-1).index_add_(
                0, lat[neg] * N_BINS + hist_bin(-v[neg]), torch.ones(int(neg.sum()), dtype=torch.int32)
            )

        lookup = CodeLookup(code, self.n, r, lat, v)

        def window(slots: Tensor, rows: Tensor) -> Tensor:
            return window_values(lookup, batch, self.latents[slots], rows, self.half)

        slot = self.slot[lat]
        if len(self.latents) < self.n:
            tracked = slot >= 0
            r, lat, v, slot = r[tracked], lat[tracked], v[tracked], slot[tracked]
        if self.sink is not None:
            self.sink(batch, r, lat, v)
        self.top.offer(slot, v, r, v, batch.row0, window)
        keys = priority(self.seed, r + batch.row0, lat)
        self.sample.offer(slot, keys, r, v, batch.row0, window)


def context_batches(keep: Tensor, batch_rows: int) -> list[tuple[int, int]]:
    """Split a shard's contexts ``[n_ctx, T]`` (``keep`` mask) into ``(c0, c1)`` ranges of whole contexts
    holding at most ``batch_rows`` rows each (a longer single context is one range)."""
    ends = torch.cumsum(keep.sum(1), 0).tolist()
    out, c0, base = [], 0, 0
    n = len(ends)
    while c0 < n:
        c1 = c0 + 1
        while c1 < n and ends[c1] - base <= batch_rows:
            c1 += 1
        out.append((c0, c1))
        base, c0 = ends[c1 - 1], c1
    return out


def stream(store, members: list[tuple[object, LatentStats]], max_rows: int | None, batch_rows: int,
           device: str = "cpu", progress: bool = False, seconds: dict[str, float] | None = None) -> int:  # fmt: skip
    """Encode the cache behind ``store`` (an ``ActivationStore``) once, in order, with every dictionary in
    ``members`` (``(dictionary, stats)``), up to ``max_rows`` rows rounded up to a whole context.

    Returns the number of rows read; ``seconds``, when given, receives the wall time spent reading
    (``read``: shards and tokens files), encoding (``encode``) and in the statistics (``bookkeeping``).
    """
    clock = {"read": 0.0, "encode": 0.0, "bookkeeping": 0.0}
    t = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        clock[phase] += now - t
        t = now

    bar = None
    total = store.n_rows if max_rows is None else min(store.n_rows, max_rows)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"inspect {store.hookpoint}")
    row0 = 0
    for s, shard in enumerate(store.manifest["shards"]):
        if row0 >= total:
            break
        tok = store.tokens([s])
        keep = tok["keep"]
        n_rows = int(keep.sum())
        if n_rows != shard["rows"]:
            raise ValueError(f"shard {s} of {store.root}: tokens file has {n_rows} kept positions but the "
                             f"manifest records {shard['rows']} rows; the cache is inconsistent, re-create it")  # fmt: skip
        pos2row = torch.full(keep.shape, -1, dtype=torch.int64)
        pos2row[keep] = torch.arange(n_rows)
        ctx, pos = keep.nonzero(as_tuple=True)
        ends = torch.cumsum(keep.sum(1), 0)
        starts = ends - keep.sum(1)
        for c0, c1 in context_batches(keep, batch_rows):
            if row0 >= total:
                break
            a = int(starts[c0])
            b = int(starts[c1]) if c1 < len(starts) else n_rows
            if b - a > total - row0:  # the last batch: stop after the context holding row `total - 1`
                c1 = int(torch.searchsorted(ends, a + total - row0)) + 1
                b = int(ends[c1 - 1])
            if b == a:
                continue
            x = store.rows(row0, row0 + b - a)
            lap("read")
            local = pos2row[c0:c1]
            batch = Batch(
                x,
                row0,
                ctx[a:b] - c0,
                pos[a:b],
                torch.where(local >= 0, local - a, -1),
                int(shard["first_context"]) + c0,
            )
            for model, stats in members:
                xin = x.to(device=device, dtype=model.W_dec.dtype)
                scale = float(getattr(model, "input_scale", 1.0))
                if scale != 1.0:  # an unfolded model in memory works on scaled inputs
                    xin = xin * scale
                with torch.no_grad():
                    code = model.encode(xin)
                if code.values.device.type != "cpu":
                    code = type(code)(code.values.cpu(), None if code.indices is None else code.indices.cpu(),
                                      code.n_latents)  # fmt: skip
                lap("encode")
                stats.update(code, batch)
                lap("bookkeeping")
            row0 += b - a
            if bar is not None:
                bar.update(b - a)
    if bar is not None:
        bar.close()
    if seconds is not None:
        for phase, dt in clock.items():
            seconds[phase] = seconds.get(phase, 0.0) + dt
    return row0
