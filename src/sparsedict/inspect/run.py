"""``collect(cfg)``: load checkpoints, stream the cache once per hookpoint, add the logit lens and neighbours."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsedict.inspect.config import InspectConfig, parse_latents
from sparsedict.inspect.result import Inspection, locate
from sparsedict.inspect.stream import LatentStats, stream


def _names(keys: list[str]) -> list[str]:
    """Folder names for the checkpoints: their last path part, made safe and unique."""
    out: list[str] = []
    for key in keys:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(key)).name or str(key)).strip("-.") or "dictionary"
        name, i = base, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out.append(name)
    return out


def load_dictionaries(cfg: InspectConfig) -> dict[str, Any]:
    """``{checkpoint path: Dictionary}`` for ``cfg.checkpoints`` (on ``cfg.device``), as ``sparsedict eval`` loads them."""
    from sparsedict.eval.evaluate import EvalConfig, load_checkpoints

    return load_checkpoints(
        EvalConfig(checkpoints=list(cfg.checkpoints), hookpoint=cfg.hookpoint, device=cfg.device)
    )


def collect(cfg: InspectConfig, dictionaries: dict[str, Any] | None = None, sinks: dict | None = None
            ) -> tuple[dict[str, Inspection], Any]:  # fmt: skip
    """Run the pass and the lens; ``({folder name: Inspection} in checkpoint order, tokenizer)``.

    ``dictionaries`` (``{name: Dictionary}``) replaces loading ``cfg.checkpoints``; ``sinks`` maps a
    folder name to a callable receiving every firing during the pass (the delphi export).
    """
    from sparsedict.cache import ActivationStore, read_manifest
    from sparsedict.inspect.lens import logit_lens, nearest, residual_directions

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.cache:
        raise ValueError("no cache given: sparsedict inspect <checkpoint> --cache DIR (an activation cache)")
    dictionaries = dictionaries if dictionaries is not None else load_dictionaries(cfg)
    if not dictionaries:
        raise ValueError(
            "no checkpoints given: sparsedict inspect <checkpoint> [<checkpoint> ...] --cache DIR"
        )
    root = Path(cfg.cache)
    manifest = read_manifest(root)
    names = dict(zip(_names(list(dictionaries)), dictionaries.items()))
    groups: dict[str, list[tuple[str, Any, LatentStats]]] = {}
    for name, (_, d) in names.items():
        if getattr(d, "layered", False) or getattr(d.cfg, "layers", None):
            raise ValueError(
                f"{name}: a {d.architecture} over layers {list(d.cfg.layers)} reads several hookpoints per row; "
                "inspect reads one hookpoint per dictionary: inspect a single-layer dictionary"
            )
        d.eval()
        sel = parse_latents(cfg.latents, d.n_latents)
        stats = LatentStats(d.n_latents, cfg.top_n, cfg.samples, cfg.window, cfg.seed,
                            None if sel is None else torch.tensor(sel))  # fmt: skip
        stats.sink = (sinks or {}).get(name)
        groups.setdefault(d.cfg.hookpoint, []).append((name, d, stats))
    results: dict[str, Inspection] = {}
    for hookpoint, members in groups.items():
        store = ActivationStore(root, hookpoint, batch_size=1, loop=False)
        for name, d, _ in members:
            if store.d_in != d.d_in:
                raise ValueError(f"{name}: the dictionary takes d_in={d.d_in} but {hookpoint} in {root} has "
                                 f"d={store.d_in}: wrong cache or hookpoint")  # fmt: skip
        t0 = time.perf_counter()
        split: dict[str, float] = {}
        rows = stream(store, [(d, s) for _, d, s in members], cfg.tokens or None, cfg.batch_rows, cfg.device,
                      cfg.progress, split)  # fmt: skip
        seconds = time.perf_counter() - t0
        for name, d, stats in members:
            results[name] = _tables(name, d, stats, store, rows, cfg)
            results[name].meta["seconds"] = {"pass": seconds, "pass_shared_by": len(members),
                                             **{f"pass_{k}": v for k, v in split.items()}}  # fmt: skip
    from sparsedict.lm import load_model

    model_name = cfg.model or manifest["model"]["id"]
    model, tok = load_model(model_name, device=cfg.device)
    for name, (_, d) in names.items():
        r = results[name]
        t0 = time.perf_counter()
        latents = torch.from_numpy(r["latents"])
        w_dec = d.W_dec.detach()
        side = d.cfg.target if d.cfg.is_transcoder else d.cfg.hookpoint
        try:
            dirs, note = residual_directions(model, w_dec[latents.to(w_dec.device)], side)
        except KeyError as err:  # the hookpoint does not resolve in this model
            dirs, note = None, f"no logit lens: {err}"
        if dirs is not None:
            lens, lens_note = logit_lens(model, dirs, cfg.logits, len(tok))
            note = f"{note}; {lens_note}"
            r.arrays.update({f"lens_{k}": v.cpu().numpy() for k, v in lens.items()})
        ids, cos = nearest(w_dec, latents.to(w_dec.device), cfg.neighbours)
        r.arrays.update(near_ids=ids.cpu().numpy(), near_cos=cos.cpu().numpy())
        r.meta.update(lens=note, model=model_name)
        r.meta["seconds"]["lens_and_neighbours"] = time.perf_counter() - t0
    return results, tok


def _tables(name: str, d, stats: LatentStats, store, rows: int, cfg: InspectConfig) -> Inspection:
    """Arrays of one dictionary after the pass (rows located, window token ids gathered)."""
    arrays: dict[str, np.ndarray] = {
        "count": stats.count.numpy(), "total": stats.total.numpy(), "max": stats.max.numpy(),
        "hist": stats.hist.numpy(), "latents": stats.latents.numpy(),
    }  # fmt: skip
    if stats.hist_neg is not None:
        arrays["hist_neg"] = stats.hist_neg.numpy()
    for label, table in (("top", stats.top), ("sample", stats.sample)):
        shape = table.row.shape
        flat = table.row.reshape(-1).numpy()
        used = flat >= 0
        ctx = np.full(flat.shape, -1, dtype=np.int64)
        pos = np.full(flat.shape, -1, dtype=np.int64)
        toks = np.full((len(flat), 2 * cfg.window + 1), -1, dtype=np.int32)
        ctx[used], pos[used], toks[used] = locate(store, flat[used], cfg.window)
        arrays.update({f"{label}_value": table.value.numpy(), f"{label}_row": table.row.numpy(),
                       f"{label}_ctx": ctx.reshape(shape), f"{label}_pos": pos.reshape(shape),
                       f"{label}_window": table.window.numpy(),
                       f"{label}_tokens": toks.reshape(*shape, -1)})  # fmt: skip
    m = store.manifest
    meta = {
        "name": name, "architecture": d.architecture, "hookpoint": d.cfg.hookpoint,
        "target": d.cfg.target if d.cfg.is_transcoder else "", "n_latents": d.n_latents,
        "d_in": d.d_in, "d_out": d.d_out, "tokens": rows, "cache": str(store.root),
        "cache_model": m["model"]["id"], "dataset": m.get("dataset", {}),
        "context_length": m["context_length"], "exclusions": m.get("exclusions", {}).get("rules", {}),
        "hookpoint_info": m["hookpoints"].get(store.hookpoint, {}), "settings": dataclasses.asdict(cfg),
        "checkpoint_meta": getattr(d, "meta", {}) or {},
    }  # fmt: skip
    return Inspection(meta, arrays)
