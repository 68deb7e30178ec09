"""``sparsedict inspect <checkpoint> [<checkpoint> ...] --cache DIR [--tokens N] [--latents SPEC] --out DIR``.

Writes ``DIR/index.html`` (open it in a browser, from disk), one folder per checkpoint with the feature
pages and ``inspect.safetensors``/``inspect.json``, and, with ``--neuronpedia``/``--delphi``, the exports.
"""

from __future__ import annotations

import sys

from sparsedict.config import parse_cli
from sparsedict.inspect.config import InspectConfig


def main(argv: list[str] | None = None) -> int:
    from sparsedict.cache.manifest import CacheError
    from sparsedict.inspect.write import write_all

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_cli(InspectConfig, argv, "sparsedict inspect", __doc__.split("\n\n")[0])
        index = write_all(cfg)
    except (FileNotFoundError, ValueError, KeyError, CacheError) as err:
        print(f"sparsedict inspect: {err}", file=sys.stderr)
        return 2
    print(f"feature browser: {index.resolve()}")
    return 0
