"""sparsedict: sparse dictionaries (SAEs, transcoders, SNMF, MP-SAE) on language-model activations.

Public API (imported lazily so ``import sparsedict`` stays fast)::

    from sparsedict import cache_activations, CacheConfig, ActivationStore
    from sparsedict import Trainer, TrainConfig, from_pretrained
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Our numba kernels (CPU top-k, matching pursuit) run beside torch's own OpenMP pool. numba's OpenMP
# layer leaves its threads spinning after a parallel region, which slowed later torch ops ~4x on a
# 2-core machine; the workqueue layer does not. Set before numba is first imported; users may override.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

__version__ = "0.1.0"

_LAZY = {
    "cache_activations": "sparsedict.cache",
    "CacheConfig": "sparsedict.cache",
    "ActivationStore": "sparsedict.cache",
    "Trainer": "sparsedict.train",
    "TrainConfig": "sparsedict.train",
    "train": "sparsedict.train",
    "from_pretrained": "sparsedict.formats.native",
    "save_pretrained": "sparsedict.formats.native",
    "Dictionary": "sparsedict.dictionaries",
    "DictionaryConfig": "sparsedict.dictionaries",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsedict' has no attribute {name!r}")
