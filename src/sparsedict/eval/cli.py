"""``sparsedict eval <checkpoint> [<checkpoint> ...] [--cache DIR | --model M] [...]``.

Prints a table of held-out metrics (FVU, EV, MSE, cosine, L0, dead/dense %, CE clean/spliced/zero/
mean-ablation, CE recovered, ΔLM loss, KL) and, with ``--json_out``, writes one JSON record per
checkpoint (config, data provenance, metrics, L0 quantiles and firing-frequency histogram).
"""

from __future__ import annotations

import json
import sys

from sparsedict.eval.evaluate import EvalConfig, evaluate, format_table


def main(argv: list[str] | None = None) -> int:
    from simple_parsing import ArgumentParser

    parser = ArgumentParser(
        prog="sparsedict eval",
        description="Evaluate dictionaries on held-out tokens (reconstruction, sparsity, spliced CE/KL).",
        add_config_path_arg=False,
    )
    parser.add_argument("paths", nargs="*", metavar="checkpoint", help="checkpoint directories")
    parser.add_argument(
        "--print_json", action="store_true", help="print the JSON records instead of the table"
    )
    parser.add_arguments(EvalConfig, dest="cfg")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg: EvalConfig = args.cfg
    cfg.checkpoints = [*cfg.checkpoints, *args.paths]
    from sparsedict.cache.manifest import CacheError

    try:
        records = evaluate(cfg)
    except (FileNotFoundError, ValueError, KeyError, CacheError) as err:
        print(f"sparsedict eval: {err}", file=sys.stderr)
        return 2
    print(json.dumps(records, indent=1, default=str) if args.print_json else format_table(records))
    if cfg.json_out:
        print(f"records written to {cfg.json_out}", file=sys.stderr)
    return 0
