"""``sparsedict train <recipe.yaml> [--shard-latents] [--no-resume] [--set section.key=value ...]``."""

from __future__ import annotations

import argparse
import json

import yaml

from sparsedict.config import load_yaml


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise SystemExit(f"--set expects section.key=value, got {item!r}")
    path, value = item.split("=", 1)
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if isinstance(node, list):
            raise SystemExit(f"--set cannot index into the list at {path!r}; edit the recipe instead")
    node[keys[-1]] = yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    from sparsedict.train.recipe import parse_recipe
    from sparsedict.train.run import run

    parser = argparse.ArgumentParser(prog="sparsedict train", description=__doc__)
    parser.add_argument("recipe", help="YAML recipe (sections: cache, eval_cache, train, dictionaries)")
    parser.add_argument("--shard-latents", action="store_true", help="split each dictionary's latents across ranks")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in out_dir")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set train.lr=1e-3 (repeatable)")
    args = parser.parse_args(argv)
    data = load_yaml(args.recipe)
    for item in args.set:
        _apply_override(data, item)
    if args.shard_latents:
        data.setdefault("train", {})["shard_latents"] = True
    recipe = parse_recipe(data, source=args.recipe)
    results = run(recipe, resume=not args.no_resume)  # tears the process group down before it returns
    from sparsedict.train.distributed import launch_rank

    if launch_rank() == 0:
        print(json.dumps(results, indent=2))
    return 0
