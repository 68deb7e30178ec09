"""``sparsedict cache [recipe.yaml] [--field value ...]``: cache activations of a model to disk shards.

The recipe's ``cache:`` section (or a file holding only :class:`CacheConfig` keys) gives the defaults;
flags (``--max_tokens 20000``, ``--hookpoints resid_post.6 mlp_out.6``) override them. Under
``torchrun --nproc-per-node N -m sparsedict cache ...`` the ranks split the shards between them.
"""

from __future__ import annotations

from pathlib import Path

from sparsedict.cache.config import CacheConfig
from sparsedict.config import ConfigError, from_dict, load_yaml, parse_cli, recipe_argument


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
    import torch.distributed as dist

    from sparsedict.cache.manifest import read_manifest
    from sparsedict.cache.runner import cache_activations

    root = cache_activations(build_config(argv))
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    m = read_manifest(root)
    size = sum(f["bytes"] for s in m["shards"] for f in s["files"].values())
    print(f"cached {m['n_rows']:,} rows x {len(m['hookpoints'])} hookpoint(s) in {m['n_shards']} shards "
          f"({size / 1e6:.1f} MB) -> {Path(root).resolve()}")  # fmt: skip
    print(f"dropped positions: {m['exclusions']['dropped']}")
    return 0
