"""SAELens (≥ 6.0) checkpoints: ``cfg.json`` + ``sae_weights.safetensors``, read and written.

Layout is ours: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``; jumprelu ``threshold [d_sae]``; gated ``b_gate, b_mag, r_mag [d_sae]`` (no ``b_enc``);
skip transcoders ``W_skip [d_out, d_in]`` (used as ``x W_skipᵀ``). SAELens encodes
``z = (x − apply_b_dec_to_input·b_dec) W_enc + b_enc`` and decodes ``f W_dec + b_dec``.

Architecture map (SAELens -> ours): standard -> relu, topk -> topk, jumprelu -> jumprelu, gated -> gated,
transcoder -> relu with a target, skip_transcoder -> relu with ``skip``, jumprelu_transcoder -> jumprelu with a
target. ``batchtopk``/``matryoshka_batchtopk`` are training-only in SAELens and are saved as ``jumprelu``.
A topk ``rescale_acts_by_decoder_norm`` checkpoint is folded (``W_enc[:, i]``, ``b_enc[i]`` times ‖W_dec[i]‖,
``W_dec[i]`` divided by it), which leaves both the codes and the reconstruction unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsedict.formats.common import (
    Architectures,
    FormatError,
    build_dictionary,
    check_shape,
    from_transformerlens,
    load_state,
    parse_dtype,
    require,
    set_threshold,
)
from sparsedict.util import atomic_write, write_json_atomic

SAE_LENS_VERSION = "6.0.0"
"""Written into ``metadata.sae_lens_version``: SAELens treats a config without it as pre-6.0 (legacy converter)."""

_TRANSCODERS = {"transcoder", "skip_transcoder", "jumprelu_transcoder"}
_ARCH = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
}


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{path / 'cfg.json'} is not valid JSON ({err})") from err
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise FormatError(f"{path / 'cfg.json'} lacks {key!r}: not a SAELens config")
    return cfg


def load_saelens(path: str | Path, registry: Architectures):
    """Load a SAELens directory into the matching sparsedict architecture (see module docstring)."""
    path = Path(path)
    where = str(path / "sae_weights.safetensors")
    cfg = _read_cfg(path)
    meta_in = dict(cfg.get("metadata") or {})
    # Pre-6.0 configs keep metadata at the top level.
    for key in ("model_name", "hook_name", "context_size", "dataset_path", "prepend_bos"):
        if key in cfg and key not in meta_in:
            meta_in[key] = cfg[key]
    arch_in = cfg.get("architecture", "standard")
    if arch_in in ("batchtopk", "matryoshka_batchtopk"):
        arch_in = "jumprelu"  # SAELens saves these as jumprelu with the estimated threshold
    if arch_in not in _ARCH:
        raise FormatError(
            f"{path / 'cfg.json'}: SAELens architecture {arch_in!r} is not supported; supported: {sorted(_ARCH)}"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise FormatError(
            f"{path / 'cfg.json'}: normalize_activations={norm!r} rescales every token at run time, which no "
            "sparsedict architecture does; only 'none' and 'expected_average_only_in' (a constant that SAELens "
            "does not apply at inference) can be loaded"
        )
    if (cfg.get("reshape_activations") or "none") != "none" or cfg.get("hook_head_index") is not None:
        raise FormatError(
            f"{path / 'cfg.json'}: per-head SAEs (reshape_activations={cfg.get('reshape_activations')!r}, "
            f"hook_head_index={cfg.get('hook_head_index')!r}) are not supported; flatten heads into hook_z"
        )
    d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out") or d_in)
    arch = _ARCH[arch_in]
    t = load_file(str(path / "sae_weights.safetensors"))
    # Lower-case w_* keys appear in some published checkpoints (Gemma Scope style).
    t = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in t.items()}
    gated = arch == "gated"
    require(t, ["W_enc", "W_dec", "b_dec"] + (["b_gate", "b_mag", "r_mag"] if gated else ["b_enc"]), where)
    hint = f"cfg.json (d_in={d_in}, d_sae={n}, d_out={d_out})"
    check_shape(t["W_enc"], (d_in, n), "W_enc", where, hint)
    check_shape(t["W_dec"], (n, d_out), "W_dec", where, hint)
    check_shape(t["b_dec"], (d_out,), "b_dec", where, hint)
    transcoder = arch_in in _TRANSCODERS
    hook = meta_in.get("hook_name", "")
    hook_out = meta_in.get("hook_name_out", "") if transcoder else ""
    fields: dict[str, Any] = {
        "hookpoint": from_transformerlens(hook),
        "target": from_transformerlens(hook_out) if hook_out else "",
        "d_in": d_in,
        "d_out": d_out,
        "n_latents": n,
        "skip": arch_in == "skip_transcoder",
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder,
        "dtype": parse_dtype(cfg.get("dtype"), str(path / "cfg.json")),
    }
    state = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if arch == "topk":
        fields["k"] = int(cfg.get("k", 0)) or _missing(path, "k")
        state["b_enc"] = t["b_enc"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            s = t["W_dec"].float().norm(dim=1)
            state["W_enc"] = (t["W_enc"].float() * s).to(t["W_enc"].dtype)
            state["b_enc"] = (t["b_enc"].float() * s).to(t["b_enc"].dtype)
            state["W_dec"] = (t["W_dec"].float() / s[:, None]).to(t["W_dec"].dtype)
    elif not gated:
        state["b_enc"] = t["b_enc"]
    if fields["skip"]:
        require(t, ["W_skip"], where)
        check_shape(t["W_skip"], (d_out, d_in), "W_skip", where, hint)
        state["W_skip"] = t["W_skip"]
    meta = {
        "source_format": "saelens",
        "source_architecture": cfg.get("architecture", "standard"),
        "source_hookpoint": hook,
        "model": meta_in.get("model_name", ""),
        "hookpoint": fields["hookpoint"],
        "normalize_activations": norm,
    }
    meta.update({k: meta_in[k] for k in ("context_size", "dataset_path", "sae_lens_version") if k in meta_in})
    model = build_dictionary(registry, arch, fields, where)
    expected = model.state_dict()
    if arch == "jumprelu":
        require(t, ["threshold"], where)
        check_shape(t["threshold"], (n,), "threshold", where, hint)
        set_threshold(state, expected, t["threshold"], n)
    if gated:
        for name in ("b_gate", "b_mag", "r_mag"):
            check_shape(t[name], (n,), name, where, hint)
            state[name] = t[name]
    return load_state(model, state, where, meta)


def _missing(path: Path, key: str):
    raise FormatError(f"{path / 'cfg.json'} lacks {key!r}, which its architecture needs")


# -- export ------------------------------------------------------------------------------------------------


def saelens_architecture(model) -> str:
    """The SAELens architecture name for our dictionary (its class's ``saelens_architecture`` and the config's
    transcoder/skip variant), or a FormatError when SAELens has none."""
    arch, cfg, base = model.architecture, model.cfg, type(model).saelens_architecture
    transcoder = cfg.is_transcoder or model.d_out != model.d_in
    if base == "standard":
        if cfg.skip:
            return "skip_transcoder"
        return "transcoder" if transcoder else "standard"
    if cfg.skip and base is not None:
        raise FormatError(f"SAELens has no skip-connection variant of {arch!r}; only relu (skip_transcoder)")
    if base == "jumprelu":
        return "jumprelu_transcoder" if transcoder else "jumprelu"
    if base is not None and not transcoder:
        return base
    raise FormatError(
        f"architecture {arch!r}{' (transcoder)' if transcoder else ''} has no SAELens equivalent; "
        "SAELens has standard/transcoder/skip_transcoder, topk, jumprelu and jumprelu_transcoder, gated"
    )


def inference_threshold(model) -> torch.Tensor:
    """Per-latent θ ``[n]`` of a jumprelu, or the inference threshold of batchtopk/matryoshka."""
    sd = model.state_dict()
    if "threshold" in sd:
        th = sd["threshold"].float().reshape(-1)
        if th.numel() == 1 and float(th) < 0:
            raise FormatError(f"{model.architecture}: the inference threshold is unset (<0); train longer")
        return th.expand(model.n_latents).clone() if th.numel() == 1 else th
    raise FormatError(f"{model.architecture} has no threshold to export (state keys: {sorted(sd)})")


def save_saelens(model, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` that SAELens ≥ 6.0 loads (input scale folded)."""
    import copy

    path = Path(path)
    arch = saelens_architecture(model)
    meta = {**getattr(model, "meta", {}), **(meta or {})}
    export = copy.deepcopy(model).float()
    export.fold_scaling()
    sd = {k: v.detach().cpu().contiguous() for k, v in export.state_dict().items()}
    tensors = {"W_enc": sd["W_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    if arch == "gated":
        tensors.update({k: sd[k] for k in ("b_gate", "b_mag", "r_mag")})
    else:
        tensors["b_enc"] = sd["b_enc"]
    if arch.startswith("jumprelu"):
        tensors["threshold"] = inference_threshold(export).contiguous()
    if arch == "skip_transcoder":
        tensors["W_skip"] = sd["W_skip"]
    transcoder = arch in _TRANSCODERS
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": model.d_in,
        "d_sae": model.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(model.subtracts_b_dec),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": meta.get("model", ""),
            "hook_name": meta.get("source_hookpoint") or model.cfg.hookpoint,
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": None,
            "exported_by": "sparsedict",
        },
    }
    if arch == "topk":
        cfg["k"] = int(model.cfg.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    if transcoder:
        cfg["d_out"] = model.d_out
        cfg["metadata"]["hook_name_out"] = model.cfg.target
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path / "sae_weights.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    write_json_atomic(path / "cfg.json", cfg, indent=2)
    return path
