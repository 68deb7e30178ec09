"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A nested state (optimiser ``state_dict``s, store positions, RNG states, step counters) is flattened:
every tensor goes to ``state.safetensors`` under its path (``opt/topk/state/0/exp_avg``) and the
JSON skeleton keeps a ``{"__tensor__": path}`` placeholder. Both files are written to temporary names,
fsynced and renamed, the JSON last, so a checkpoint is either the old one or the new one.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested dict/list by placeholders, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__keys__": [_key(k) for k in obj], "__values__": [flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)], "__tuple__": isinstance(obj, tuple)}
    if isinstance(obj, np.ndarray):
        return flatten(torch.from_numpy(obj.copy()), prefix, tensors)
    return obj


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__list__" in obj:
            items = [unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("__tuple__") else items
        if "__keys__" in obj:
            keys = [k["__int__"] if isinstance(k, dict) else k for k in obj["__keys__"]]
            return {k: unflatten(v, tensors) for k, v in zip(keys, obj["__values__"])}
    return obj


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (nested dicts/lists of tensors and JSON values) to directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, "s", tensors)
    tmp_t = path / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp_t))
    _fsync_replace(tmp_t, path / STATE_TENSORS)
    tmp_j = path / (STATE_JSON + ".tmp")
    tmp_j.write_text(json.dumps(skeleton))
    _fsync_replace(tmp_j, path / STATE_JSON)


def load_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read a state written by :func:`save_state`; None when no complete checkpoint exists."""
    path = Path(path)
    if not (path / STATE_JSON).exists() or not (path / STATE_TENSORS).exists():
        return None
    try:
        skeleton = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as err:  # corrupt checkpoint: say which file and what to do
        raise RuntimeError(
            f"training checkpoint in {path} is unreadable ({err}); delete {path} to restart from scratch"
        ) from err
    return unflatten(skeleton, tensors)
