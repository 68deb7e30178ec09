"""``sparsedict bench pareto``: train a sparsity sweep in one data pass, evaluate it, plot L0 vs FVU / CE recovered.

Each ``--sweep`` entry is ``arch:field=v1,v2,...`` (e.g. ``topk:k=8,16,32``, ``relu:l1_coefficient=1,3,10``)
and may add fixed fields after ``;`` (``batchtopk:k=16,32;aux_alpha=0``). Every point is one dictionary;
all of them train together in one :class:`~sparsedict.train.Trainer` pass over one cache (one batch read
shared by all), are saved, evaluated on held-out tokens by :func:`sparsedict.eval.evaluate.evaluate`
and drawn per architecture: ``pareto.json`` (every point with its metrics) and ``pareto.png``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SWEEPS = ["topk:k=8,16,32", "batchtopk:k=8,16,32", "relu:l1_coefficient=1,3,10"]


@dataclass
class ParetoConfig:
    """A sweep of dictionaries on one cache (the flags of ``sparsedict bench pareto``)."""

    cache: str = ""
    """Training activation cache; empty: cache ``max_tokens`` of ``model``/``dataset`` at ``hookpoint``."""
    eval_cache: str = ""
    """Held-out cache; empty: built by the evaluator with the training cache's settings on split 'test'."""
    model: str = "smollm2-135m"
    """Model to cache (when ``cache`` is empty)."""
    dataset: str = "embedded"
    """Dataset to cache (when ``cache`` is empty)."""
    hookpoint: str = "resid_post.6"
    """Hookpoint the sweep trains on."""
    max_tokens: int = 50_000
    """Training tokens to cache (when ``cache`` is empty)."""
    context_length: int = 128
    """Context length of a cache made here."""
    sweep: list[str] = field(default_factory=lambda: list(DEFAULT_SWEEPS))
    """Sweep entries ``arch:field=v1,v2[;fixed=value]``; unregistered architectures are an error."""
    expansion: int = 8
    """Width as a multiple of d (every point)."""
    batch_size: int = 1024
    """Training batch (tokens per step)."""
    epochs: float = 1.0
    """Passes over the training cache."""
    max_steps: int = 0
    """Stop after this many steps (0: from epochs)."""
    optimizer: str = "adam"
    """'adam' or 'signum_sf'."""
    lr: float = 0.0
    """Learning rate (0: the width rule)."""
    normalise_inputs: str = "sqrt_d"
    """Input normalisation ('none', 'sqrt_d', 'unit_msn'); folded into the saved weights."""
    eval_tokens: int = 10_000
    """Held-out tokens for reconstruction metrics."""
    splice_tokens: int = 1_024
    """Held-out tokens spliced for CE recovered (0: no splicing)."""
    out_dir: str = "runs/pareto"
    """Where the cache (if made here), checkpoints, pareto.json and pareto.png go."""
    device: str = "cpu"
    """Device."""
    threads: int = 0
    """CPU threads (0: torch default)."""
    seed: int = 0
    """Seed for initialisation and data order."""


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

    from sparsedict.cache import ActivationStore, CacheConfig, cache_activations
    from sparsedict.cache.manifest import read_manifest
    from sparsedict.config import from_dict
    from sparsedict.dictionaries import build, lookup
    from sparsedict.eval.evaluate import EvalConfig, evaluate
    from sparsedict.eval.plot import plot_pareto
    from sparsedict.train import TrainConfig, Trainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    points = [p for entry in cfg.sweep for p in parse_sweep(entry)]
    if not points:
        raise ValueError("the sweep is empty: give --sweep 'topk:k=8,16,32' (repeatable)")
    cache = Path(cfg.cache) if cfg.cache else cache_activations(CacheConfig(
        model=cfg.model, dataset=cfg.dataset, hookpoints=[cfg.hookpoint], max_tokens=cfg.max_tokens,
        context_length=cfg.context_length, out_dir=str(out / "cache"), device=cfg.device,
        num_threads=cfg.threads or None, progress=False))  # fmt: skip
    manifest = read_manifest(cache)
    store = ActivationStore(cache, cfg.hookpoint, batch_size=cfg.batch_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    dictionaries, params = {}, {}
    for arch, values in points:
        name = f"{arch}-" + "-".join(f"{k}{v}" for k, v in values.items())
        _, cfg_cls = lookup(arch)
        dcfg = from_dict(
            cfg_cls, {"hookpoint": cfg.hookpoint, "expansion": cfg.expansion, "name": name, **values}
        )
        dictionaries[name] = build(dcfg.resolved(store.d_in))
        params[name] = values
    tcfg = TrainConfig(batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr,
                       optimizer=cfg.optimizer, normalise_inputs=cfg.normalise_inputs, seed=cfg.seed,
                       device=cfg.device, threads=cfg.threads, out_dir=str(out / "train"),
                       init_rows=min(32768, store.n_rows), log_every=50)  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(dictionaries, {(cfg.hookpoint, ""): store}, tcfg)
    trainer.fit(resume=False)
    train_seconds = time.perf_counter() - t0
    meta = {"cache": str(cache), "exclusions": manifest["exclusions"]["rules"]}
    paths = trainer.save(meta)
    ecfg = EvalConfig(checkpoints=[str(p) for p in paths.values()], cache=cfg.eval_cache, max_tokens=cfg.eval_tokens,
                      splice_tokens=cfg.splice_tokens, device=cfg.device, threads=cfg.threads)  # fmt: skip
    records = evaluate(ecfg)
    by_path = {r["checkpoint"]: r for r in records}
    rows = []
    for name, path in paths.items():
        r = by_path[str(path)]
        rows.append({"name": name, "architecture": r["architecture"], "params": params[name],
                     "checkpoint": str(path), **r["metrics"]})  # fmt: skip
    result = {
        "config": cfg.__dict__,
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
        rows, out / "pareto.png", title=f"{manifest['model']['id']} {cfg.hookpoint}, {trainer.tokens} tokens"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    from sparsedict.config import parse_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "pareto":
        print("usage: sparsedict bench pareto [--sweep 'topk:k=8,16,32' ...] [--cache DIR] [...]\n"
              "(throughput and peer benchmarks: python benchmarks/throughput.py, benchmarks/peers.py)",
              file=sys.stderr)  # fmt: skip
        return 2
    cfg = parse_cli(
        ParetoConfig, argv[1:], prog="sparsedict bench pareto", description=__doc__.splitlines()[0]
    )
    from sparsedict.cache.manifest import CacheError

    try:
        result = run_pareto(cfg)
    except (FileNotFoundError, ValueError, KeyError, CacheError) as err:
        print(f"sparsedict bench pareto: {err}", file=sys.stderr)
        return 2
    for p in result["points"]:
        ce = p.get("ce_recovered")
        print(
            f"{p['name']:<32} L0 {p['l0']:8.2f}  FVU {p['fvu']:.4f}"
            + (f"  CE rec {ce:.4f}" if ce is not None else "")
        )
    print(f"wrote {Path(cfg.out_dir) / 'pareto.json'} and {Path(cfg.out_dir) / 'pareto.png'}")
    return 0
