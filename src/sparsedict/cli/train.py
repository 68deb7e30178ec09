"""``sparsedict train [recipe.yaml] [--section.field value ...]``: cache, train, save, evaluate held-out.

The recipe gives the defaults; every field of every section is a flag over it:
``--cache.max_tokens 20000``, ``--train.lr 1e-3``, ``--eval_cache.split test``, and
``--dictionaries.N.field`` for entry N of the ``dictionaries`` list (``--dictionaries.0.k 64``). An
entry's fields depend on its architecture, so ``--dictionaries.N.architecture relu`` is read first;
N one past the recipe's last entry adds a dictionary. ``sparsedict train recipe.yaml --help`` lists
the flags of that recipe with its values as defaults.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsedict.cache.config import CacheConfig
from sparsedict.config import ConfigError, FlagParser, from_dict, load_yaml, recipe_argument
from sparsedict.train.config import TrainConfig
from sparsedict.train.recipe import Recipe, check_sections, parse_dictionary, parse_recipe


@dataclass
class RunOptions:
    """Options of a run that are not part of the recipe."""

    out_dir: str = ""
    """Run directory: the training cache, the held-out cache and the checkpoints go to DIR/cache-train,
    DIR/cache-test and DIR/train (explicit --cache.out_dir, --eval_cache.out_dir, --train.out_dir win)."""
    no_resume: bool = False
    """Start over even when train.out_dir holds a checkpoint of this run."""


RUN_DIRS = {"cache": "cache-train", "eval_cache": "cache-test", "train": "train"}
_ARCH_FLAG = re.compile(r"^--dictionaries\.(\d+)\.architecture(?:=(.*))?$")


def _dictionaries(data: dict[str, Any], argv: Sequence[str], source: str) -> list:
    """The recipe's dictionary configs, after the ``--dictionaries.N.architecture NAME`` flags (read
    before the others: they pick each entry's config class; N = len adds an entry)."""
    entries = data.get("dictionaries") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'dictionaries' must be a list of mappings, one per dictionary")
    entries = list(entries)
    for i, arg in enumerate(argv):
        m = _ARCH_FLAG.match(arg)
        if m is None or (m[2] is None and i + 1 == len(argv)):
            continue
        n, arch = int(m[1]), m[2] if m[2] is not None else argv[i + 1]
        if n > len(entries):
            raise ConfigError(f"--dictionaries.{n}.architecture: the entries are numbered 0..{len(entries) - 1}; "
                              f"add entry {len(entries)} first")  # fmt: skip
        if n == len(entries):
            entries.append({})
        entries[n] = {**entries[n], "architecture": arch} if isinstance(entries[n], dict) else entries[n]
    if not entries and {"-h", "--help"} & set(argv):  # show an entry's flags (at the default architecture)
        entries = [{"architecture": "topk"}]
    return [parse_dictionary(e, f"dictionaries[{i}]") for i, e in enumerate(entries)]


def _section_flagged(argv: Sequence[str], section: str) -> bool:
    prefixes = (f"--{section}.", f"--{section.replace('_', '-')}.")
    return any(arg.startswith(prefixes) for arg in argv)


def parse_run(
    argv: Sequence[str], prog: str, doc: str, recipe: str | Path | None = None
) -> tuple[Recipe, RunOptions]:
    """Recipe (first argument ending in .yaml, else ``recipe``) + flags -> the parsed recipe and options."""
    path, argv = recipe_argument(argv)
    path = path or (str(recipe) if recipe else None)
    source = path or "<flags>"
    data = load_yaml(path) if path else {}
    check_sections(data, source)

    opts_parser = FlagParser(prog)  # --out_dir first: it moves the sections' default out_dir values
    opts_parser.add_config(RunOptions, "run", flat=True)
    opts = opts_parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].run
    sections: dict[str, Any] = {}
    for name, cls in (("cache", CacheConfig), ("eval_cache", CacheConfig), ("train", TrainConfig)):
        section = dict(data.get(name) or {})
        if opts.out_dir:
            section["out_dir"] = str(Path(opts.out_dir) / RUN_DIRS[name])
        sections[name] = from_dict(cls, section, where=f"{name}.")
    dicts = _dictionaries(data, argv, source)

    parser = FlagParser(prog, doc)
    parser.add_config(opts, "run", flat=True)
    for name, default in sections.items():
        parser.add_config(default, name)
    for i, default in enumerate(dicts):
        parser.add_config(default, f"dictionaries.{i}")
    configs, _ = parser.parse(argv)
    parsed: dict[str, Any] = {"train": dataclasses.asdict(configs["train"])}
    for name in ("cache", "eval_cache"):
        if data.get(name) or _section_flagged(argv, name):
            parsed[name] = dataclasses.asdict(configs[name])
    parsed["dictionaries"] = [dataclasses.asdict(configs[f"dictionaries.{i}"]) for i in range(len(dicts))]
    if not dicts:
        raise ConfigError(f"{source}: no dictionaries: give a recipe with a 'dictionaries' list, or "
                          "--dictionaries.0.architecture NAME")  # fmt: skip
    return parse_recipe(parsed, source=source), configs["run"]


def main(argv: list[str]) -> int:
    from sparsedict.distributed import launch_rank
    from sparsedict.pipeline import run

    recipe, opts = parse_run(argv, "sparsedict train", __doc__)
    results = run(recipe, resume=not opts.no_resume)  # tears the process group down before it returns
    if launch_rank() == 0:
        print(json.dumps(results, indent=2))
    return 0
