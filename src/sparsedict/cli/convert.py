"""``sparsedict convert <src> <dst> [--to sparsedict|saelens|circuit_tracer]``: rewrite a checkpoint in another format.

The converted checkpoint is loaded back and checked on random inputs against the source; a conversion
that changes the numbers fails (exit code 1) instead of leaving a silent copy.
"""

from __future__ import annotations

import sys

from sparsedict.config import parse_cli
from sparsedict.convert import ConvertConfig, convert


def main(argv: list[str]) -> int:
    cfg = parse_cli(ConvertConfig, argv, "sparsedict convert", __doc__)
    try:
        dst = convert(cfg)
    except RuntimeError as err:  # the verification refused the result
        print(f"sparsedict convert: {err}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.to} checkpoint to {dst}")
    return 0
