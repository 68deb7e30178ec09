"""Every recipe under recipes/ parses into the config classes; the multi-GPU ones are realistic (bf16, CUDA,
a width between 16k and 131k latents).

A file with a ``dictionaries`` section is a training recipe (``load_recipe``: strict, every section);
a file with only ``cache`` is a caching recipe (``CacheConfig``). The memory table in recipes/README.md
must equal what ``recipes/memory.py`` computes from the recipes, so the documented numbers follow edits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sparsedict.cache import CacheConfig
from sparsedict.config import from_dict, load_yaml
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


def test_readme_memory_table_matches_memory_py(capsys):
    sys.path.insert(0, str(ROOT))
    try:
        import memory
    finally:
        sys.path.remove(str(ROOT))
    memory.main([])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    for line in table:
        assert line in readme, f"recipes/README.md is out of date; rerun python recipes/memory.py:\n{line}"
