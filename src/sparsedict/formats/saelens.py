"""SAELens (≥ 6.0) checkpoints: ``cfg.json`` + ``sae_weights.safetensors``, read and written.

Layout is ours: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``; jumprelu ``threshold [d_sae]``; gated ``b_gate, b_mag, r_mag [d_sae]`` (no ``b_enc``);
skip transcoders ``W_skip [d_out, d_in]`` (used as ``x W_skipᵀ``). SAELens encodes
``z = (x − apply_b_dec_to_input·b_dec) W_enc + b_enc`` and decodes ``f W_dec + b_dec``.

Architecture map (SAELens -> ours): standard -> relu, topk -> topk, jumprelu -> jumprelu, gated -> gated,
transcoder -> relu with a target, skip_transcoder -> relu with ``skip``, jumprelu_transcoder -> jumprelu with a
target, jumprelu_skip_transcoder -> jumprelu with a target and ``skip``. ``batchtopk``/``matryoshka_batchtopk``
are training-only in SAELens: its inference export is a ``jumprelu``, and a training checkpoint of theirs
(``topk_threshold``, no ``threshold``) is read the way that export writes it (θ = ``topk_threshold`` for every
latent). A ``rescale_acts_by_decoder_norm`` checkpoint (topk and the batchtopk family) is folded (``W_enc[:, i]``,
``b_enc[i]`` times ‖W_dec[i]‖, ``W_dec[i]`` divided by it), which leaves both the codes and the reconstruction
unchanged.

``normalize_activations = "expected_average_only_in"``: SAELens trains on ``c·x`` (``c = √d_in / E‖x‖``) and
folds c into the weights only at the end of training (``W_enc·c``, ``W_dec/c``, ``b_dec/c``, and
``topk_threshold/c`` for a rescaled batchtopk), where it also sets ``normalize_activations`` to ``"none"``. A
directory that still says ``expected_average_only_in`` holds unfolded weights: c is read from its
``activation_scaler.json`` and folded the same way; without that file it is refused.

A checkpoint trained on a TransformerLens model loaded with weight processing (``fold_ln``,
``center_writing_weights``, ``fold_value_biases``, ``refactor_factored_attn_matrices`` in
``metadata.model_from_pretrained_kwargs``; SAELens loads ``HookedTransformer`` models with
``from_pretrained_no_processing`` plus those kwargs) saw activations that differ from the raw Hugging Face
model's; loading it warns. Attention z SAEs (``blocks.L.attn.hook_z`` with ``reshape_activations: hook_z``, or one
head with ``hook_head_index``) load at ``attn_z.L`` / ``attn_z.L.h<k>``.

Export (:func:`save_saelens`) writes what the dictionary computes at inference: BatchTopK and a batch-selection
Matryoshka as a ``jumprelu`` with their threshold θ, a per-token Matryoshka as ``topk``. ``metadata.hook_name`` is
the TransformerLens hook (``resid_post.6`` -> ``blocks.6.hook_resid_post``, see
:func:`~sparsedict.formats.common.to_transformerlens`), ``hf_hook_name`` the module path and
``sparsedict_hookpoint`` our name; a hookpoint with no TransformerLens equivalent warns.
"""

from __future__ import annotations

import json
import math
import re
import warnings
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
    to_transformerlens,
)
from sparsedict.util import atomic_write, write_json_atomic

SAE_LENS_VERSION = "6.0.0"
"""Written into ``metadata.sae_lens_version``: SAELens treats a config without it as pre-6.0 (legacy converter)."""

_TRANSCODERS = {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"}
_SKIP = {"skip_transcoder", "jumprelu_skip_transcoder"}
_BATCHTOPK = {"batchtopk", "matryoshka_batchtopk"}
_ARCH = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}
_UNSUPPORTED = {
    "abstopk": "it keeps the k largest |pre-activations| with their sign (no ReLU), which no sparsedict "
    "architecture computes",
    "matching_pursuit": "its pursuit stops on a residual-norm threshold or a repeated support, while sparsedict's "
    "'mp' runs a fixed number of steps",
    "temporal": "its encoder attends over previous tokens; sparsedict dictionaries encode each token alone",
}
_TRAINING_NAMES = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}
"""SAELens training architecture of ours whose inference export is a jumprelu (``metadata.training_architecture``)."""
_TL_PROCESSING = ("fold_ln", "center_writing_weights", "fold_value_biases", "refactor_factored_attn_matrices")
"""TransformerLens ``from_pretrained`` flags that change hooked activations (``center_unembed`` only changes logits)."""


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
    if arch_in in _UNSUPPORTED:
        raise FormatError(
            f"{path / 'cfg.json'}: SAELens architecture {arch_in!r} cannot be loaded: {_UNSUPPORTED[arch_in]}"
        )
    if arch_in not in _ARCH:
        raise FormatError(
            f"{path / 'cfg.json'}: SAELens architecture {arch_in!r} is not supported; supported: {sorted(_ARCH)}"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise FormatError(
            f"{path / 'cfg.json'}: normalize_activations={norm!r} rescales every token at run time, which no "
            "sparsedict architecture does; only 'none' and 'expected_average_only_in' (with its "
            "activation_scaler.json) can be loaded"
        )
    if norm == "covariance_whitening":
        raise FormatError(
            f"{path / 'cfg.json'}: normalize_activations='covariance_whitening' means unfolded weights trained on "
            "whitened activations (an intermediate SAELens checkpoint); load it with SAELens, call "
            "sae.fold_activation_whitening(...) with the statistics in activation_whitening.safetensors, save it "
            "with normalize_activations='none' and load that"
        )
    if norm not in ("none", "expected_average_only_in"):
        raise FormatError(f"{path / 'cfg.json'}: unknown normalize_activations={norm!r}")
    scale = _scaling_factor(path) if norm == "expected_average_only_in" else 1.0
    head = cfg.get("hook_head_index", meta_in.get("hook_head_index"))
    reshape = cfg.get("reshape_activations") or "none"
    hook = meta_in.get("hook_name", "")
    z = hook.endswith(".attn.hook_z")
    if reshape not in ("none", "hook_z") or (reshape == "hook_z" and (not z or head is not None)):
        raise FormatError(
            f"{path / 'cfg.json'}: reshape_activations={reshape!r} with hook_name={hook!r} and hook_head_index="
            f"{head!r} is not supported; only 'hook_z' on blocks.L.attn.hook_z (all heads flattened) or a "
            "hook_head_index of it"
        )
    if head is not None and not z:
        raise FormatError(
            f"{path / 'cfg.json'}: hook_head_index={head!r} on {hook!r}: sparsedict selects heads of attention z "
            "(blocks.L.attn.hook_z) only"
        )
    d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out") or d_in)
    arch = _ARCH[arch_in]
    t = load_file(str(path / "sae_weights.safetensors"))
    # Lower-case w_* keys appear in some published checkpoints (Gemma Scope style).
    t = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in t.items()}
    gated = arch == "gated"
    require(t, ["W_enc", "W_dec", "b_dec"] + (["b_gate", "b_mag", "r_mag"] if gated else ["b_enc"]), where)
    if (
        arch_in in _BATCHTOPK and "threshold" not in t
    ):  # a training checkpoint: θ is the running topk_threshold
        require(t, ["topk_threshold"], where)
        t["threshold"] = t["topk_threshold"].reshape(-1).expand(int(cfg["d_sae"])).clone()
    if (
        arch == "jumprelu" and "threshold" not in t and "log_threshold" in t
    ):  # older JumpReLU training checkpoints
        t["threshold"] = t["log_threshold"].exp()
    if scale != 1.0:
        t = _fold_input_scale(
            t, scale, rescaled=arch_in in _BATCHTOPK and bool(cfg.get("rescale_acts_by_decoder_norm"))
        )
    hint = f"cfg.json (d_in={d_in}, d_sae={n}, d_out={d_out})"
    check_shape(t["W_enc"], (d_in, n), "W_enc", where, hint)
    check_shape(t["W_dec"], (n, d_out), "W_dec", where, hint)
    check_shape(t["b_dec"], (d_out,), "b_dec", where, hint)
    transcoder = arch_in in _TRANSCODERS
    hook_out = meta_in.get("hook_name_out", "") if transcoder else ""
    fields: dict[str, Any] = {
        "hookpoint": from_transformerlens(hook, None if head is None else int(head)),
        "target": from_transformerlens(hook_out, meta_in.get("hook_head_index_out")) if hook_out else "",
        "d_in": d_in,
        "d_out": d_out,
        "n_latents": n,
        "skip": arch_in in _SKIP,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder,
        "dtype": parse_dtype(cfg.get("dtype"), str(path / "cfg.json")),
    }
    state = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if not gated:
        state["b_enc"] = t["b_enc"]
    if arch == "topk":
        fields["k"] = int(cfg.get("k", 0)) or _missing(path, "k")
    if cfg.get("rescale_acts_by_decoder_norm") and (arch == "topk" or arch_in in _BATCHTOPK):
        s = t["W_dec"].float().norm(dim=1)
        state["W_enc"] = (t["W_enc"].float() * s).to(t["W_enc"].dtype)
        state["b_enc"] = (t["b_enc"].float() * s).to(t["b_enc"].dtype)
        state["W_dec"] = (t["W_dec"].float() / s[:, None]).to(t["W_dec"].dtype)
    if fields["skip"]:
        require(t, ["W_skip"], where)
        check_shape(t["W_skip"], (d_out, d_in), "W_skip", where, hint)
        state["W_skip"] = t["W_skip"]
    meta = {
        "source_format": "saelens",
        "source_architecture": cfg.get("architecture", "standard"),
        "source_hookpoint": hook,
        **({"source_hook_head_index": int(head)} if head is not None else {}),
        "model": meta_in.get("model_name", ""),
        "hookpoint": fields["hookpoint"],
        "normalize_activations": norm,
    }
    if scale != 1.0:
        meta["input_scale_folded"] = scale
    processing = _tl_processing(meta_in)
    if processing:
        meta["transformerlens_processing"] = processing
        warnings.warn(
            f"{path}: this SAE was trained on {meta_in.get('model_name') or 'a model'} loaded by TransformerLens "
            f"with {', '.join(f'{k}=True' for k in processing)} (metadata.model_from_pretrained_kwargs), so its "
            "activations differ from the raw Hugging Face model's that sparsedict hooks; encode activations of "
            "a model processed the same way, or expect worse reconstructions",
            UserWarning,
            stacklevel=3,
        )
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


def _scaling_factor(path: Path) -> float:
    """The factor c of an unfolded ``expected_average_only_in`` checkpoint, from its ``activation_scaler.json``."""
    file = path / "activation_scaler.json"
    fix = (
        f"{path / 'cfg.json'}: normalize_activations='expected_average_only_in' means unfolded weights trained on "
        "c·x (c = √d_in / mean ‖x‖), but"
    )
    how = (
        'write {"scaling_factor": c} to activation_scaler.json next to cfg.json (SAELens\' pretrained_saes.yaml '
        "lists norm_scaling_factor for registry releases), or load it with SAELens, call "
        "sae.fold_activation_norm_scaling_factor(c) and save it"
    )
    if not file.exists():
        raise FormatError(f"{fix} {file.name} is missing, so c is unknown: {how}")
    try:
        c = json.loads(file.read_text()).get("scaling_factor")
    except (json.JSONDecodeError, AttributeError) as err:
        raise FormatError(f"{file} is not a JSON object with 'scaling_factor' ({err})") from err
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) or c <= 0:
        raise FormatError(f"{fix} {file} gives scaling_factor={c!r}, not a positive number: {how}")
    return float(c)


def _fold_input_scale(t: dict[str, torch.Tensor], c: float, rescaled: bool) -> dict[str, torch.Tensor]:
    """SAELens ``fold_activation_norm_scaling_factor``: ``W_enc·c``, ``W_dec/c``, ``b_dec/c`` (same codes on raw x).

    A rescaled batchtopk compares ``z·‖W_dec[i]‖`` with its threshold, so that threshold is divided by c too.
    """
    out = dict(t)
    for name, op in (("W_enc", c), ("W_dec", 1 / c), ("b_dec", 1 / c)):
        out[name] = (t[name].float() * op).to(t[name].dtype)
    if rescaled:
        out["threshold"] = (t["threshold"].float() / c).to(t["threshold"].dtype)
    return out


def _tl_processing(meta: dict[str, Any]) -> list[str]:
    """TransformerLens weight-processing flags a SAELens config asks for when it loads its model."""
    if (meta.get("model_class_name") or "HookedTransformer") != "HookedTransformer":
        return []
    kwargs = meta.get("model_from_pretrained_kwargs") or {}
    if not isinstance(kwargs, dict):
        return []
    return [k for k in _TL_PROCESSING if kwargs.get(k)]


def _missing(path: Path, key: str):
    raise FormatError(f"{path / 'cfg.json'} lacks {key!r}, which its architecture needs")


# -- export ------------------------------------------------------------------------------------------------


def saelens_architecture(model) -> str:
    """The SAELens architecture name for our dictionary (what its inference computes,
    ``model.inference_architecture()``, and the config's transcoder/skip variant), or a FormatError when
    SAELens has none."""
    arch, cfg, base = model.architecture, model.cfg, model.inference_architecture()
    transcoder = cfg.is_transcoder or model.d_out != model.d_in
    if base == "standard":
        if cfg.skip:
            return "skip_transcoder"
        return "transcoder" if transcoder else "standard"
    if base == "jumprelu":
        if cfg.skip:
            return "jumprelu_skip_transcoder"
        return "jumprelu_transcoder" if transcoder else "jumprelu"
    if base is not None and (cfg.skip or transcoder):
        raise FormatError(
            f"SAELens has no transcoder or skip variant of {base!r} (the inference of {arch!r}); it has "
            "transcoder/skip_transcoder (relu) and jumprelu_transcoder/jumprelu_skip_transcoder"
        )
    if base is not None:
        return base
    raise FormatError(
        f"architecture {arch!r}{' (transcoder)' if transcoder else ''} has no SAELens equivalent; "
        "SAELens has standard/transcoder/skip_transcoder, topk, jumprelu and its transcoders, gated"
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


def saelens_hook(name: str, meta: dict[str, Any], what: str = "hookpoint") -> dict[str, Any]:
    """SAELens metadata for one of our hookpoints: ``hook_name`` (TransformerLens), ``hook_head_index``,
    ``hf_hook_name`` (the Hugging Face module path, when known), and the warning text when no TransformerLens hook
    holds the same activation.

    A dictionary loaded from SAELens keeps the hook name it came with (``meta["source_hookpoint"]``).
    """
    raw = not re.fullmatch(r"[a-z_]+\.\d+(\.h\d+)?", name)  # a module path, not an alias
    hf = (meta.get("hookpoint_paths") or {}).get(name) or (name if raw else None)
    out: dict[str, Any] = {"hook_name": name, "hook_head_index": None, "hf_hook_name": hf, "warning": ""}
    if what == "hookpoint" and meta.get("source_format") == "saelens" and meta.get("source_hookpoint"):
        out["hook_name"] = meta["source_hookpoint"]
        out["hook_head_index"] = meta.get("source_hook_head_index")
        return out
    hook = to_transformerlens(name)
    if hook is None:
        out["warning"] = (
            f"{what} {name!r} has no TransformerLens equivalent (only aliases such as resid_post.6 and whole-block "
            f"paths map), so SAELens' hook_name is left as {name!r}, which no HookedTransformer hook matches; "
            "hf_hook_name holds the module path"
        )
        return out
    out.update(hook_name=hook.hook_name, hook_head_index=hook.head)
    if hook.caveat:
        out["warning"] = (
            f"{what} {name!r} is exported with hook_name {hook.hook_name!r}, but {hook.caveat}: apply them to "
            "that hook's activation before encoding (hf_hook_name holds the exact module)"
        )
    return out


def save_saelens(model, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` that SAELens ≥ 6.0 loads (input scale folded).

    The architecture is what the dictionary computes at inference (:func:`saelens_architecture`). ``hook_name``
    is the TransformerLens hook name SAELens and SAEBench hook (``blocks.6.hook_resid_post``; attention z as
    ``blocks.L.attn.hook_z`` with ``reshape_activations: hook_z``, one head with ``hook_head_index``); our own
    hookpoint is kept as ``metadata.sparsedict_hookpoint`` and the module path as ``hf_hook_name``. A hookpoint
    with no TransformerLens equivalent warns (:func:`saelens_hook`).
    """
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
    if arch in _SKIP:
        tensors["W_skip"] = sd["W_skip"]
    transcoder = arch in _TRANSCODERS
    hook = saelens_hook(model.cfg.hookpoint, meta)
    z = hook["hook_name"].endswith(".attn.hook_z") and hook["hook_head_index"] is None
    metadata: dict[str, Any] = {
        "model_name": meta.get("model", ""),
        "hook_name": hook["hook_name"],
        "hook_head_index": hook["hook_head_index"],
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "hf_hook_name": hook["hf_hook_name"],
        "sae_lens_version": SAE_LENS_VERSION,
        "sae_lens_training_version": None,
        "exported_by": "sparsedict",
        "sparsedict_hookpoint": model.cfg.hookpoint,
    }
    if meta.get("context_length") is not None:
        metadata["context_size"] = meta["context_length"]
    dataset = meta.get("dataset")
    if isinstance(dataset, dict) and dataset.get("name"):
        metadata["dataset_path"] = dataset["name"]
    if arch == "jumprelu" and model.architecture in _TRAINING_NAMES:  # SAELens writes the same for its own
        metadata["training_architecture"] = _TRAINING_NAMES[model.architecture]
    warn = [hook["warning"]] if hook["warning"] else []
    if transcoder:
        out = saelens_hook(model.cfg.target, meta, "target")
        metadata.update(hook_name_out=out["hook_name"], hook_head_index_out=out["hook_head_index"],
                        hf_hook_name_out=out["hf_hook_name"], sparsedict_target=model.cfg.target)  # fmt: skip
        if out["warning"]:
            warn.append(out["warning"])
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": model.d_in,
        "d_sae": model.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(model.subtracts_b_dec),
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if z else "none",
        "metadata": metadata,
    }
    if arch == "topk":
        cfg["k"] = int(model.cfg.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    if transcoder:
        cfg["d_out"] = model.d_out
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path / "sae_weights.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    write_json_atomic(path / "cfg.json", cfg, indent=2)
    for text in warn:
        warnings.warn(f"{path}: {text}", UserWarning, stacklevel=2)
    return path
