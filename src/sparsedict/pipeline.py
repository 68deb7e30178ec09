"""Run a recipe end to end: cache (or resume caching) -> train -> save -> evaluate held-out.

This is what ``sparsedict train`` and ``torchrun -m sparsedict train`` execute. Every stage reads the
previous stage's output from disk, so an interrupted run restarts where it stopped. With ``train.source:
live`` no training cache is written: the model runs during training (:mod:`sparsedict.cache.live`) and the
checkpoint records the live source's position, so a restart resumes there too. It is a top-level module
(above ``train`` and ``eval``) because it runs both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from sparsedict import distributed
from sparsedict.cache import ActivationStore, cache_activations
from sparsedict.cache.live import live_sources
from sparsedict.cache.runner import forward_threads, model_device
from sparsedict.dictionaries import Dictionary, TranscoderSet, build, lookup
from sparsedict.eval.heldout import evaluate_heldout
from sparsedict.lm import load_model
from sparsedict.train.logging import RunLogger
from sparsedict.train.recipe import Recipe
from sparsedict.train.trainer import Trainer

__all__ = ["build_dictionaries", "evaluate_heldout", "open_live_sources", "open_sources", "run"]


def open_sources(recipe: Recipe, cache_dir: str | Path, batch_size: int, rank: int, world: int) -> dict:
    """One ActivationStore per distinct (hookpoint, target) pair of the recipe's dictionaries (a multi-layer
    entry's pair is the tuple of its layers' hookpoints: one store serving ``[B, L, d]`` batches), in the order
    ``train.shuffle`` names ('auto': global).

    The stores share ``train.shuffle_ram_gib`` (0: the automatic bound) equally; each prints its window on
    rank 0.
    """
    shuffle = "window" if recipe.train.shuffle == "window" else "global"
    keys = list(dict.fromkeys(cfg.source_key for cfg in recipe.dictionaries))
    gib = recipe.train.shuffle_ram_gib
    ram = int(gib * 2**30 / len(keys)) if gib else None
    sources = {}
    for hookpoint, target in keys:
        sources[(hookpoint, target)] = ActivationStore(
            cache_dir, hookpoint, target=target or None, batch_size=batch_size, seed=recipe.train.seed,
            rank=rank, world_size=world, max_ram_bytes=ram, ram_sources=len(keys), shuffle=shuffle,
        )  # fmt: skip
        if distributed.is_main():
            print(sources[(hookpoint, target)].window_summary(), file=sys.stderr, flush=True)
    return sources


def open_live_sources(recipe: Recipe, batch_size: int, rank: int, world: int) -> dict:
    """One LiveSource per distinct (hookpoint, target) pair (a multi-layer entry's pair is the tuple of its layers'
    hookpoints: ``[B, L, d]`` batches), all views of one stream of ``recipe.cache``: every hookpoint the
    dictionaries read comes from one forward of its model, which runs on ``cache.device``."""
    cache = recipe.cache
    model, tok = load_model(
        cache.model, str(model_device(cache, distributed.world_size())), cache.model_dtype
    )
    keys = [cfg.source_key for cfg in recipe.dictionaries]
    return live_sources(cache, keys, batch_size=batch_size, seed=recipe.train.seed, rank=rank, world_size=world,
                        model=model, tokenizer=tok)  # fmt: skip


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (what wandb records as the run's config)."""
    return {
        "train": dataclasses.asdict(recipe.train),
        "dictionaries": [cfg.to_dict() for cfg in recipe.dictionaries],
        "cache": dataclasses.asdict(recipe.cache) if recipe.cache is not None else None,
        "eval_cache": dataclasses.asdict(recipe.eval_cache) if recipe.eval_cache is not None else None,
        "source": recipe.source,
    }


def build_dictionaries(recipe: Recipe, sources: dict) -> dict[str, Dictionary | TranscoderSet]:
    """Each entry's dictionary; an entry with ``layers`` of a single-layer architecture is a transcoder set."""
    torch.manual_seed(recipe.train.seed)
    models = {}
    for cfg in recipe.dictionaries:
        src = sources[cfg.source_key]
        resolved = cfg.resolved(src.d_in, src.d_out)
        layered = cfg.layers and not lookup(cfg.architecture)[0].layered
        models[cfg.name] = TranscoderSet(resolved) if layered else build(resolved)
    return models


def run(recipe: Recipe, resume: bool = True) -> dict[str, Any]:
    """Cache, train, save and (with an eval_cache) evaluate; returns paths and held-out metrics.

    Under torchrun every rank caches both the training and the held-out activations (each writes its
    share of the shards), trains and saves; then the process group is torn down (:func:`distributed.destroy`,
    the last collective) and rank 0 alone evaluates the saved dictionaries, waiting on no other rank.
    Only rank 0's result holds ``"eval"``.
    """
    cfg = recipe.train
    rank, world, device = distributed.init(cfg.device, cfg.dist_timeout_min)
    cfg.device = device
    if recipe.cache is None:
        raise ValueError(f"{recipe.source}: a recipe needs a 'cache' section naming the training activations")
    live = cfg.source == "live"
    cache_dir = None if live else cache_activations(recipe.cache)
    eval_dir = cache_activations(recipe.eval_cache) if recipe.eval_cache is not None else None
    if live:  # the threads the cache runner would give the model's forward (caching above sets its own)
        torch.set_num_threads(forward_threads(recipe.cache, int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    def open_(batch_size: int, rank: int, world: int) -> dict:
        if live:
            return open_live_sources(recipe, batch_size, rank, world)
        return open_sources(recipe, cache_dir, batch_size, rank, world)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    # shard_latents: every rank owns a slice of the latents and reads the same (global) batch (live: every
    # rank runs the model on every context); data parallel: each rank reads its own part of every global batch
    sources = (
        open_(cfg.batch_size, 0, 1) if cfg.shard_latents else open_(cfg.batch_size // world, rank, world)
    )
    models = build_dictionaries(recipe, sources)
    trainer = Trainer(models, sources, cfg, logger=RunLogger(cfg, run_config=recipe_dict(recipe)))
    trainer.fit(resume=resume)
    paths = trainer.save({} if live else {"cache": str(cache_dir)})
    distributed.destroy()
    results: dict[str, Any] = {"paths": {k: str(v) for k, v in paths.items()}}
    if eval_dir is not None and rank == 0:
        results["eval"] = evaluate_heldout(paths, recipe, eval_dir=eval_dir)
    return results
