"""sparsedict: sparse dictionaries (SAEs, transcoders, SNMF, MP-SAE) on language-model activations.

Public API (imported lazily so ``import sparsedict`` stays fast)::

    from sparsedict import cache_activations, CacheConfig, ActivationStore
    from sparsedict import Trainer, TrainConfig, from_pretrained
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

# Our numba kernels (CPU top-k, matching pursuit) run beside torch's own OpenMP pool. numba's OpenMP
# layer leaves its threads spinning after a parallel region, which slowed later torch ops ~4x on a
# 2-core machine; the workqueue layer does not. Set before numba is first imported; users may override.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

from sparsedict._version import __version__

_LAZY = {
    "cache_activations": "sparsedict.cache",
    "CacheConfig": "sparsedict.cache",
    "ActivationStore": "sparsedict.cache",
    "Trainer": "sparsedict.train",
    "TrainConfig": "sparsedict.train",
    "from_pretrained": "sparsedict.dictionaries",
    "save_pretrained": "sparsedict.dictionaries",
    "Dictionary": "sparsedict.dictionaries",
    "DictionaryConfig": "sparsedict.dictionaries",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if (
        not name.startswith("_") and importlib.util.find_spec(f"sparsedict.{name}") is not None
    ):  # a subpackage: sparsedict.train, ...
        return importlib.import_module(f"sparsedict.{name}")
    raise AttributeError(f"module 'sparsedict' has no attribute {name!r}")
