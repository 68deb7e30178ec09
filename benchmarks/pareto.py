"""L0-FVU / L0-CE-recovered Pareto sweep: the same as ``sparsedict bench pareto`` (all its flags apply).

    python benchmarks/pareto.py --cache.hookpoints resid_post.6 --cache.max_tokens 50000 \\
        --sweep "topk:k=8,16,32,64" "batchtopk:k=8,16,32,64" "relu:l1_coefficient=1,3,10"

Writes ``<out_dir>/pareto.json`` (every point: its architecture, swept parameter and held-out metrics) and
``<out_dir>/pareto.png`` (one curve per architecture).
"""

from __future__ import annotations

import sys

from sparsedict.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "pareto", *sys.argv[1:]]))
