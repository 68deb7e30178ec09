"""``sparsedict cache [recipe.yaml] [--field value ...]``: cache activations of a model to disk shards.

The recipe's ``cache:`` section (or a file holding only :class:`CacheConfig` keys) gives the defaults;
flags (``--max_tokens 20000``, ``--hookpoints resid_post.6 mlp_out.6``) override them. Under
``torchrun --nproc-per-node N -m sparsedict cache ...`` the ranks split the shards between them.

``sparsedict cache verify DIR [--repair]`` checks every file of a cache against its manifest (one line per
problem, then a summary; exit 1 on any problem); ``--repair`` recomputes bad shards with the config the
cache recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsedict.cache.config import CacheConfig
from sparsedict.config import ConfigError, FlagParser, from_dict, load_yaml, parse_cli, recipe_argument


@dataclass
class VerifyOptions:
    """What ``sparsedict cache verify`` does besides checking."""

    repair: bool = False
    """Recompute bad shards with the cache's recorded config; add xxh3_128 digests to sha256-only entries."""
    device: str = ""
    """Device for recomputing shards (e.g. ``cuda``); empty: the recorded config's device."""


def verify_main(argv: list[str]) -> int:
    """``sparsedict cache verify DIR [--repair] [--device D]``."""
    from sparsedict.cache.verify import repair_cache, verify_cache

    parser = FlagParser("sparsedict cache verify", "Check every file of a cache against its manifest.")
    parser.add_argument("dir", help="cache directory (holds manifest.json)")
    parser.add_config(VerifyOptions, "opts", flat=True)
    configs, args = parser.parse(argv)
    opts: VerifyOptions = configs["opts"]
    if opts.repair:
        report = repair_cache(args["dir"], **({"device": opts.device} if opts.device else {}))
    else:
        report = verify_cache(args["dir"])
    for line in report.problems:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


def build_config(argv: list[str]) -> CacheConfig:
    """Recipe (a first argument ending in .yaml/.yml) and/or flags -> :class:`CacheConfig`."""
    path, argv = recipe_argument(argv)
    default = CacheConfig()
    if path:
        recipe = load_yaml(path)
        section = recipe.get("cache", recipe if "hookpoints" in recipe else None)
        if section is None:
            raise ConfigError(f"{path} has no `cache:` section (sections: {', '.join(recipe) or 'none'})")
        default = from_dict(CacheConfig, section, where="cache.")
    return parse_cli(CacheConfig, argv, "sparsedict cache", __doc__, default=default)


def main(argv: list[str]) -> int:
    from sparsedict.cache.manifest import read_manifest
    from sparsedict.cache.runner import cache_activations
    from sparsedict.distributed import destroy, launch_rank

    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    root = cache_activations(build_config(argv))
    destroy()  # under torchrun: the last collective, then the process group goes away
    if launch_rank() != 0:
        return 0
    m = read_manifest(root)
    size = sum(f["bytes"] for s in m["shards"] for f in s["files"].values())
    print(f"cached {m['n_rows']:,} rows x {len(m['hookpoints'])} hookpoint(s) in {m['n_shards']} shards "
          f"({size / 1e6:.1f} MB) -> {Path(root).resolve()}")  # fmt: skip
    print(f"dropped positions: {m['exclusions']['dropped']}")
    return 0
