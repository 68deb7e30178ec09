"""``sparsedict eval <checkpoint> [<checkpoint> ...] [--cache DIR | --model M] [--field value ...]``.

Prints a table of held-out metrics (FVU, EV, MSE, cosine, L0, dead/dense %, CE clean/spliced/zero/
mean-ablation, CE recovered, ΔLM loss, KL) and, with ``--json_out``, writes one JSON record per
checkpoint (config, data provenance, metrics, L0 quantiles and firing-frequency histogram).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from sparsedict.config import FlagParser
from sparsedict.eval.evaluate import EvalConfig


@dataclass
class EvalOutput:
    """How ``sparsedict eval`` reports."""

    print_json: bool = False
    """Print the JSON records instead of the table."""


def main(argv: list[str]) -> int:
    from sparsedict.eval.evaluate import evaluate, format_table

    parser = FlagParser("sparsedict eval", __doc__)
    parser.add_argument("paths", nargs="*", metavar="checkpoint", help="checkpoint directories")
    parser.add_config(EvalConfig, "cfg", flat=True)
    parser.add_config(EvalOutput, "out", flat=True)
    configs, args = parser.parse(argv)
    cfg: EvalConfig = configs["cfg"]
    cfg.checkpoints = [*cfg.checkpoints, *args["paths"]]
    records = evaluate(cfg)
    print(json.dumps(records, indent=1, default=str) if configs["out"].print_json else format_table(records))
    if cfg.json_out:
        print(f"records written to {cfg.json_out}", file=sys.stderr)
    return 0
