"""Evaluation: held-out reconstruction metrics (:mod:`heldout`), model splicing (:mod:`splice`), the
evaluator (:mod:`evaluate`, ``sparsedict eval``) and the Pareto plot (:mod:`plot`; the sweep is
:mod:`sparsedict.sweep`). The metrics themselves are defined once in :mod:`sparsedict.metrics`, which the
trainer's logs use too."""

from __future__ import annotations

import importlib
from typing import Any

from sparsedict.dictionaries.attach import reconstruct
from sparsedict.metrics import ReconstructionStats, SpliceStats, fvu

_LAZY = {
    "reconstruction_stats": "sparsedict.eval.heldout",
    "evaluate_heldout": "sparsedict.eval.heldout",
    "Contexts": "sparsedict.eval.splice",
    "evaluate_splicing": "sparsedict.eval.splice",
    "EvalConfig": "sparsedict.eval.evaluate",
    "evaluate": "sparsedict.eval.evaluate",
}

__all__ = ["ReconstructionStats", "SpliceStats", "fvu", "reconstruct", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsedict.eval' has no attribute {name!r}")
