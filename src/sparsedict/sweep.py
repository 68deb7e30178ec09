"""Sparsity sweeps: train many dictionaries in one data pass, evaluate them, plot L0 vs FVU / CE recovered.

Each ``sweep`` entry is ``arch:field=v1,v2,...`` (e.g. ``topk:k=8,16,32``, ``relu:l1_coefficient=1,3,10``)
and may add fixed fields after ``;`` (``batchtopk:k=16,32;aux_alpha=0``). Every point is one dictionary;
all of them train together in one :class:`~sparsedict.train.Trainer` pass over one cache (one batch read
shared by all), are saved, evaluated on held-out tokens by :func:`sparsedict.eval.evaluate.evaluate`
and drawn per architecture: ``pareto.json`` (every point with its metrics) and ``pareto.png``.
``sparsedict bench pareto`` runs it from the command line. It trains, so it sits above ``train`` and
``eval``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsedict.cache.config import CacheConfig
from sparsedict.eval.evaluate import EvalConfig
from sparsedict.train.config import TrainConfig

DEFAULT_SWEEPS = ["topk:k=8,16,32", "batchtopk:k=8,16,32", "relu:l1_coefficient=1,3,10"]


@dataclass
class ParetoConfig:
    """A sweep of dictionaries on one cache (the flags of ``sparsedict bench pareto``)."""

    sweep: list[str] = field(default_factory=lambda: list(DEFAULT_SWEEPS))
    """Sweep entries ``arch:field=v1,v2[;fixed=value]``; unregistered architectures are an error."""
    expansion: int = 8
    """Width as a multiple of d (every point; a sweep entry may set its own)."""
    out_dir: str = "runs/pareto"
    """Where the cache (if made here), checkpoints, pareto.json and pareto.png go."""
    cache_dir: str = ""
    """An existing training activation cache; empty: cache ``cache`` (into <out_dir>/cache unless
    cache.out_dir is set)."""
    cache: CacheConfig = field(
        default_factory=lambda: CacheConfig(hookpoints=["resid_post.6"], out_dir="", progress=False)
    )
    """The training activations; the sweep trains on cache.hookpoints, which must name one hookpoint
    (with cache_dir, the hookpoint read from that cache)."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=1024, optimizer="adam", normalise_inputs="sqrt_d", log_every=50, out_dir=""
        )
    )
    """How every point trains (checkpoints into <out_dir>/train unless train.out_dir is set)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_tokens=10_000, splice_tokens=1_024))
    """The held-out evaluation of every point (eval.cache: a held-out cache; empty: built by the
    evaluator with the training cache's settings on split eval.split)."""

    def __post_init__(self) -> None:
        if len(self.cache.hookpoints) != 1:
            raise ValueError(f"cache.hookpoints must name the one hookpoint the sweep trains on, got "
                             f"{self.cache.hookpoints}")  # fmt: skip
        if self.eval.checkpoints:
            raise ValueError("eval.checkpoints is filled by the sweep (its trained points); leave it empty")


def parse_sweep(entry: str) -> list[tuple[str, dict[str, Any]]]:
    """``"topk:k=8,16;aux_alpha=0"`` -> ``[("topk", {"k": 8, "aux_alpha": 0}), ("topk", {"k": 16, ...})]``."""
    import yaml

    from sparsedict.dictionaries import lookup

    arch, sep, rest = entry.partition(":")
    if not sep or "=" not in rest:
        raise ValueError(f"sweep entry {entry!r} must look like 'arch:field=v1,v2' (e.g. 'topk:k=8,16,32')")
    _, cfg_cls = lookup(arch.strip())
    swept, *fixed = rest.split(";")
    key, _, values = swept.partition("=")
    extra = {}
    for item in fixed:
        k, _, v = item.partition("=")
        extra[k.strip()] = yaml.safe_load(v)
    fields = cfg_cls.__dataclass_fields__
    for k in [key.strip(), *extra]:
        if k not in fields:
            raise ValueError(f"{arch} has no config field {k!r}; fields: {', '.join(fields)}")
    return [(arch.strip(), {key.strip(): yaml.safe_load(v), **extra}) for v in values.split(",") if v.strip()]


def run_pareto(cfg: ParetoConfig) -> dict[str, Any]:
    """Cache (if needed), train every sweep point in one pass, evaluate, write pareto.json and pareto.png."""
    import torch

    from sparsedict.cache import ActivationStore, cache_activations
    from sparsedict.cache.manifest import read_manifest
    from sparsedict.config import from_dict
    from sparsedict.dictionaries import build, lookup
    from sparsedict.eval.evaluate import evaluate
    from sparsedict.eval.plot import plot_pareto
    from sparsedict.train import Trainer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out_dir)
    hookpoint = cfg.cache.hookpoints[0]
    points = [p for entry in cfg.sweep for p in parse_sweep(entry)]
    if not points:
        raise ValueError("the sweep is empty: give --sweep 'topk:k=8,16,32' (repeatable)")
    if cfg.train.source == "live":
        raise ValueError(
            "bench pareto trains from a cache; to train live use `sparsedict train --train.source live`"
        )
    if cfg.cache_dir:
        cache = Path(cfg.cache_dir)
    else:
        cache = cache_activations(
            dataclasses.replace(cfg.cache, out_dir=cfg.cache.out_dir or str(out / "cache"))
        )
    manifest = read_manifest(cache)
    shuffle = "window" if cfg.train.shuffle == "window" else "global"
    store = ActivationStore(
        cache, hookpoint, batch_size=cfg.train.batch_size, seed=cfg.train.seed, shuffle=shuffle
    )
    torch.manual_seed(cfg.train.seed)
    dictionaries, params = {}, {}
    for arch, values in points:
        name = f"{arch}-" + "-".join(f"{k}{v}" for k, v in values.items())
        _, cfg_cls = lookup(arch)
        dcfg = from_dict(
            cfg_cls, {"hookpoint": hookpoint, "expansion": cfg.expansion, "name": name, **values}
        )
        dictionaries[name] = build(dcfg.resolved(store.d_in))
        params[name] = values
    tcfg = dataclasses.replace(cfg.train, out_dir=cfg.train.out_dir or str(out / "train"),
                               init_rows=min(cfg.train.init_rows, store.n_rows))  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(dictionaries, {(hookpoint, ""): store}, tcfg)
    trainer.fit(resume=False)
    train_seconds = time.perf_counter() - t0
    meta = {"cache": str(cache), "exclusions": manifest["exclusions"]["rules"]}
    paths = trainer.save(meta)
    records = evaluate(dataclasses.replace(cfg.eval, checkpoints=[str(p) for p in paths.values()]))
    by_path = {r["checkpoint"]: r for r in records}
    rows = []
    for name, path in paths.items():
        r = by_path[str(path)]
        rows.append({"name": name, "architecture": r["architecture"], "params": params[name],
                     "checkpoint": str(path), **r["metrics"]})  # fmt: skip
    result = {
        "config": dataclasses.asdict(cfg),
        "train": {
            "cache": str(cache),
            "rows": store.n_rows,
            "steps": trainer.step,
            "tokens": trainer.tokens,
            "seconds": train_seconds,
            "dictionaries": len(dictionaries),
        },
        "eval": {
            "cache": records[0]["data"]["cache"],
            "recon_tokens": records[0]["data"]["recon_tokens"],
            "splice_contexts": records[0]["data"].get("splice_contexts"),
        },
        "points": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(result, indent=1, default=str))
    plot_pareto(
        rows, out / "pareto.png", title=f"{manifest['model']['id']} {hookpoint}, {trainer.tokens} tokens"
    )
    return result
