"""``sparsedict cache <recipe.yaml> [--flag value ...]`` or ``sparsedict cache --flag value ...``.

A recipe's ``cache:`` section maps onto :class:`CacheConfig` (strict: an unknown key is an error naming
the nearest valid one); flags given after the recipe override its values. Under
``torchrun --nproc-per-node N -m sparsedict cache ...`` the ranks split the shards between them.

``sparsedict cache verify DIR [--repair] [--device D]`` checks every file of a cache (one line per problem,
then a summary; exit 1 on any problem); ``--repair`` recomputes bad shards with the cache's recorded config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsedict.cache.config import CacheConfig
from sparsedict.cache.manifest import CacheError
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


def verify_main(argv: list[str]) -> int:
    """``sparsedict cache verify DIR [--repair] [--device D]``."""
    import argparse

    from sparsedict.cache.verify import repair_cache, verify_cache

    parser = argparse.ArgumentParser(
        prog="sparsedict cache verify", description="Check every file of a cache."
    )
    parser.add_argument("dir", help="cache directory (holds manifest.json)")
    parser.add_argument("--repair", action="store_true",
                        help="recompute bad shards with the recorded config; add xxh3_128 to sha256-only entries")  # fmt: skip
    parser.add_argument("--device", default=None, help="device for recomputing shards (e.g. cuda)")
    args = parser.parse_args(argv)
    try:
        if args.repair:
            report = repair_cache(args.dir, **({"device": args.device} if args.device else {}))
        else:
            report = verify_cache(args.dir)
    except (ConfigError, CacheError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"sparsedict cache verify: {err}", file=sys.stderr)
        return 1
    for line in report.problems:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    from sparsedict.cache.runner import cache_activations

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    try:
        cfg = build_config(argv)
        root = cache_activations(cfg)
    except (ConfigError, CacheError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"sparsedict cache: {err}", file=sys.stderr)
        return 1
    import torch.distributed as dist

    from sparsedict.cache.manifest import read_manifest

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    m = read_manifest(root)
    size = sum(f["bytes"] for s in m["shards"] for f in s["files"].values())
    print(f"cached {m['n_rows']:,} rows x {len(m['hookpoints'])} hookpoint(s) in {m['n_shards']} shards "
          f"({size / 1e6:.1f} MB) -> {Path(root).resolve()}")  # fmt: skip
    print(f"dropped positions: {m['exclusions']['dropped']}")
    return 0
