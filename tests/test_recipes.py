"""Every recipe under recipes/ parses into the config classes; the multi-GPU ones are realistic (bf16, CUDA,
a width between 16k and 131k latents).

A file with a ``dictionaries`` section is a training recipe (``load_recipe``: strict, every section);
a file with only ``cache`` is a caching recipe (``CacheConfig``). The memory table in recipes/README.md
must equal what ``recipes/memory.py`` computes from the recipes, so the documented numbers follow edits.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from sparsedict.cache import CacheConfig
from sparsedict.config import from_dict, load_yaml
from sparsedict.dictionaries import build
from sparsedict.train.optim import DictionaryOptimizer
from sparsedict.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"))
MULTI_GPU = [p for p in RECIPES if p.parent.name in ("gpt2", "pythia-410m", "llama-3.1-8b", "gemma-2-2b")]


def test_recipes_exist():
    folders = {p.parent.name for p in RECIPES}
    assert {"smollm2-135m", "gpt2", "pythia-410m", "llama-3.1-8b", "gemma-2-2b"} <= folders


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses(path):
    data = load_yaml(path)
    if "dictionaries" in data:
        recipe = load_recipe(path)
        assert recipe.dictionaries and recipe.train.out_dir
    else:
        assert set(data) == {"cache"}, f"{path}: a cache-only recipe holds just a 'cache' section"
        from_dict(CacheConfig, data["cache"], "cache.")


@pytest.mark.parametrize("path", MULTI_GPU, ids=lambda p: str(p.relative_to(ROOT)))
def test_multi_gpu_recipe_is_realistic(path):
    r = load_recipe(path)
    assert r.cache is not None and r.cache.dtype == "bfloat16" and r.cache.device == "cuda"
    assert len(r.cache.hookpoints) >= 2
    assert r.train.autocast == "bf16" and r.train.device == "cuda"
    assert r.train.checkpoint_every > 0 and r.train.dist_timeout_min > 0 and r.train.wandb_project
    for cfg in r.dictionaries:
        total = cfg.n_latents * max(1, len(cfg.layers)) if cfg.architecture == "clt" else cfg.n_latents
        assert 16_384 <= total <= 262_144, cfg.name  # a CLT: features over all its layers
        if r.train.shard_latents:
            assert cfg.architecture in ("topk", "clt") and cfg.n_latents % 8 == 0 and r.train.grad_clip == 0


def _memory():
    sys.path.insert(0, str(ROOT))
    try:
        import memory
    finally:
        sys.path.remove(str(ROOT))
    return memory


def test_readme_memory_table_matches_memory_py(capsys):
    memory = _memory()
    memory.main([])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    for line in table:
        assert line in readme, f"recipes/README.md is out of date; rerun python recipes/memory.py:\n{line}"


def test_measure_trains_what_the_estimate_counts():
    """``--measure`` trains each recipe's largest dictionary (the CLT of the CLT recipe, TopK elsewhere); on the CPU
    (no peak) a tiny one of each trains, and its parameters are the state the formulas count."""
    memory = _memory()
    clt = memory.estimate(ROOT / "gemma-2-2b" / "clt-sharded.yaml").largest
    assert (clt.layers, clt.n, clt.b, clt.activation) == (26, 8192 // 8, 4096, "batchtopk")
    assert memory.estimate(ROOT / "gpt2" / "resid-topk.yaml").largest.layers == 0
    gib = memory.GIB
    tiny = memory.Largest(d=16, d_out=12, n=32, k=4, b=64, layers=3, activation="batchtopk")
    state, peak = memory.measure(tiny, steps=2, device="cpu")
    assert peak == 0 and state == pytest.approx(memory.clt_state(16, 12, 32, 3) / gib, rel=1e-12)
    state, _ = memory.measure(memory.Largest(d=16, d_out=12, n=32, k=4, b=64), steps=2, device="cpu")
    assert state == pytest.approx((16 * 32 * (16 + 12 + 1) + 16 * 12) / gib, rel=1e-12)


TRAINING = [p for p in RECIPES if "dictionaries" in load_yaml(p)]
QUICKSTART_DATA = Path(__file__).resolve().parents[1] / "src" / "sparsedict" / "data" / "quickstart.yaml"
SETTINGS_LINE = re.compile(r"^\s*#\s+(\S+): ((?:adam|signum_sf), .*)$")


def _gets(path: Path) -> dict[str, str]:
    """What the recipe's comments say each dictionary gets: ``#   <name>: <DictionaryOptimizer.describe()>``."""
    return {m.group(1): m.group(2) for m in map(SETTINGS_LINE.match, path.read_text().splitlines()) if m}


@pytest.mark.parametrize("path", [*TRAINING, QUICKSTART_DATA], ids=lambda p: p.name if p == QUICKSTART_DATA
                         else str(p.relative_to(ROOT)))  # fmt: skip
def test_recipe_comments_state_the_optimiser_settings(path):
    """Each recipe states, per dictionary, the optimiser, LR (and W_dec's), betas and warmup the run gets at
    ``cache.max_tokens`` rows: the line ``DictionaryOptimizer.describe()`` prints when training starts."""
    sys.path.insert(0, str(ROOT))
    try:
        from memory import DIMS
    finally:
        sys.path.remove(str(ROOT))
    dims = {**DIMS, "smollm2-135m": (576, 1536)}
    r = load_recipe(path)
    steps = r.train.max_steps or max(1, math.floor(r.train.epochs * r.cache.max_tokens / r.train.batch_size))
    said = _gets(path)
    for cfg in r.dictionaries:
        d_model, d_mlp = dims[r.cache.model]
        d_in = d_mlp if cfg.hookpoint.startswith("mlp_hidden") else d_model
        d_out = None if not cfg.is_transcoder else (d_mlp if cfg.target.startswith("mlp_hidden") else d_model)
        layers = len(cfg.layers or [None])  # a cross-layer transcoder has up to L² decoder blocks
        big = cfg.resolved(d_in, d_out).n_latents * (d_in + (d_out or d_in)) * layers**2 > 50_000_000
        with torch.device("meta" if big else "cpu"):  # meta: the large recipes' weights take no memory
            model = build(cfg.resolved(d_in, d_out))
        if not model.trains_by_gradient:
            continue
        want = DictionaryOptimizer(model, r.train, steps, fused=False).describe()
        assert said.get(cfg.name) == want, (
            f"{path}: the comment for {cfg.name} is out of date; it should read\n  #   {cfg.name}: {want}"
        )
