"""``sparsedict quickstart [recipe.yaml] [--flag value ...]``: cache -> train -> evaluate -> save -> reload.

Runs the shipped recipe ``sparsedict/data/quickstart.yaml`` (also ``recipes/smollm2-135m/quickstart.yaml``
in a checkout: a TopK SAE, k=32, width 8·576, on the residual stream of SmolLM2-135M after block 6, ~50k
training tokens of the embedded corpus) on the CPU in a few minutes, checks that the reloaded
dictionary gives identical outputs, writes the feature browser for the dictionary over the held-out cache
(``sparsedict inspect``), and prints where everything went. It takes the flags of
``sparsedict train`` over that recipe, e.g. ``--out_dir /tmp/qs --cache.max_tokens 4000
--eval_cache.max_tokens 2000 --train.epochs 25``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sparsedict.data import QUICKSTART_RECIPE


def main(argv: list[str]) -> int:
    from sparsedict.cache import ActivationStore, cache_activations
    from sparsedict.cli.train import parse_run
    from sparsedict.dictionaries import from_pretrained
    from sparsedict.inspect import inspect
    from sparsedict.pipeline import build_dictionaries, evaluate_heldout, open_sources
    from sparsedict.train.trainer import Trainer

    t0 = time.perf_counter()
    recipe, opts = parse_run(argv, "sparsedict quickstart", __doc__, recipe=QUICKSTART_RECIPE)
    if recipe.cache is None or recipe.eval_cache is None:
        raise ValueError(f"{recipe.source}: the quickstart needs both a 'cache' and an 'eval_cache' section")
    if recipe.train.source == "live":
        raise ValueError(
            "the quickstart trains from a disk cache; to train live use `sparsedict train --train.source live`"
        )

    print(f"[1/5] caching activations of {recipe.cache.model} at {recipe.cache.hookpoints} ...")
    cache_dir = cache_activations(recipe.cache)
    eval_dir = cache_activations(recipe.eval_cache)
    t_cache = time.perf_counter()

    print("[2/5] training ...")
    sources = open_sources(recipe, cache_dir, recipe.train.batch_size, 0, 1)  # in train.shuffle's order
    models = build_dictionaries(recipe, sources)
    trainer = Trainer(models, sources, recipe.train)
    trainer.fit(resume=not opts.no_resume)
    t_train = time.perf_counter()

    print("[3/5] saving with save_pretrained ...")
    paths = trainer.save({"cache": str(cache_dir)})

    print("[4/5] reloading with from_pretrained and comparing outputs ...")
    for name, model in models.items():
        reloaded = from_pretrained(paths[name])
        store = ActivationStore(eval_dir, model.cfg.hookpoint, batch_size=2048, loop=False, drop_last=False)
        x, _ = next(iter(store))
        with torch.no_grad():
            model.eval()
            scaled = x * float(model.input_scale)
            a, b = model.encode(scaled), reloaded.encode(x)
            same_code = torch.equal(a.indices, b.indices) and torch.allclose(
                a.values, b.values, rtol=1e-5, atol=1e-5
            )
            xa = model.decode(a, scaled) / float(model.input_scale)
            same_out = torch.allclose(xa, reloaded.decode(b, x), rtol=1e-4, atol=1e-4)
        if not (same_code and same_out):
            raise RuntimeError(f"{name}: the reloaded dictionary does not reproduce the trained one")
        print(f"      {name}: identical codes and reconstructions on {x.shape[0]} held-out tokens")

    print("[5/5] evaluating on held-out tokens, then writing the feature browser ...")
    results = evaluate_heldout(paths, recipe)
    t_eval = time.perf_counter()
    browser = inspect(checkpoints=list(paths.values()), cache=str(eval_dir),
                      out=str(Path(recipe.train.out_dir).parent / "inspect"), progress=False)  # fmt: skip
    t_browser = time.perf_counter() - t_eval
    total = time.perf_counter() - t0
    print()
    print("quickstart report")
    print(f"  model           {recipe.cache.model} ({recipe.cache.hookpoints[0]})")
    print(f"  training cache  {cache_dir}  ({sources[next(iter(sources))].n_rows:,} rows)")
    print(f"  held-out cache  {eval_dir}")
    for name, r in results.items():
        print(
            f"  {name}: FVU {r['fvu']:.3f}  L0 {r['l0']:.1f}  dead {100 * r['dead_fraction']:.1f} %  "
            f"cosine {r['cosine']:.3f}  ({r['tokens']:,} held-out tokens)"
        )
        print(f"  checkpoint      {paths[name]}  (config.json + model.safetensors)")
    print(f"  training log    {Path(recipe.train.out_dir) / 'log.jsonl'}")
    print(
        f"  time            cache {t_cache - t0:.0f} s, train {t_train - t_cache:.0f} s, total {total:.0f} s"
    )
    print(f"  reload it with  sparsedict.from_pretrained({str(paths[next(iter(paths))])!r})")
    print(f"  browser         {browser.resolve()}  (open it from disk; written in {t_browser:.0f} s)")
    return 0
