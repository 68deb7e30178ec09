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

from sparsedict import distributed as dist
from sparsedict.util import atomic_write

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested dict/list by placeholders, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__keys__": [_key(k) for k in obj],
            "__values__": [flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()],
        }
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)],
            "__tuple__": isinstance(obj, tuple),
        }
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
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (nested dicts/lists of tensors and JSON values) to directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, "s", tensors)
    atomic_write(path / STATE_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(path / STATE_JSON, json.dumps(skeleton))


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


# -- multi-rank checkpoints ------------------------------------------------------------------------
# Layout of ``root`` (``out_dir/checkpoint``):
#   latest.json                     {"step": S, "world_size": R, "dir": "step_0000000S"}, written last
#   step_0000000S/rank_<r>/         one save_state directory per rank
# Every rank writes its own directory (its RNG state and data-source positions; the dictionaries and
# optimiser states too when they are not replicated, i.e. rank 0 in data parallel, every rank when
# latents are sharded), all ranks meet at a barrier, then rank 0 atomically replaces latest.json and
# removes older step directories. A crash at any point leaves latest.json naming a complete checkpoint.
LATEST = "latest.json"


def _step_dir(step: int) -> str:
    return f"step_{step:010d}"


def save_checkpoint(root: str | os.PathLike, state: dict[str, Any], step: int) -> Path:
    """Collective: every rank saves ``state`` (its own part), then rank 0 commits step ``step``."""
    root = Path(root)
    step_dir = root / _step_dir(step)
    save_state(step_dir / f"rank_{dist.rank()}", state)
    dist.barrier()
    if dist.is_main():
        latest = {"step": step, "world_size": dist.world_size(), "dir": step_dir.name}
        atomic_write(root / LATEST, json.dumps(latest))
        for old in root.glob("step_*"):
            if old.name != step_dir.name:
                _rmtree(old)
    dist.barrier()
    return step_dir


def load_checkpoint(root: str | os.PathLike) -> dict[str, Any] | None:
    """This rank's state of the latest committed checkpoint (None when there is none).

    A rank whose own directory holds no ``members`` (data-parallel replicas) takes the dictionaries and
    optimiser states from rank 0's directory. A checkpoint written by the single-file
    :func:`save_state` layout (no ``latest.json``) is read as rank 0's state.
    """
    root = Path(root)
    if not (root / LATEST).exists():
        return load_state(root) if dist.world_size() == 1 else None
    latest = json.loads((root / LATEST).read_text())
    if int(latest["world_size"]) != dist.world_size():
        raise RuntimeError(
            f"checkpoint {root} was written by {latest['world_size']} ranks but this job has "
            f"{dist.world_size()}: relaunch with --nproc-per-node {latest['world_size']}, or delete {root} "
            f"to start over"
        )
    step_dir = root / latest["dir"]
    state = load_state(step_dir / f"rank_{dist.rank()}")
    if state is None:
        raise RuntimeError(
            f"checkpoint {step_dir} has no state for rank {dist.rank()}; delete {root} to restart"
        )
    if "members" not in state:
        main = load_state(step_dir / "rank_0")
        if main is None or "members" not in main:
            raise RuntimeError(
                f"checkpoint {step_dir}/rank_0 holds no dictionaries; delete {root} to restart"
            )
        state["members"] = main["members"]
    return state


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
