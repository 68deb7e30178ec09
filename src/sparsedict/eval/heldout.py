"""Reconstruction metrics of dictionaries over activation batches, and the held-out pass that ends a run.

:func:`reconstruction_stats` feeds a dictionary's reconstructions of ``(x, y)`` batches into
:class:`~sparsedict.metrics.ReconstructionStats`. :func:`evaluate_heldout` reloads every saved dictionary,
measures it on the recipe's held-out cache and records the metrics in the checkpoint (``meta["eval"]`` of
``config.json`` and the model card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsedict.cache import ActivationStore, cache_activations
from sparsedict.dictionaries import from_pretrained, reconstruct
from sparsedict.formats import native
from sparsedict.metrics import ReconstructionStats


@torch.no_grad()
def reconstruction_stats(
    model, batches, max_rows: int | None = None, device: str | torch.device = "cpu"
) -> ReconstructionStats:
    """Accumulate :class:`ReconstructionStats` of ``model`` over an iterable of ``(x, y)`` batches.

    ``y`` None means the target is ``x`` (an SAE). Stops after ``max_rows`` rows when given.
    """
    stats = model.new_stats()
    was_training = model.training
    model.eval()
    for x, y in batches:
        x = x.to(device, torch.float32)
        y = x if y is None else y.to(device, torch.float32)
        if max_rows is not None and stats.tokens + x.shape[0] > max_rows:
            keep = max_rows - stats.tokens
            x, y = x[:keep], y[:keep]
        y_hat, code = reconstruct(model, x, y)
        stats.update(y, y_hat, code)
        if max_rows is not None and stats.tokens >= max_rows:
            break
    model.train(was_training)
    return stats


def dead_note(tokens: int, window: int) -> str:
    """What a dead fraction over ``tokens`` evaluated tokens means beside the training dead window ``window``."""
    if tokens < window:
        return (f"too few tokens to call latents dead: 'dead' counts latents with no firing in {tokens:,} "
                f"held-out tokens, below the training dead window of {window:,} tokens")  # fmt: skip
    return f"dead: no firing in {tokens:,} held-out tokens"


def evaluate_heldout(
    paths: dict[str, Path], recipe: Any, max_rows: int | None = None, eval_dir: str | Path | None = None
) -> dict[str, dict]:
    """Reload every saved dictionary and measure FVU/L0/dead% on ``recipe.eval_cache`` (one pass each).

    The summary goes into each checkpoint's ``meta["eval"]`` (with the held-out cache's path); the model card
    is re-rendered with it. ``eval_dir``: that cache, already made; without it ``recipe.eval_cache`` is
    cached first (a collective under torchrun: then every rank must call this).
    """
    eval_dir = Path(eval_dir) if eval_dir is not None else cache_activations(recipe.eval_cache)
    results = {}
    for name, path in paths.items():
        model = from_pretrained(path)
        hookpoint, target = model.cfg.source_key
        store = ActivationStore(eval_dir, hookpoint, target=target or None, batch_size=4096, loop=False,
                                drop_last=False)  # fmt: skip
        results[name] = reconstruction_stats(model, store, max_rows=max_rows).summary()
        window = int(model.meta.get("dead_tokens") or 0)
        note = {"dead_note": dead_note(results[name]["tokens"], window)} if window else {}
        native.update_meta(path, eval={**results[name], "cache": str(eval_dir), "dataset": store.manifest.get("dataset"),
                                       **note})  # fmt: skip
    return results
