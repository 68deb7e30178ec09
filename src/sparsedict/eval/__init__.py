"""Evaluation: reconstruction/sparsity metrics (defined once in :mod:`metrics`) and model splicing."""

from sparsedict.eval.metrics import ReconstructionStats

__all__ = ["ReconstructionStats"]
