"""Peer checkpoint formats: detection, loading into our architectures, and shared helpers.

A directory is recognised by its files (METHODS.md §5):

- ``sparsedict``: ``config.json`` with a ``"sparsedict_version"`` key + ``model.safetensors``;
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``;
- ``sparsify``: ``cfg.json`` + ``sae.safetensors`` (one hookpoint); a sparsify *run* directory holds one such
  subdirectory per hookpoint and needs ``subfolder=<hookpoint>``;
- ``dictionary_learning``: ``ae.pt`` (a state dict, read with ``torch.load(weights_only=True)``) + ``config.json``.

Each peer module maps the checkpoint onto a registered architecture so that ``encode``/``decode`` give the
numbers of the originating library's forward pass; :func:`build_dictionary` checks tensor names and shapes
against the config before loading anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

EXPECTED_FILES = {
    "sparsedict": "config.json (with 'sparsedict_version') + model.safetensors",
    "saelens": "cfg.json + sae_weights.safetensors",
    "sparsify": "cfg.json + sae.safetensors (or a run directory with one such subdirectory per hookpoint)",
    "dictionary_learning": "ae.pt + config.json",
}


class FormatError(ValueError):
    """A checkpoint directory that cannot be read: unknown layout, missing/mis-shaped tensors, bad config."""


def _expected_text() -> str:
    return "; ".join(f"{name}: {files}" for name, files in EXPECTED_FILES.items())


def sparsify_hookpoints(path: Path) -> list[str]:
    """Hookpoint subdirectories (relative names, e.g. ``layers.3`` or ``layers.3/seed1``) of a sparsify run dir."""
    found = []
    for cfg in sorted(path.glob("*/cfg.json")) + sorted(path.glob("*/*/cfg.json")):
        if (cfg.parent / "sae.safetensors").exists():
            found.append(cfg.parent.relative_to(path).as_posix())
    return found


def detect_format(path: str | Path) -> str:
    """Return ``sparsedict``, ``saelens``, ``sparsify``, ``sparsify_run`` or ``dictionary_learning``.

    Raises :class:`FormatError` listing the expected file sets when nothing matches.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(
            f"{path} is not a directory; a checkpoint is a directory holding one of: {_expected_text()}"
        )
    has = {p.name for p in path.iterdir()}
    if "config.json" in has:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise FormatError(f"{path / 'config.json'} is not valid JSON ({err})") from err
        if isinstance(cfg, dict) and "sparsedict_version" in cfg:
            return "sparsedict"
    if "ae.pt" in has and "config.json" in has:
        return "dictionary_learning"
    if "cfg.json" in has and "sae_weights.safetensors" in has:
        return "saelens"
    if "cfg.json" in has and "sae.safetensors" in has:
        return "sparsify"
    if sparsify_hookpoints(path):
        return "sparsify_run"
    listing = ", ".join(sorted(has)[:20]) or "(empty)"
    raise FormatError(
        f"{path}: unknown checkpoint format (found: {listing}). Expected one of: {_expected_text()}. "
        "For a sparsify run or a hub repo with several dictionaries, pass subfolder=<hookpoint dir>."
    )


def load_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load the dictionary stored in local directory ``path`` (any supported format)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "sparsedict":
        from sparsedict.formats.native import load_local

        return load_local(path, device=device, dtype=dtype)
    if fmt == "sparsify_run":
        hooks = sparsify_hookpoints(path)
        raise FormatError(
            f"{path} is a sparsify run directory with {len(hooks)} dictionaries; choose one with "
            f"subfolder=<name>, one of: {', '.join(hooks)}"
        )
    if fmt == "saelens":
        from sparsedict.formats.saelens import load_saelens as loader
    elif fmt == "sparsify":
        from sparsedict.formats.sparsify import load_sparsify as loader
    else:
        from sparsedict.formats.dictionary_learning import load_dictionary_learning as loader
    model = loader(path)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


# -- shared helpers for the peer loaders -----------------------------------------------------------------


def parse_dtype(name: Any, where: str) -> str:
    """``"torch.float32"`` / ``"float32"`` / ``"fp32"`` / a torch dtype -> our dtype string (``"float32"``)."""
    if isinstance(name, torch.dtype):
        return str(name).removeprefix("torch.")
    text = str(name or "float32").removeprefix("torch.")
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "bf16": "bfloat16",
        "half": "float16",
        "float": "float32",
    }
    text = aliases.get(text, text)
    if text not in ("float32", "float16", "bfloat16", "float64"):
        raise FormatError(
            f"{where}: unsupported dtype {name!r} (expected float32, float16, bfloat16 or float64)"
        )
    return text


def require(tensors: dict[str, Tensor], names: list[str], where: str) -> None:
    """Raise naming the missing tensors (and those present) when any of ``names`` is absent."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FormatError(
            f"{where}: missing tensors {missing}; the file holds {sorted(tensors)}. "
            "The checkpoint is incomplete or not of the architecture its config declares."
        )


def log_threshold(theta: Tensor) -> Tensor:
    """``log θ`` for our JumpReLU; θ ≤ 0 behaves like θ = 0 under ``ReLU(z)·1[z > θ]``, whose log is −inf."""
    return torch.log(theta.clamp_min(0))


def set_threshold(state: dict[str, Tensor], expected: dict[str, Tensor], theta: Tensor, n: int) -> None:
    """Store a per-latent threshold ``θ [n]`` under whatever name the target architecture uses."""
    theta = theta.reshape(-1).expand(n) if theta.numel() == 1 else theta
    if "log_threshold" in expected:
        state["log_threshold"] = log_threshold(theta.float()).to(expected["log_threshold"].dtype)
    elif "threshold" in expected:
        shape = expected["threshold"].shape
        state["threshold"] = (
            theta.reshape(shape) if theta.numel() == math.prod(shape) else theta[:1].reshape(shape)
        )
    else:
        raise FormatError(
            f"the target architecture has no threshold parameter (state keys: {sorted(expected)})"
        )


def build_dictionary(arch: str, fields: dict[str, Any], where: str):
    """Instantiate registered architecture ``arch`` with config ``fields`` (unknown fields are an error)."""
    from sparsedict.config import from_dict
    from sparsedict.dictionaries import build, lookup

    try:
        _, cfg_cls = lookup(arch)
    except KeyError as err:
        raise FormatError(
            f"{where}: needs our architecture {arch!r}, which is not available ({err})"
        ) from err
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise FormatError(f"{where}: architecture {arch!r} has no config fields {unknown}")
    cfg = from_dict(cfg_cls, {**fields, "architecture": arch})
    return build(cfg)


def load_state(model, state: dict[str, Tensor], where: str, meta: dict[str, Any]):
    """Check names/shapes of ``state`` against ``model`` (built from the config) and load it."""
    expected = {k: v for k, v in model.state_dict().items() if k != "input_scale"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"{where}: after mapping to {model.architecture!r} the tensors {missing} are missing and "
            f"{unexpected} are unexpected"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise FormatError(
                f"{where}: tensor {name} has shape {list(t.shape)} (in our layout) but the config "
                f"(d_in={model.d_in}, n_latents={model.n_latents}, d_out={model.d_out}) implies "
                f"{list(expected[name].shape)}: the config and the weights disagree"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    model.meta = meta
    return model


def check_shape(t: Tensor, shape: tuple[int, ...], name: str, where: str, hint: str) -> None:
    """Raise when tensor ``name`` does not have ``shape`` (``hint`` names the config fields)."""
    if tuple(t.shape) != tuple(shape):
        raise FormatError(
            f"{where}: tensor {name} has shape {list(t.shape)} but {hint} implies {list(shape)}: "
            "the config and the weights disagree"
        )


_TL_SITES = {
    "hook_resid_post": "resid_post",
    "hook_resid_pre": "resid_pre",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_post": "mlp_hidden",
    "attn.hook_z": "attn_z",
}


def from_transformerlens(name: str) -> str:
    """TransformerLens hook name -> our alias (``blocks.6.hook_resid_post`` -> ``resid_post.6``).

    Unknown names are returned unchanged (the original is always kept in ``meta["source_hookpoint"]``).
    """
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _TL_SITES:
        return f"{_TL_SITES[parts[2]]}.{parts[1]}"
    return name


__all__ = ["EXPECTED_FILES", "FormatError", "build_dictionary", "detect_format", "load_dir", "load_state"]
