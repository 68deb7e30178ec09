"""``sparsedict cache <recipe.yaml> [--flag value ...]`` or ``sparsedict cache --flag value ...``.

A recipe's ``cache:`` section maps onto :class:`CacheConfig` (strict: an unknown key is an error naming
the nearest valid one); flags given after the recipe override its values. Under
``torchrun --nproc-per-node N -m sparsedict cache ...`` the ranks split the shards between them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsedict.cache.config import CacheConfig
from sparsedict.config import ConfigError, from_dict, load_yaml


def build_config(argv: list[str]) -> CacheConfig:
    """Recipe (first argument ending in .yaml/.yml) and/or flags -> :class:`CacheConfig`."""
    from simple_parsing import ArgumentParser

    default = CacheConfig()
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe = load_yaml(argv[0])
        section = recipe.get("cache", recipe if "hookpoints" in recipe else None)
        if section is None:
            raise ConfigError(f"{argv[0]} has no `cache:` section (sections: {', '.join(recipe) or 'none'})")
        default = from_dict(CacheConfig, section, where="cache.")
        argv = argv[1:]
    parser = ArgumentParser(
        prog="sparsedict cache", description=__doc__.split("\n\n")[0], add_config_path_arg=False
    )
    parser.add_arguments(CacheConfig, dest="cfg", default=default)
    return parser.parse_args(argv).cfg


def main(argv: list[str] | None = None) -> int:
    from sparsedict.cache.manifest import CacheError
    from sparsedict.cache.runner import cache_activations

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = build_config(argv)
        root = cache_activations(cfg)
    except (ConfigError, CacheError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"sparsedict cache: {err}", file=sys.stderr)
        return 1
    from sparsedict.cache.manifest import read_manifest
    from sparsedict.train.distributed import destroy, launch_rank

    destroy()  # under torchrun: the last collective, then the process group goes away
    if launch_rank() != 0:
        return 0
    m = read_manifest(root)
    size = sum(f["bytes"] for s in m["shards"] for f in s["files"].values())
    print(f"cached {m['n_rows']:,} rows x {len(m['hookpoints'])} hookpoint(s) in {m['n_shards']} shards "
          f"({size / 1e6:.1f} MB) -> {Path(root).resolve()}")  # fmt: skip
    print(f"dropped positions: {m['exclusions']['dropped']}")
    return 0
