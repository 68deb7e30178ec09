"""``write_all(cfg)`` / ``inspect(...)``: the whole ``sparsedict inspect`` run — pass, saved arrays, browser, exports."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from sparsedict.inspect.config import InspectConfig
from sparsedict.inspect.run import _names, collect, load_dictionaries


def _delphi_tokens(store, n_contexts: int) -> np.ndarray:
    """Token ids ``[n_contexts, T]`` of the cache's first contexts (one shard's tokens file at a time)."""
    parts, have = [], 0
    for s in range(len(store.manifest["shards"])):
        if have >= n_contexts:
            break
        ids = store.tokens([s])["token_ids"].numpy()
        parts.append(ids[: n_contexts - have])
        have += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros((0, store.manifest["context_length"]), np.int32)


def write_all(cfg: InspectConfig, dictionaries: dict[str, Any] | None = None) -> Path:
    """Inspect, save ``<out>/<name>/inspect.{safetensors,json}``, write the browser and the exports asked for.

    Returns ``<out>/index.html`` (the browser), or ``<out>`` when ``cfg.html`` is off.
    """
    from sparsedict.cache import ActivationStore, read_manifest
    from sparsedict.cache.manifest import hookpoint_dir
    from sparsedict.inspect.browser import write_browser
    from sparsedict.inspect.export import DelphiSpill, write_neuronpedia
    from sparsedict.inspect.result import locate
    from sparsedict.inspect.tokens import token_texts

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dictionaries = dictionaries if dictionaries is not None else load_dictionaries(cfg)
    sinks: dict[str, DelphiSpill] = {}
    if cfg.delphi:
        for name, d in zip(_names(list(dictionaries)), dictionaries.values()):
            sinks[name] = DelphiSpill(out / name / "delphi", hookpoint_dir(d.cfg.hookpoint), d.n_latents,
                                      cfg.delphi_splits)  # fmt: skip
    results, tok = collect(cfg, dictionaries, sinks)
    texts = token_texts(tok)
    t0 = time.perf_counter()
    for name, r in results.items():
        r.save(out / name)
    index = write_browser(out, results, texts, set(tok.all_special_ids)) if cfg.html else out
    for name, r in results.items():
        r.meta["seconds"]["browser_all"] = time.perf_counter() - t0
        if cfg.neuronpedia:
            write_neuronpedia(out / name / "neuronpedia", r, texts, cfg.neuronpedia_model or r.meta["cache_model"],
                              cfg.neuronpedia_set or f"sparsedict-{name}")  # fmt: skip
        if name in sinks:
            from sparsedict.lm import resolve_model_path

            store = ActivationStore(cfg.cache, r.meta["hookpoint"], batch_size=1, loop=False)
            last_ctx = int(locate(store, np.array([r.tokens - 1]), 0)[0][0]) if r.tokens else -1
            manifest = read_manifest(cfg.cache)
            ds = manifest.get("dataset", {})
            sinks[name].finish(_delphi_tokens(store, last_ctx + 1), {
                "dataset_repo": ds.get("name", ""), "dataset_split": ds.get("split", ""),
                "dataset_name": ds.get("config") or "", "dataset_column": ds.get("text_column", "text"),
                "batch_size": cfg.batch_rows, "cache_ctx_len": manifest["context_length"], "n_tokens": r.tokens,
                "n_splits": cfg.delphi_splits, "model_name": resolve_model_path(r.meta["model"]),
            })  # fmt: skip
        r.save(out / name)
    return index


def inspect(
    cfg: InspectConfig | None = None, /, dictionaries: dict[str, Any] | None = None, **fields
) -> Path:
    """Inspect checkpoints over a cache and write the outputs; returns the path of ``index.html``.

    ``inspect(checkpoints=[path], cache=dir, out=dir)`` or ``inspect(InspectConfig(...))``; keyword
    fields override the config's. ``dictionaries`` (``{name: Dictionary}``) inspects models in memory.
    """
    cfg = dataclasses.replace(cfg, **fields) if cfg is not None else InspectConfig(**fields)
    return write_all(cfg, dictionaries)
