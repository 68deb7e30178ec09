"""``Inspection``: what the pass found for one dictionary, as arrays; saved as safetensors + JSON.

Arrays (numpy), ``n`` latents, ``m`` tabulated latents (``latents``), ``N`` = ``top_n``, ``R`` sampled
firings, ``W = 2·window + 1``, ``K`` logit-lens tokens, ``M`` neighbours:

==================  ===============  ==========================================================
``count``           [n] int64        firings (non-zero activations) over ``meta["tokens"]`` rows
``total``           [n] float64      sum of activations
``max``             [n] float32      largest activation (-inf if it never fired)
``hist``            [n, B] int32     positive activations per log-spaced bin (``hist_edges``)
``hist_neg``        [n, B] int32     ``|v|`` of negative activations (only when there were some)
``latents``         [m] int64        latents with example tables and pages
``top_*``           [m, N(, W)]      top activations: ``value``, ``row`` (-1: unused slot), ``ctx``
                                     (global context), ``pos``, ``window`` (activation on every window
                                     token; NaN where the cache has no row), ``tokens`` (token ids,
                                     -1 outside the context)
``sample_*``        [m, R(, W)]      the random sample of firings, same fields
``lens_top_ids``    [m, K] int64     logit-lens top tokens (and ``lens_top_values``; ``lens_bottom_*``
                                     ascending); absent without a lens
``near_ids``        [m, M] int64     nearest latents by decoder cosine (and ``near_cos``)
==================  ===============  ==========================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ARRAYS = "inspect.safetensors"
META = "inspect.json"


@dataclass
class Inspection:
    """One dictionary's inspection: ``meta`` (provenance, settings) and ``arrays`` (see the module doc)."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def n_latents(self) -> int:
        return len(self.arrays["count"])

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    def density(self) -> np.ndarray:
        """Fraction of the rows read on which each latent fired ``[n]``."""
        return self.arrays["count"] / max(1, self.tokens)

    def mean_active(self) -> np.ndarray:
        """Mean activation over the rows where each latent fired ``[n]`` (0 if it never fired)."""
        c = self.arrays["count"]
        return np.where(c > 0, self.arrays["total"] / np.maximum(c, 1), 0.0)

    def examples(self, table: str, j: int) -> list[dict[str, Any]]:
        """Used entries of table ``"top"``/``"sample"`` for tabulated latent slot ``j``, as dicts."""
        a = self.arrays
        used = np.flatnonzero(a[f"{table}_row"][j] >= 0)
        return [{"slot": int(s), "value": float(a[f"{table}_value"][j, s]), "ctx": int(a[f"{table}_ctx"][j, s]),
                 "pos": int(a[f"{table}_pos"][j, s]), "row": int(a[f"{table}_row"][j, s]),
                 "window": a[f"{table}_window"][j, s], "tokens": a[f"{table}_tokens"][j, s]}
                for s in used]  # fmt: skip

    def band_slots(self, j: int, quantiles: int) -> list[np.ndarray]:
        """Sample-table slots of slot ``j``'s sampled firings in ``quantiles`` bands of equal count (by
        activation rank), highest band first; within a band, activation descending (ties: earlier row)."""
        rows, values = self.arrays["sample_row"][j], self.arrays["sample_value"][j]
        used = np.flatnonzero(rows >= 0)
        used = used[np.lexsort((rows[used], -values[used]))]  # descending value, ties: earlier row
        asc, n = used[::-1], len(used)
        bands = [asc[(b * n) // quantiles : ((b + 1) * n) // quantiles][::-1] for b in range(quantiles)]
        return [band for band in reversed(bands) if len(band)]

    def bands(self, j: int, quantiles: int) -> list[list[dict[str, Any]]]:
        """``band_slots`` as example dicts (see :meth:`examples`)."""
        ex = {e["slot"]: e for e in self.examples("sample", j)}
        return [[ex[int(s)] for s in band] for band in self.band_slots(j, quantiles)]

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(folder / ARRAYS))
        (folder / META).write_text(json.dumps(self.meta, indent=1, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Inspection:
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / META).exists():
            raise FileNotFoundError(
                f"{folder / META} not found: {folder} holds no `sparsedict inspect` output"
            )
        return cls(json.loads((folder / META).read_text()), load_file(str(folder / ARRAYS)))


def locate(store, rows: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global cache rows -> ``(context, position, window token ids [E, 2·half + 1])``.

    Token ids are -1 outside the context (before its start, or in its padding); reads one shard's
    tokens file at a time.
    """
    rows = np.asarray(rows, dtype=np.int64)
    ctx = np.full(len(rows), -1, dtype=np.int64)
    pos = np.full(len(rows), -1, dtype=np.int64)
    toks = np.full((len(rows), 2 * half + 1), -1, dtype=np.int32)
    offs = np.arange(-half, half + 1)
    start = 0
    for s, shard in enumerate(store.manifest["shards"]):
        stop = start + int(shard["rows"])
        sel = np.flatnonzero((rows >= start) & (rows < stop))
        if len(sel):
            tok = {k: v.numpy() for k, v in store.tokens([s]).items()}
            local = rows[sel] - start
            c = tok["row_context"][local]
            p = tok["row_position"][local].astype(np.int64)
            lc = c - int(shard["first_context"])
            length = tok["attention_mask"].sum(1)[lc]
            pp = p[:, None] + offs
            inside = (pp >= 0) & (pp < length[:, None])
            ids = np.take_along_axis(tok["token_ids"][lc], np.clip(pp, 0, tok["token_ids"].shape[1] - 1), 1)
            ctx[sel], pos[sel] = c, p
            toks[sel] = np.where(inside, ids, -1)
        start = stop
    return ctx, pos, toks
