"""``sparsedict bench pareto [sweep.yaml] [--flag value ...]``: a sparsity sweep, evaluated and plotted.

Flags are the fields of :class:`~sparsedict.sweep.ParetoConfig` (``--sweep 'topk:k=8,16,32' ...``,
``--expansion``, ``--out_dir``, ``--cache_dir``) and of the configs it holds: ``--cache.max_tokens``,
``--train.batch_size``, ``--eval.splice_tokens``, ... A YAML file of the same keys gives the defaults.
Throughput and peer benchmarks are scripts: ``python benchmarks/throughput.py``, ``benchmarks/peers.py``.
"""

from __future__ import annotations

from pathlib import Path

from sparsedict.config import ConfigError, from_dict, load_yaml, parse_cli, recipe_argument
from sparsedict.sweep import ParetoConfig, run_pareto


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "pareto":
        raise ConfigError(
            "usage: sparsedict bench pareto [sweep.yaml] [--sweep 'topk:k=8,16,32' ...] [--help]"
        )
    path, argv = recipe_argument(argv[1:])
    default = from_dict(ParetoConfig, load_yaml(path)) if path else ParetoConfig()
    cfg = parse_cli(ParetoConfig, argv, "sparsedict bench pareto", __doc__, default=default)
    result = run_pareto(cfg)
    for p in result["points"]:
        ce = p.get("ce_recovered")
        print(
            f"{p['name']:<32} L0 {p['l0']:8.2f}  FVU {p['fvu']:.4f}"
            + (f"  CE rec {ce:.4f}" if ce is not None else "")
        )
    print(f"wrote {Path(cfg.out_dir) / 'pareto.json'} and {Path(cfg.out_dir) / 'pareto.png'}")
    return 0
