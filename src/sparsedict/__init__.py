"""sparsedict: sparse dictionaries (SAEs, transcoders, SNMF, MP-SAE) on language-model activations.

Public API (imported lazily so ``import sparsedict`` stays fast)::

    from sparsedict import cache_activations, CacheConfig, ActivationStore
    from sparsedict import Trainer, TrainConfig, from_pretrained
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "cache_activations": "sparsedict.cache",
    "CacheConfig": "sparsedict.cache",
    "ActivationStore": "sparsedict.cache",
    "Trainer": "sparsedict.train",
    "TrainConfig": "sparsedict.train",
    "train": "sparsedict.train",
    "from_pretrained": "sparsedict.hub",
    "save_pretrained": "sparsedict.hub",
    "Dictionary": "sparsedict.dictionaries",
    "DictionaryConfig": "sparsedict.dictionaries",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsedict' has no attribute {name!r}")
