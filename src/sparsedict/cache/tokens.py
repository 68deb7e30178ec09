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
import torch

from sparsedict.cache.config import CacheConfig
from sparsedict.cache.manifest import read_manifest

RULES = ("pad", "bos", "first_n", "special")
"""Exclusion rules, applied in this order; each dropped position is counted under the first rule."""
RULE_KEYS = ("prepend_bos", "exclude_bos", "exclude_first_n", "exclude_special")
"""The config fields that set the exclusion rules (recorded in the manifest's ``exclusions.rules``)."""


@dataclass(frozen=True)
class Exclusions:
    """Which positions of a context a cache leaves out (and a dictionary trained on it never saw).

    ``bos``: the BOS id, excluded wherever it occurs (None: no BOS rule); ``first_n``: positions ``t < first_n``;
    ``special``: special-token ids excluded wherever they occur. Recorded with every dictionary trained on the
    cache (:meth:`record`, ``meta["exclusions"]``), so splicing it later replaces the same positions.
    """

    rules: dict
    """The cache's rule fields (:data:`RULE_KEYS`)."""
    bos: int | None = None
    first_n: int = 0
    special: tuple[int, ...] = ()

    @classmethod
    def make(cls, rules: dict, bos_id: int | None, special_ids) -> Exclusions:
        rules = {k: rules.get(k) for k in RULE_KEYS}
        bos = bos_id if rules["prepend_bos"] and rules["exclude_bos"] else None
        special = tuple(sorted(int(i) for i in special_ids)) if rules["exclude_special"] else ()
        return cls(rules, None if bos is None else int(bos), int(rules["exclude_first_n"] or 0), special)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Exclusions:
        tok = manifest.get("tokenizer", {})
        return cls.make(manifest["exclusions"]["rules"], tok.get("bos_id"), tok.get("special_ids") or ())

    @classmethod
    def from_meta(cls, meta: dict) -> Exclusions | None:
        """The rules a checkpoint records (``meta["exclusions"]``), else its training cache's when still on disk."""
        rec = meta.get("exclusions")
        if isinstance(rec, dict) and "bos_id" in rec:
            return cls.make(rec.get("rules", {}), rec["bos_id"], rec.get("special_ids") or ())
        path = meta.get("cache")
        if path and (Path(path) / "manifest.json").exists():
            return cls.from_manifest(read_manifest(path))
        return None

    def record(self) -> dict:
        """What ``meta["exclusions"]`` holds (read back by :meth:`from_meta`)."""
        return {"rules": dict(self.rules), "bos_id": self.bos, "special_ids": list(self.special)}

    def rule_masks(
        self, ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """``[..., T]`` bool mask of the positions each rule (bos, first_n, special) excludes; None: rule off.

        ``positions`` (broadcastable to ``ids``) are the tokens' positions in their context, by default
        ``0 … T−1`` (a forward over a key-value cache passes its own).
        """
        t = ids.shape[-1]
        pos = torch.arange(t, device=ids.device) if positions is None else positions.to(ids.device)
        return {
            "bos": ids == self.bos if self.bos is not None else None,
            "first_n": (pos < self.first_n).expand(ids.shape),
            "special": torch.isin(ids, torch.tensor(self.special, dtype=ids.dtype, device=ids.device))
            if self.special
            else None,
        }

    def keep(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``[..., T]`` bool: the positions a dictionary trained on this cache reads (padding excluded)."""
        keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        if attention_mask is not None:
            keep &= attention_mask.to(ids.device).bool()
        for mask in self.rule_masks(ids, positions).values():
            if mask is not None:
                keep &= ~mask
        return keep


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
        self.exclusions = Exclusions.make(
            {k: getattr(cfg, k) for k in RULE_KEYS}, tokenizer.bos_token_id, set(tokenizer.all_special_ids)
        )
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
        rules = self.exclusions.rule_masks(torch.from_numpy(ids))
        for name, mask in rules.items():
            if mask is None:
                dropped[name] = 0
                continue
            hit = keep & mask.numpy()
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
