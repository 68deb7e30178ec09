"""Peer checkpoint formats: detection, loading into our architectures, and shared helpers.

A directory is recognised by its files:

- ``sparsedict``: ``config.json`` with a ``"sparsedict_version"`` key + ``model.safetensors``;
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``;
- ``sparsify``: ``cfg.json`` + ``sae.safetensors`` (one hookpoint); a sparsify *run* directory holds one such
  subdirectory per hookpoint and needs ``subfolder=<hookpoint>``;
- ``dictionary_learning``: ``ae.pt`` (a state dict, read with ``torch.load(weights_only=True)``) + ``config.json``;
- ``circuit_tracer``: ``config.yaml`` with ``model_kind`` ``transcoder_set`` (``layer_{l}.safetensors``, loaded as a
  :class:`~sparsedict.dictionaries.TranscoderSet`) or ``cross_layer_transcoder`` (``W_enc_{l}``/``W_dec_{l}``,
  loaded as a ``clt``). A transcoder set of ours is a ``sparsedict`` directory whose config says
  ``"kind": "transcoder_set"``.

Each reader (:mod:`~sparsedict.formats.native`, ``saelens``, ``sparsify``, ``dictionary_learning``) maps the
checkpoint onto a registered architecture so that ``encode``/``decode`` give the numbers of the originating
library's forward pass, checking tensor names and shapes against the config before loading anything
(:mod:`~sparsedict.formats.common`). The registry is passed in by the caller (``Dictionary.from_pretrained``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from sparsedict.formats import native
from sparsedict.formats.circuit_tracer import is_circuit_tracer, load_circuit_tracer
from sparsedict.formats.common import Architectures, FormatError
from sparsedict.formats.dictionary_learning import load_dictionary_learning
from sparsedict.formats.saelens import load_saelens
from sparsedict.formats.sparsify import load_sparsify

EXPECTED_FILES = {
    "sparsedict": "config.json (with 'sparsedict_version') + model.safetensors",
    "saelens": "cfg.json + sae_weights.safetensors",
    "sparsify": "cfg.json + sae.safetensors (or a run directory with one such subdirectory per hookpoint)",
    "dictionary_learning": "ae.pt + config.json",
    "circuit_tracer": "config.yaml (model_kind transcoder_set / cross_layer_transcoder) + layer_{l} or W_enc_{l}/W_dec_{l} "
    ".safetensors",
}


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
    """Return ``sparsedict``, ``saelens``, ``sparsify``, ``sparsify_run``, ``dictionary_learning`` or ``circuit_tracer``.

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
    if is_circuit_tracer(path):
        return "circuit_tracer"
    if sparsify_hookpoints(path):
        return "sparsify_run"
    listing = ", ".join(sorted(has)[:20]) or "(empty)"
    raise FormatError(
        f"{path}: unknown checkpoint format (found: {listing}). Expected one of: {_expected_text()}. "
        "For a sparsify run or a hub repo with several dictionaries, pass subfolder=<hookpoint dir>."
    )


def load_dir(path: str | Path, registry: Architectures, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, fetch: Callable[[str], Path] | None = None):  # fmt: skip
    """Load the dictionary stored in local directory ``path`` (any supported format) from ``registry``.

    ``fetch`` turns a file URI the checkpoint lists (circuit-tracer's ``hf://`` ``transcoders`` entries) into a
    local file (:func:`sparsedict.hub.fetch_uri`); without it such an entry is refused."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "sparsedict":
        return native.load(path, registry, device=device, dtype=dtype)
    if fmt == "sparsify_run":
        hooks = sparsify_hookpoints(path)
        raise FormatError(
            f"{path} is a sparsify run directory with {len(hooks)} dictionaries; choose one with "
            f"subfolder=<name>, one of: {', '.join(hooks)}"
        )
    if fmt == "circuit_tracer":
        model = load_circuit_tracer(path, registry, fetch)
    else:
        loaders = {"saelens": load_saelens, "sparsify": load_sparsify}
        model = loaders.get(fmt, load_dictionary_learning)(path, registry)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


__all__ = ["EXPECTED_FILES", "FormatError", "detect_format", "load_dir", "native", "sparsify_hookpoints"]
