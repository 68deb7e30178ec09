"""Recipes: one YAML file describing a whole run, parsed strictly into the config dataclasses.

```yaml
cache:            # CacheConfig of the training activations (built or resumed before training)
  hookpoints: [resid_post.6]
  max_tokens: 50000
  out_dir: runs/quickstart/cache-train
eval_cache:       # optional CacheConfig of held-out activations (e.g. split: test)
  split: test
  ...
train:            # TrainConfig
  batch_size: 1024
dictionaries:     # one mapping per dictionary; `architecture` picks the config class
  - architecture: topk
    hookpoint: resid_post.6
    k: 32
```
An unknown key anywhere is an error naming the nearest valid key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsedict.cache.config import CacheConfig
from sparsedict.config import ConfigError, from_dict, load_yaml
from sparsedict.dictionaries import DictionaryConfig, lookup
from sparsedict.train.config import TrainConfig
from sparsedict.util import did_you_mean

SECTIONS = ("cache", "eval_cache", "train", "dictionaries")


@dataclass
class Recipe:
    train: TrainConfig
    """How the dictionaries are trained."""
    dictionaries: list[DictionaryConfig]
    """One config per dictionary (the class is picked by each entry's ``architecture``)."""
    cache: CacheConfig | None = None
    """The training activations (None: sources are supplied by the caller)."""
    eval_cache: CacheConfig | None = None
    """Held-out activations for the final evaluation (optional)."""
    source: str = ""
    """Where the recipe came from (a path), for error messages."""


def parse_dictionary(entry: dict[str, Any], where: str) -> DictionaryConfig:
    if not isinstance(entry, dict) or "architecture" not in entry:
        raise ConfigError(f"{where}: each dictionary needs an 'architecture' key (e.g. architecture: topk)")
    try:
        _, cfg_cls = lookup(entry["architecture"])
    except KeyError as err:
        raise ConfigError(f"{where}: {err.args[0]}") from err
    return from_dict(cfg_cls, entry, where=f"{where}.")


def check_sections(data: dict[str, Any], source: str) -> None:
    """Refuse a recipe section that is not one of :data:`SECTIONS` (naming the nearest)."""
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {key!r}{did_you_mean(key, SECTIONS) or '.'} Sections: {', '.join(SECTIONS)}"
            )


def parse_recipe(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    check_sections(data, source)
    from sparsedict.cache.hooks import split_head

    dicts = data.get("dictionaries") or []
    if not isinstance(dicts, list) or not dicts:
        raise ConfigError(f"{source}: 'dictionaries' must be a non-empty list of mappings")
    cache = from_dict(CacheConfig, data["cache"], "cache.") if data.get("cache") else None
    eval_cache = from_dict(CacheConfig, data["eval_cache"], "eval_cache.") if data.get("eval_cache") else None
    configs = [parse_dictionary(d, f"dictionaries[{i}]") for i, d in enumerate(dicts)]
    for cfg in configs:
        if not cfg.hookpoint:
            if cache is None or len(cache.hookpoints) != 1:
                raise ConfigError(f"{source}: dictionary {cfg.architecture!r} needs a 'hookpoint'")
            cfg.hookpoint = cache.hookpoints[0]
        if cache is not None:
            names = [*cfg.hookpoints, *(cfg.targets if cfg.is_transcoder else [])]
            for hp in names:
                if hp not in cache.hookpoints and split_head(hp)[0] not in cache.hookpoints:  # attn_z.L.hK
                    raise ConfigError(
                        f"{source}: dictionary hookpoint {hp!r} is not cached; cache.hookpoints = {cache.hookpoints}"
                    )
    names = [c.name or default_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: dictionary names collide ({names}); set distinct 'name' fields")
    for cfg, name in zip(configs, names):
        cfg.name = name
    train = from_dict(TrainConfig, data.get("train") or {}, "train.")
    return Recipe(train=train, dictionaries=configs, cache=cache, eval_cache=eval_cache, source=source)


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(load_yaml(path), source=str(path))


def default_name(cfg: DictionaryConfig) -> str:
    hp = cfg.hookpoint + (f"-{cfg.target}" if cfg.is_transcoder else "")
    if cfg.layers:
        hp += f"-layers{cfg.layers[0]}-{cfg.layers[-1]}"
    return f"{cfg.architecture}-{hp}".replace("/", "_").replace(":", "_").replace("{layer}", "L")
