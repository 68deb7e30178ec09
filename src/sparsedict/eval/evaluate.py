"""Evaluate checkpoints on held-out tokens: reconstruction, sparsity and spliced-model metrics.

Data: a held-out activation cache (``cache``), or, without one, a held-out cache built on the fly with
the training cache's settings (context length, exclusion rules) on the held-out split (``split``),
stored under ``cache_dir()/eval-caches/<config hash>`` and reused next time. Reconstruction metrics
read the cached activations (up to ``max_tokens`` rows); the splice metrics rebuild the cached
contexts from their stored token ids and replace exactly the cached (kept) positions, so both use the
exclusion rules the dictionary was trained with. A checkpoint whose training cache used other rules
than the evaluation cache is refused.

Multi-layer dictionaries (cross-layer transcoders, transcoder sets): the reconstruction metrics come from the
cache's ``[B, L, d]`` batches of their layers (the whole, and ``layer<l>/fvu``, ``layer<l>/l0`` per layer); the
splice metrics are those of the replacement model (every output of the range replaced at once), with per-layer
splicing beside them as ``layer<l>/ce_recovered``, ``layer<l>/kl`` ... (:func:`~sparsedict.eval.splice.evaluate_replacement`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsedict.cache import ActivationStore, CacheConfig, cache_activations
from sparsedict.cache.manifest import read_manifest
from sparsedict.cache.store import read_tokens
from sparsedict.cache.tokens import RULE_KEYS, Exclusions
from sparsedict.config import from_dict
from sparsedict.dictionaries import Dictionary, from_pretrained
from sparsedict.eval.heldout import dead_note, reconstruction_stats
from sparsedict.eval.splice import Contexts, evaluate_replacement, evaluate_splicing, replaced_hookpoint
from sparsedict.lm import cache_dir, load_model
from sparsedict.train.config import TrainConfig

TRAINING_DEAD_TOKENS = TrainConfig.dead_tokens
"""The trainer's default dead window, for checkpoints that do not record theirs (``meta["dead_tokens"]``)."""


@dataclass
class EvalConfig:
    """What to evaluate and on which held-out data (the flags of ``sparsedict eval``)."""

    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint directories (any format ``from_pretrained`` reads)."""
    cache: str = ""
    """Held-out activation cache; empty: build one from the training cache's settings on ``split``."""
    model: str = ""
    """Model for splicing and on-the-fly caching (default: the cache's / training cache's model)."""
    hookpoint: str = ""
    """Hookpoint for checkpoints whose config names none (some peer formats)."""
    dataset: str = ""
    """Dataset for an on-the-fly held-out cache (default: the training cache's dataset)."""
    split: str = "test"
    """Held-out split for an on-the-fly cache (the embedded corpus holds out 'test')."""
    max_tokens: int = 20_000
    """Held-out tokens (kept rows) for the reconstruction metrics. The dead fraction counts latents with no
    firing in these tokens; below the training dead window (10M tokens by default) the table says so."""
    splice_tokens: int = 2_048
    """Held-out tokens spliced into the model for CE/KL (0 turns splicing off)."""
    batch_size: int = 4
    """Contexts per LM forward when splicing."""
    mean_ablation: bool = True
    """Also run the mean-ablation baseline (mean of the held-out activations at the hookpoint)."""
    zero_all_positions: bool = False
    """Also run SAELens' zero-ablation baseline, which zeroes every position (BOS and attention sinks
    included), for CE recovered comparable with SAELens/SAEBench (``ce_recovered_zero_all``). The default
    baselines replace only the positions the dictionary replaces."""
    device: str = "cpu"
    """Device for the model and dictionaries."""
    threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    json_out: str = ""
    """Write the records (a JSON list) to this file."""

    def __post_init__(self) -> None:
        if isinstance(self.checkpoints, str):
            self.checkpoints = [self.checkpoints]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.splice_tokens < 0:
            raise ValueError(f"splice_tokens must be >= 0 (0 = no splicing), got {self.splice_tokens}")


def _rules_of_manifest(manifest: dict) -> dict:
    return Exclusions.from_manifest(manifest).rules


def training_cache(meta: dict) -> dict | None:
    """The manifest of the cache a checkpoint was trained on (``meta["cache"]``), when still on disk."""
    path = meta.get("cache")
    if not path or not (Path(path) / "manifest.json").exists():
        return None
    return read_manifest(path)


def training_rules(meta: dict) -> dict | None:
    """Exclusion rules a checkpoint was trained with: ``meta["exclusions"]`` or its training cache's."""
    if isinstance(meta.get("exclusions"), dict) and "bos_id" not in meta["exclusions"]:  # older checkpoints
        rules = meta["exclusions"].get("rules", meta["exclusions"])
        return {k: rules.get(k) for k in RULE_KEYS}
    found = Exclusions.from_meta(meta)
    return found.rules if found else None


def heldout_cache(cfg: EvalConfig, dictionaries: dict[str, Dictionary]) -> Path:
    """``cfg.cache``, or a held-out cache made with the training cache's settings (or those of a live run's data,
    ``meta["live"]``) on ``cfg.split``."""
    if cfg.cache:
        return Path(cfg.cache)
    base: dict[str, Any] = {}
    for d in dictionaries.values():
        manifest = training_cache(d.meta) or d.meta.get("live")
        if manifest:
            base = dict(manifest["config"])
            break
    else:
        warnings.warn(
            "no training cache found in the checkpoints' meta: using CacheConfig defaults", stacklevel=2
        )
    hps: list[str] = []
    for d in dictionaries.values():
        for h in [*d.cfg.hookpoints, *(d.cfg.targets if d.cfg.is_transcoder else [])]:
            if h and h not in hps:
                hps.append(h)
    base.update(hookpoints=hps, split=cfg.split, max_tokens=max(cfg.max_tokens, cfg.splice_tokens))
    if cfg.model:
        base["model"] = cfg.model
    if cfg.dataset:
        base["dataset"] = cfg.dataset
    known = {f.name for f in dataclasses.fields(CacheConfig)}
    cache_cfg = from_dict(CacheConfig, {k: v for k, v in base.items() if k in known})
    cache_cfg.out_dir = str(cache_dir() / "eval-caches" / cache_cfg.config_hash())
    cache_cfg.device, cache_cfg.num_threads = cfg.device, cfg.threads or None
    return cache_activations(cache_cfg)


def load_checkpoints(cfg: EvalConfig) -> dict[str, Dictionary]:
    out: dict[str, Dictionary] = {}
    for path in cfg.checkpoints:
        d = from_pretrained(path, device=cfg.device)
        if not d.cfg.hookpoint:
            if not cfg.hookpoint:
                raise ValueError(f"{path} names no hookpoint: pass --hookpoint (e.g. resid_post.6)")
            d.cfg.hookpoint = cfg.hookpoint
        out[str(path)] = d
    return out


def evaluate(cfg: EvalConfig, dictionaries: dict[str, Dictionary] | None = None) -> list[dict[str, Any]]:
    """One record per checkpoint: config, data provenance, metrics and distributions."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dictionaries = dictionaries if dictionaries is not None else load_checkpoints(cfg)
    if not dictionaries:
        raise ValueError("no checkpoints given: sparsedict eval <checkpoint> [<checkpoint> ...]")
    root = heldout_cache(cfg, dictionaries)
    manifest = read_manifest(root)
    rules = _rules_of_manifest(manifest)
    for name, d in dictionaries.items():
        trained_on = d.meta.get("cache")
        if trained_on and Path(trained_on).resolve() == root.resolve():
            warnings.warn(f"{name}: evaluating on its own training cache {root}; the metrics are not held out",
                          stacklevel=2)  # fmt: skip
        trained = training_rules(d.meta)
        if trained is None:
            warnings.warn(f"{name}: training exclusion rules unknown; evaluating with the cache's {rules}",
                          stacklevel=2)  # fmt: skip
        elif trained != rules:
            raise ValueError(
                f"{name} was trained with exclusion rules {trained} but the held-out cache {root} uses {rules}: "
                "cache the held-out split with the training cache's settings (or omit --cache to let eval do it)"
            )
    records: dict[str, dict[str, Any]] = {}
    means: dict[str, torch.Tensor] = {}
    for name, d in dictionaries.items():
        t0 = time.perf_counter()
        hookpoint, target = d.cfg.source_key
        store = ActivationStore(
            root, hookpoint, target=target or None, batch_size=4096, drop_last=False, loop=False
        )
        stats = reconstruction_stats(d, store, max_rows=cfg.max_tokens, device=cfg.device)
        if cfg.mean_ablation:
            for replaced in d.cfg.targets if d.layered else [replaced_hookpoint(d)]:
                means[replaced] = store.norm_stats(replaced)["mean"]
        window = int(d.meta.get("dead_tokens") or TRAINING_DEAD_TOKENS)
        records[name] = {
            "checkpoint": name,
            "architecture": d.architecture,
            "layers": d.layers if d.layered else None,
            "config": d.cfg.to_dict(),
            "meta": d.meta,
            "data": {
                "cache": str(root),
                "config_hash": manifest.get("config_hash"),
                "model": manifest["model"],
                "dataset": manifest["dataset"],
                "context_length": manifest["context_length"],
                "exclusions": rules,
                "recon_tokens": stats.tokens,
                "dead_window_tokens": stats.tokens,
                "training_dead_tokens": window,
                "dead_note": dead_note(stats.tokens, window),
            },
            "metrics": stats.summary(),
            "distributions": stats.distributions(),
            "seconds": {"reconstruction": time.perf_counter() - t0},
        }
    if cfg.splice_tokens:
        _splice_into(records, cfg, dictionaries, root, manifest, means)
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(list(records.values()), indent=1, default=str))
    return list(records.values())


def cache_contexts(root: Path, max_tokens: int | None) -> Contexts:
    """The stored contexts of a cache (token ids, attention mask, kept positions), first ``max_tokens``."""
    manifest = read_manifest(root)
    parts: dict[str, list[torch.Tensor]] = {}
    kept = 0
    for index in range(len(manifest["shards"])):
        data = read_tokens(root, manifest, index)
        for key in ("token_ids", "attention_mask", "keep"):
            parts.setdefault(key, []).append(data[key])
        kept += int(data["keep"].sum())
        if max_tokens is not None and kept >= max_tokens:
            break
    ctx = Contexts(*(torch.cat(parts[k]) for k in ("token_ids", "attention_mask", "keep")))
    return ctx.head(max_tokens)


def _splice_into(records, cfg: EvalConfig, dictionaries, root: Path, manifest: dict, means: dict) -> None:
    t0 = time.perf_counter()
    model, _ = load_model(cfg.model or manifest["model"]["id"], device=cfg.device,
                          dtype=manifest["model"].get("dtype", "float32"))  # fmt: skip
    contexts = cache_contexts(root, cfg.splice_tokens)
    single = {k: d for k, d in dictionaries.items() if not d.layered}
    layered = {k: d for k, d in dictionaries.items() if d.layered}
    kw = dict(batch_size=cfg.batch_size, means=means, mean_ablation=cfg.mean_ablation, device=cfg.device)
    stats = (
        evaluate_splicing(model, single, contexts, zero_all=cfg.zero_all_positions, **kw)[0] if single else {}
    )
    replaced = evaluate_replacement(model, layered, contexts, **kw) if layered else {}
    for name, variants in replaced.items():
        for variant, s in variants.items():
            prefix = "" if variant == "replacement" else f"{variant}/"
            records[name]["metrics"].update({prefix + k: v for k, v in s.summary().items()})
    seconds = time.perf_counter() - t0
    for name, s in stats.items():
        records[name]["metrics"].update(s.summary())
    for name in dictionaries:
        records[name]["data"].update(
            splice_contexts=len(contexts), splice_model=cfg.model or manifest["model"]["id"]
        )
        records[name]["seconds"]["splice_all_checkpoints"] = seconds
        if dictionaries[name].layered:
            records[name]["data"]["splice"] = (
                "replacement model (all layers at once); layer<l>/: that layer alone"
            )


COLUMNS = [("fvu", "FVU"), ("explained_variance", "EV"), ("mse", "MSE"), ("cosine", "cos"), ("l0", "L0"),
           ("dead_fraction", "dead"), ("dense_fraction", "dense"), ("ce_clean", "CE clean"),
           ("ce_spliced", "CE splice"), ("ce_zero_ablation", "CE zero"), ("ce_mean_ablation", "CE mean"),
           ("ce_recovered", "CE rec"), ("ce_recovered_zero_all", "CE rec (all-pos zero)"), ("delta_lm_loss", "ΔLM"), ("kl", "KL")]  # fmt: skip


def format_table(records: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per checkpoint, one column per headline metric."""
    cols = [(k, h) for k, h in COLUMNS if any(k in r["metrics"] for r in records)]
    head = ["checkpoint", "arch", *[h for _, h in cols]]
    rows = []
    for r in records:
        cells = [Path(r["checkpoint"]).name or r["checkpoint"], r["architecture"]]
        for key, _ in cols:
            v = r["metrics"].get(key)
            if v is None:
                cells.append("-")
            elif key in ("dead_fraction", "dense_fraction"):
                cells.append(f"{100 * v:.1f}%")
            elif key == "l0":
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{v:.4g}")
        rows.append(cells)
    text = _render(head, rows)
    if any(k == "dead_fraction" for k, _ in cols):
        notes = {r["data"]["dead_note"] for r in records if r.get("data", {}).get("dead_note")}
        text += "".join(f"\nnote: {n}" for n in sorted(notes))
    layered = [r for r in records if r.get("layers")]
    if layered:
        text += "\n\nper layer (CE rec / KL: that layer's output alone spliced; the row above: all at once)\n"
        head = ["checkpoint", "layer", "FVU", "L0", "CE rec", "KL"]
        rows = []
        for r in layered:
            m = r["metrics"]
            for layer in r["layers"]:
                cells = [m.get(f"layer{layer}/{k}") for k in ("fvu", "l0", "ce_recovered", "kl")]
                rows.append([Path(r["checkpoint"]).name or r["checkpoint"], str(layer)]
                            + ["-" if v is None else f"{v:.4g}" for v in cells])  # fmt: skip
        text += _render(head, rows)
    return text


def _render(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
