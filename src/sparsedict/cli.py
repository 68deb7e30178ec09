"""``sparsedict <command>``: each command lives with its stage and exposes ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": ("sparsedict.quickstart", "cache -> train -> evaluate -> save -> reload on the embedded model"),
    "cache": ("sparsedict.cache.cli", "cache activations of a model to disk shards"),
    "train": ("sparsedict.train.cli", "train dictionaries from a YAML recipe (with --set overrides)"),
    "eval": ("sparsedict.eval.cli", "evaluate checkpoints: FVU, L0, dead %, CE recovered, KL"),
    "inspect": ("sparsedict.inspect.cli", "look at features: top contexts, logit lens, HTML browser, exports"),
    "bench": ("sparsedict.eval.bench", "benchmarks: `bench pareto` sweeps and plots L0 vs FVU / CE"),
    "convert": ("sparsedict.formats.convert", "convert peer checkpoints (SAELens, sparsify, dictionary_learning)"),
    "corpus": ("sparsedict.corpus", "build the embedded Debian-documentation corpus"),
}


def usage() -> str:
    lines = ["usage: sparsedict <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(cmd, COMMANDS, n=1)
        print(f"sparsedict: unknown command {cmd!r}" + (f"; did you mean {near[0]!r}?" if near else ""), file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
