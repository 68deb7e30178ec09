"""Our own checkpoint format: ``config.json`` + ``model.safetensors`` (+ a generated ``README.md`` model card).

``config.json`` holds ``{"sparsedict_version", "architecture", "dictionary": <DictionaryConfig fields>,
"sparsity_fields", "meta": {model, hookpoint, normalisation constant, training tokens, exclusions, metrics,
...}}``. Weights are saved with the input normalisation folded in, so a loaded dictionary works on raw
activations. Every file is written atomically; :func:`update_meta` adds to ``meta`` later (held-out metrics)
and re-renders the model card, so the card never disagrees with ``config.json``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsedict._version import __version__
from sparsedict.cache.hooks import at_layer
from sparsedict.config import from_dict
from sparsedict.formats.common import Architectures, build_dictionary, load_state
from sparsedict.formats.modelcard import render
from sparsedict.util import atomic_write, write_json_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


def save(model, path: str | os.PathLike, meta: dict[str, Any] | None = None, model_card: bool = True) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (input scale folded into the weights) + ``README.md``.

    ``meta`` defaults to the ``meta`` a loaded dictionary carries; ``model_card=False`` skips the README.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scale = float(model.input_scale)
    export = copy.deepcopy(model)
    export.fold_scaling()
    tensors = {k: v.detach().contiguous().cpu() for k, v in export.state_dict().items() if k != "input_scale"}
    meta = dict(meta if meta is not None else model.meta)
    meta.setdefault("input_scale_folded", scale)
    config = {
        "sparsedict_version": __version__,
        "architecture": model.architecture,
        "dictionary": export.cfg.to_dict(),  # a fold may change config fields in activation units
        "sparsity_fields": list(type(model).sparsity_fields),
        "meta": meta,
    }
    return _write(path, tensors, config, model_card)


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], model_card: bool) -> Path:
    """Write ``model.safetensors``, ``config.json`` (plain JSON: other values as strings) and the model card."""
    config = json.loads(json.dumps(config, default=str))
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json_atomic(path / CONFIG_NAME, config, indent=2)
    if model_card:
        atomic_write(path / CARD_NAME, render(config))
    return path


SET_KIND = "transcoder_set"


def save_set(
    tset, path: str | os.PathLike, meta: dict[str, Any] | None = None, model_card: bool = True
) -> Path:
    """Write a transcoder set as one directory: ``config.json`` (``"kind": "transcoder_set"``, the set's config
    with its ``layers``, each member's meta) + ``model.safetensors`` (member tensors under ``layer{l}.``, input
    scales folded) + ``README.md``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, members = {}, {}
    for layer, m in tset.items():
        export = copy.deepcopy(m)
        members[str(layer)] = {"meta": {**m.meta, "input_scale_folded": float(m.input_scale)}}
        export.fold_scaling()
        for k, v in export.state_dict().items():
            if k != "input_scale":
                tensors[f"layer{layer}.{k}"] = v.detach().contiguous().cpu()
    member_cls = type(tset.transcoders[0])
    config = {
        "sparsedict_version": __version__,
        "kind": SET_KIND,
        "architecture": tset.cfg.architecture,
        "dictionary": tset.cfg.to_dict(),
        "sparsity_fields": list(member_cls.sparsity_fields),
        "members": members,
        "meta": dict(meta if meta is not None else tset.meta),
    }
    return _write(path, tensors, config, model_card)


def _load_set(path: Path, config: dict[str, Any], registry: Architectures):
    arch = config["architecture"]
    _, cfg_cls = registry.lookup(arch)
    known = set(cfg_cls.__dataclass_fields__)
    cfg = from_dict(cfg_cls, {k: v for k, v in config["dictionary"].items() if k in known})
    tensors = load_file(str(path / WEIGHTS_NAME))
    members = {}
    for layer in cfg.layers:
        prefix = f"layer{layer}."
        fields = {**cfg.to_dict(), "layers": [], "hookpoint": at_layer(cfg.hookpoint, layer),
                  "target": at_layer(cfg.target, layer) if cfg.is_transcoder else ""}  # fmt: skip
        fields.pop("architecture")
        model = build_dictionary(registry, arch, fields, str(path / CONFIG_NAME))
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        member_meta = config.get("members", {}).get(str(layer), {}).get("meta", {})
        members[layer] = load_state(
            model, state, f"{path / WEIGHTS_NAME} ({prefix}*)", member_meta, CONFIG_NAME
        )
    out = registry.build_set(cfg, members)
    out.meta = config.get("meta", {})
    return out


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
        raise ValueError(
            f"{cfg_path} is not valid JSON ({err}); the checkpoint is corrupt, re-save it"
        ) from err


def update_meta(path: str | os.PathLike, repo_id: str | None = None, **entries: Any) -> dict[str, Any]:
    """Add ``entries`` to ``meta`` in ``path/config.json`` and re-render the model card; returns the config."""
    path = Path(path)
    config = read_config(path)
    config.setdefault("meta", {}).update(json.loads(json.dumps(entries, default=str)))
    write_json_atomic(path / CONFIG_NAME, config, indent=2)
    if (path / CARD_NAME).exists() or repo_id is not None:
        atomic_write(path / CARD_NAME, render(config, repo_id=repo_id))
    return config


def load(path: str | os.PathLike, registry: Architectures, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None):  # fmt: skip
    """Load a sparsedict checkpoint directory into its registered architecture (in eval mode)."""
    path = Path(path)
    config = read_config(path)
    arch = config.get("architecture")
    if arch is None or "dictionary" not in config:
        raise ValueError(f"{path / CONFIG_NAME} lacks 'architecture'/'dictionary': not a sparsedict config")
    if config.get("kind") == SET_KIND:
        if not (path / WEIGHTS_NAME).exists():
            raise FileNotFoundError(
                f"{path / WEIGHTS_NAME} is missing: the checkpoint at {path} is incomplete"
            )
        model = _load_set(path, config, registry)
        model.to(device=device)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()
    _, cfg_cls = registry.lookup(arch)
    known = set(cfg_cls.__dataclass_fields__)
    extra = set(config["dictionary"]) - known
    if extra:
        warnings.warn(
            f"{path / CONFIG_NAME}: ignoring unknown keys {sorted(extra)} (newer sparsedict?)", stacklevel=2
        )
    fields = {k: v for k, v in config["dictionary"].items() if k in known}
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing: the checkpoint at {path} is incomplete")
    model = build_dictionary(registry, arch, fields, str(path / CONFIG_NAME))
    load_state(model, load_file(str(weights)), str(weights), config.get("meta", {}), config=CONFIG_NAME)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()
