"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (config.json + model.safetensors).

``config.json`` holds ``{"sparsedict_version", "architecture", "dictionary": <DictionaryConfig fields>,
"meta": {model, hookpoint, normalisation constant, training tokens, exclusions, metrics, ...}}``.
Weights are saved with the input normalisation folded in, so a loaded dictionary works on raw
activations; a generated model card (``README.md``) goes beside them. ``from_pretrained`` takes a local
directory or an HF hub repo id (downloaded through ``huggingface_hub``, so the HF cache and
``HF_HUB_OFFLINE=1`` work) in our format or a peer format (SAELens, sparsify, dictionary_learning), detected
by :mod:`sparsedict.formats`.
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
CARD_NAME = "README.md"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(
    model, path: str | os.PathLike, meta: dict[str, Any] | None = None, model_card: bool = True
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (input scale folded into the weights) + ``README.md``.

    ``meta`` defaults to the ``meta`` a loaded dictionary carries; ``model_card=False`` skips the README.
    """
    from sparsedict import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scale = float(model.input_scale)
    export = copy.deepcopy(model)
    export.fold_scaling()
    tensors = {k: v.detach().contiguous().cpu() for k, v in export.state_dict().items() if k != "input_scale"}
    meta = dict(meta if meta is not None else getattr(model, "meta", None) or {})
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
    if model_card:
        from sparsedict.formats.modelcard import render

        _atomic_write_text(path / CARD_NAME, render(json.loads(json.dumps(config, default=str))))
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
        raise ValueError(
            f"{cfg_path} is not valid JSON ({err}); the checkpoint is corrupt, re-save it"
        ) from err


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

        warnings.warn(
            f"{path / CONFIG_NAME}: ignoring unknown keys {sorted(extra)} (newer sparsedict?)", stacklevel=2
        )
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


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _download(repo_id: str, subfolder: str | None, revision: str | None) -> Path:
    """Snapshot ``repo_id`` (only ``subfolder`` when given) into the HF cache and return the local dir."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from err

    def fetch(patterns: list[str] | None) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except LocalEntryNotFoundError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            why = (
                "HF_HUB_OFFLINE is set and it is not in the local HF cache" if offline else "it is not cached"
            )
            raise FileNotFoundError(
                f"cannot load {repo_id!r} (revision {revision or 'main'}): {why} and the hub could not be "
                f"reached ({err}). Download it once with network access, or pass a local directory."
            ) from err
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise FileNotFoundError(f"no hub repo/revision {repo_id!r}@{revision or 'main'}: {err}") from err

    if subfolder:
        sub = subfolder.strip("/")
        return fetch([f"{sub}/*"]) / sub
    # Whole repo: look at the configs first so a multi-dictionary repo (sparsify run) is not downloaded
    # entirely just to be told to choose a subfolder.
    root = fetch(["*.json", "*.md"])
    from sparsedict.formats import FormatError, detect_format

    try:
        if detect_format(root) == "sparsify_run":
            return root
    except FormatError:
        pass
    return fetch(None)


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load a dictionary from a local directory or an HF hub repo id, in any supported format.

    ``subfolder`` picks one dictionary inside a directory/repo holding several (a sparsify run, a SAELens
    release); ``revision`` a hub branch, tag or commit. The format is detected from the files
    (:func:`sparsedict.formats.detect_format`); weights are returned on ``device`` in ``dtype`` (default:
    the checkpoint's dtype), in eval mode.
    """
    from sparsedict.formats import load_dir

    path = Path(path_or_repo_id)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repos, but {path} is a local directory")
        if subfolder:
            path = path / subfolder
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist: subfolder {subfolder!r} is not in {path_or_repo_id}"
                )
    elif _looks_like_repo_id(str(path_or_repo_id)):
        path = _download(str(path_or_repo_id), subfolder, revision)
    else:
        raise FileNotFoundError(
            f"no checkpoint at {path}: give a local directory (config.json + model.safetensors, or a SAELens, "
            "sparsify or dictionary_learning directory) or a hub repo id 'org/name'"
        )
    return load_dir(path, device=device, dtype=dtype)


def push_to_hub(
    model,
    repo_id: str,
    meta: dict[str, Any] | None = None,
    subfolder: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Save ``model`` (config.json + model.safetensors + README.md) and upload it to hub repo ``repo_id``.

    ``subfolder`` uploads into a folder of the repo (several dictionaries in one repo). Returns the commit
    URL. Needs network access and a token (``HF_TOKEN`` or ``huggingface-cli login``).
    """
    import tempfile

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise RuntimeError(
            f"push_to_hub({repo_id!r}): HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use "
            "save_pretrained(dir) and upload the directory later"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sparsedict-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "dictionary", meta)
        if subfolder is None:
            from sparsedict.formats.modelcard import render

            _atomic_write_text(folder / CARD_NAME, render(read_config(folder), repo_id=repo_id))
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=subfolder or None,
            commit_message=commit_message or f"Upload {model.architecture} dictionary with sparsedict",
            revision=revision,
        )
    return str(getattr(info, "commit_url", info))
