"""Text -> fixed-length contexts -> shard plans, with the exclusion masks.

Documents are tokenised without special tokens, chunked into contexts of ``context_length`` tokens
(``[BOS] + context_length - 1`` document tokens when ``prepend_bos``), never packed across documents;
the last chunk of a document is right-padded. Every rank of a distributed cache runs the same plan and
computes the shards whose index it owns, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsedict.cache.config import CacheConfig

RULES = ("pad", "bos", "first_n", "special")
"""Exclusion rules, applied in this order; each dropped position is counted under the first rule."""


def load_texts(cfg: CacheConfig) -> Iterator[str]:
    """Yield document texts of ``cfg.dataset`` / ``cfg.split`` / ``cfg.text_column`` in order."""
    import datasets

    if cfg.dataset in ("embedded", "embedded-sample"):
        from sparsedict.corpus import load_corpus

        ds = load_corpus(cfg.split, sample=cfg.dataset == "embedded-sample")
    else:
        path = Path(cfg.dataset)
        builders = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
        if path.is_file() and path.suffix in builders:
            ds = datasets.load_dataset(
                builders[path.suffix], data_files=str(path), split="train", streaming=cfg.streaming
            )
        else:
            try:
                ds = datasets.load_dataset(
                    cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=cfg.streaming
                )
            except Exception as err:
                raise FileNotFoundError(
                    f"could not load dataset {cfg.dataset!r} (config {cfg.dataset_config!r}, split "
                    f"{cfg.split!r}): {err}. Give 'embedded', a local .json/.jsonl/.txt/.parquet file, or a "
                    "datasets name available offline."
                ) from err
    columns = ds.column_names or []
    if columns and cfg.text_column not in columns:
        raise KeyError(f"dataset {cfg.dataset!r} has no column {cfg.text_column!r}; columns: {columns}")
    for row in ds:
        text = row[cfg.text_column]
        if text:
            yield text


@dataclass
class ShardPlan:
    """The contexts of one shard and which of their positions are cached."""

    index: int
    """Shard index (0, 1, ...)."""
    first_context: int
    """Global index of the shard's first context."""
    token_ids: np.ndarray
    """[n_ctx, T] int32 token ids (pad id after the end of a document)."""
    attention_mask: np.ndarray
    """[n_ctx, T] bool, False on padding."""
    keep: np.ndarray
    """[n_ctx, T] bool, True where the position is cached (a row)."""
    doc_index: np.ndarray
    """[n_ctx] int64 index of the source document."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Positions dropped per rule (see RULES)."""

    @property
    def rows(self) -> int:
        return int(self.keep.sum())


class ContextBuilder:
    """Turns documents into contexts and masks for one tokenizer and config."""

    def __init__(self, cfg: CacheConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id if cfg.prepend_bos else None
        self.pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.body = cfg.context_length - (1 if self.bos is not None else 0)

    def contexts(self, ids: list[int]) -> list[list[int]]:
        """Chunk one document's token ids into contexts (each with BOS first when enabled)."""
        head = [self.bos] if self.bos is not None else []
        return [head + ids[i : i + self.body] for i in range(0, len(ids), self.body)]

    def masks(self, ctx: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
        """Pad ``ctx`` to ``[n, T]``; return ``(token_ids, attention_mask, keep, dropped_per_rule)``."""
        n, t = len(ctx), self.cfg.context_length
        ids = np.full((n, t), self.pad, dtype=np.int32)
        attn = np.zeros((n, t), dtype=bool)
        for i, c in enumerate(ctx):
            ids[i, : len(c)] = c
            attn[i, : len(c)] = True
        keep = attn.copy()
        dropped = {"pad": int((~attn).sum())}
        rules = {
            "bos": (ids == self.bos) if (self.cfg.exclude_bos and self.bos is not None) else None,
            "first_n": np.arange(t)[None, :] < self.cfg.exclude_first_n,
            "special": np.isin(ids, self.special) if self.cfg.exclude_special else None,
        }
        for name, mask in rules.items():
            if mask is None:
                dropped[name] = 0
                continue
            hit = keep & mask
            dropped[name] = int(hit.sum())
            keep &= ~hit
        return ids, attn, keep, dropped


def plan_shards(cfg: CacheConfig, tokenizer, texts: Iterator[str] | None = None) -> Iterator[ShardPlan]:
    """Yield the deterministic sequence of shard plans (up to ``cfg.max_tokens`` kept rows in total)."""
    builder = ContextBuilder(cfg, tokenizer)
    texts = load_texts(cfg) if texts is None else texts
    pending: list[list[int]] = []
    pending_docs: list[int] = []
    total, shard, first = 0, 0, 0
    limit = cfg.max_tokens if cfg.max_tokens is not None else float("inf")

    def take(ctx: list[list[int]], docs: list[int]) -> ShardPlan:
        nonlocal shard, first, total
        ids, attn, keep, dropped = builder.masks(ctx)
        plan = ShardPlan(shard, first, ids, attn, keep, np.asarray(docs, dtype=np.int64), dropped)
        shard, first, total = shard + 1, first + len(ctx), total + plan.rows
        return plan

    def batches() -> Iterator[tuple[int, list[int]]]:
        doc, chunk = 0, []
        for text in texts:
            chunk.append(text)
            if len(chunk) == 64:
                for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
                    yield doc, ids
                    doc += 1
                chunk = []
        if chunk:
            for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
                yield doc, ids
                doc += 1

    pending_rows = 0
    for doc, ids in batches():
        for ctx in builder.contexts(ids):
            _, _, keep, _ = builder.masks([ctx])
            rows = int(keep.sum())
            if rows == 0:
                continue
            need = limit - total - pending_rows
            if rows >= need:  # truncate the last context so exactly max_tokens rows are kept
                cut = int(np.flatnonzero(keep[0])[int(need) - 1]) + 1
                pending.append(ctx[:cut])
                pending_docs.append(doc)
                yield take(pending, pending_docs)
                return
            pending.append(ctx)
            pending_docs.append(doc)
            pending_rows += rows
            if pending_rows >= cfg.shard_rows:
                yield take(pending, pending_docs)
                pending, pending_docs, pending_rows = [], [], 0
    if pending:
        yield take(pending, pending_docs)
