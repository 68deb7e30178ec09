"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` in our format (config.json + model.safetensors).

``config.json`` holds ``{"sparsedict_version", "architecture", "dictionary": <DictionaryConfig fields>,
"meta": {model, hookpoint, normalisation constant, training tokens, exclusions, metrics, ...}}``.
Weights are saved with the input normalisation folded in, so a loaded dictionary works on raw
activations. Peer formats (SAELens, sparsify, dictionary_learning) are detected by
:mod:`sparsedict.formats`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsedict.config import from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (input scale folded into the weights)."""
    from sparsedict import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scale = float(model.input_scale)
    export = copy.deepcopy(model)
    export.fold_scaling()
    tensors = {k: v.detach().contiguous().cpu() for k, v in export.state_dict().items() if k != "input_scale"}
    meta = dict(meta or {})
    meta.setdefault("input_scale_folded", scale)
    config = {
        "sparsedict_version": __version__,
        "architecture": model.architecture,
        "dictionary": model.cfg.to_dict(),
        "meta": meta,
    }
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_NAME)
    _atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2, default=str))
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path} not found: {path} is not a sparsedict checkpoint (expected {CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err}); the checkpoint is corrupt, re-save it") from err


def load_local(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a sparsedict checkpoint directory."""
    from sparsedict.dictionaries import build, lookup

    path = Path(path)
    config = read_config(path)
    arch = config.get("architecture")
    if arch is None or "dictionary" not in config:
        raise ValueError(f"{path / CONFIG_NAME} lacks 'architecture'/'dictionary': not a sparsedict config")
    _, cfg_cls = lookup(arch)
    known = {f for f in cfg_cls.__dataclass_fields__}
    extra = set(config["dictionary"]) - known
    if extra:
        import warnings

        warnings.warn(f"{path / CONFIG_NAME}: ignoring unknown keys {sorted(extra)} (newer sparsedict?)", stacklevel=2)
    cfg = from_dict(cfg_cls, {k: v for k, v in config["dictionary"].items() if k in known})
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing: the checkpoint at {path} is incomplete")
    model = build(cfg)
    state = load_file(str(weights))
    expected = {k: v for k, v in model.state_dict().items() if k != "input_scale"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {missing}, unexpected tensors {unexpected} for {arch}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(
                f"{weights}: tensor {name} has shape {list(t.shape)} but config.json implies "
                f"{list(expected[name].shape)} (d_in={cfg.d_in}, n_latents={cfg.n_latents})"
            )
    model.load_state_dict(state, strict=False)
    model.meta = config.get("meta", {})
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load a dictionary from a local directory or an HF hub repo (local HF cache works offline)."""
    path = Path(path_or_repo_id)
    if subfolder:
        path = path / subfolder
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: give a directory holding {CONFIG_NAME} + {WEIGHTS_NAME}")
    return load_local(path, device=device, dtype=dtype)
