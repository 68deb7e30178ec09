"""``sparsedict inspect [recipe.yaml] <checkpoint> [<checkpoint> ...] --cache DIR [--tokens N] [--latents SPEC] [--out DIR]``.

Streams the cache once per hookpoint and writes ``DIR/index.html`` (the feature browser: open it from
disk), one folder per checkpoint with its pages and ``inspect.safetensors``/``inspect.json``, and, with
``--neuronpedia``/``--delphi``, the exports. A recipe's ``inspect:`` section (or a file holding only
:class:`~sparsedict.inspect.InspectConfig` keys) gives the defaults; flags override them.
"""

from __future__ import annotations

from sparsedict.config import ConfigError, FlagParser, from_dict, load_yaml, recipe_argument
from sparsedict.inspect.config import InspectConfig


def build_config(argv: list[str]) -> InspectConfig:
    """Recipe (a first argument ending in .yaml/.yml), positional checkpoints and flags -> :class:`InspectConfig`."""
    path, argv = recipe_argument(argv)
    default = InspectConfig()
    if path:
        recipe = load_yaml(path)
        section = recipe.get("inspect", recipe if "cache" in recipe or "checkpoints" in recipe else None)
        if section is None:
            raise ConfigError(f"{path} has no `inspect:` section (sections: {', '.join(recipe) or 'none'})")
        default = from_dict(InspectConfig, section, where="inspect.")
    parser = FlagParser("sparsedict inspect", __doc__)
    parser.add_argument("paths", nargs="*", metavar="checkpoint", help="checkpoint directories")
    parser.add_config(default, "cfg", flat=True)
    configs, args = parser.parse(argv)
    cfg: InspectConfig = configs["cfg"]
    cfg.checkpoints = [*cfg.checkpoints, *args["paths"]]
    return cfg


def main(argv: list[str]) -> int:
    from sparsedict.inspect.write import write_all

    index = write_all(build_config(argv))
    print(f"feature browser: {index.resolve()}")
    return 0
