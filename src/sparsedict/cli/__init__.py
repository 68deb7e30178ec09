"""``sparsedict <command>``: one module per command, each exposing ``main(argv)``.

Every command parses the same way (:mod:`sparsedict.config`): a YAML recipe, where the command takes
one, gives the defaults and typed flags generated from the config dataclasses override them
(``--help`` shows each field's docstring). A bad recipe key or flag, a missing file or a bad value
ends the command with exit code 2 and one line on stderr naming the problem; set
``SPARSEDICT_DEBUG=1`` to get the Python traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {  # name: (module with main(argv), one-line help); adding a command is one line here
    "quickstart": (
        "sparsedict.cli.quickstart",
        "cache -> train -> evaluate -> save -> reload on the embedded model",
    ),
    "cache": ("sparsedict.cli.cache", "cache activations of a model to disk shards"),
    "train": ("sparsedict.cli.train", "train dictionaries from a YAML recipe (flags override its values)"),
    "eval": ("sparsedict.cli.eval", "evaluate checkpoints: FVU, L0, dead %, CE recovered, KL"),
    "inspect": ("sparsedict.cli.inspect", "look at features: top contexts, logit lens, browser, exports"),
    "bench": ("sparsedict.cli.bench", "benchmarks: `bench pareto` sweeps and plots L0 vs FVU / CE"),
    "convert": (
        "sparsedict.cli.convert",
        "convert peer checkpoints (SAELens, sparsify, dictionary_learning)",
    ),
    "corpus": ("sparsedict.cli.corpus", "build the embedded Debian-documentation corpus"),
}


def usage() -> str:
    lines = [
        "usage: sparsedict <command> [options]   (sparsedict <command> --help for its flags)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong" (a message for the user, not a bug report)."""
    from sparsedict.cache.manifest import CacheError

    return (ValueError, KeyError, OSError, CacheError)


def one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    from sparsedict.util import did_you_mean

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"sparsedict: unknown command {cmd!r}{did_you_mean(cmd, COMMANDS)} (commands: "
              f"{', '.join(COMMANDS)})", file=sys.stderr)  # fmt: skip
        return 2
    try:
        return int(importlib.import_module(COMMANDS[cmd][0]).main(rest) or 0)
    except user_errors() as err:
        if os.environ.get("SPARSEDICT_DEBUG", "") not in ("", "0"):
            raise
        print(f"sparsedict {cmd}: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
