"""saprmarks/dictionary_learning checkpoints: ``ae.pt`` (a torch state dict) + ``config.json``.

``ae.pt`` is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers (no arbitrary pickle code runs). Classes and their state dicts; ``nn.Linear``
weights are ``[out, in]``, so ``encoder.weight [n, d]`` and ``decoder.weight [d, n]`` are both transposed
into our layout:

- ``AutoEncoder``: ``bias [d]`` subtracted before encoding and added after decoding -> relu, apply_b_dec. Its
  ``from_pretrained`` normalises the decoder columns by default (``encoder.weight`` rows and ``encoder.bias``
  times ‖decoder column i‖, the columns divided by it, skipped when all norms are already 1), and so does this
  loader: the same codes and reconstruction as the library's loaded model.
- ``AutoEncoderNew``: ``decoder.bias [d]``, no pre-bias -> relu without b_dec subtraction.
- ``AutoEncoderTopK``: per-token TopK of ``ReLU(encoder(x − b_dec))`` -> topk.
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: at inference ``f = a·1[a > θ]`` with one scalar θ
  (``a = ReLU((x − b_dec) W_enc + b_enc)``) -> batchtopk (eval mode uses θ) / matryoshka with its group sizes.
- ``JumpReluAutoEncoder``: ``f = ReLU(z·1[z > θ])`` with ``z = x W_enc + b_enc`` (no b_dec subtraction),
  ``x̂ = f W_dec + b_dec``; taken as is (no decoder-norm scaling anywhere in its encode or decode).
- ``GatedAutoEncoder``: gate ``1[x_enc + gate_bias > 0]``, magnitude ``ReLU(exp(r_mag)·x_enc + mag_bias)`` with
  ``x_enc = encoder(x − decoder_bias)``; taken as is (its ``encode``/``decode`` scale by decoder norms only when
  called with ``normalize_decoder=True``, which is not the default).

``config.json``'s ``trainer.dict_class`` names the class, except that ``StandardTrainerAprilUpdate`` writes
``"AutoEncoder"`` whatever class it trained: when the named class's tensors are absent and the file's tensors
are exactly another class's, the tensors decide (recorded in ``meta["dict_class_in_config"]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedict.formats.common import (
    Architectures,
    FormatError,
    build_dictionary,
    load_state,
    parse_dtype,
    require,
    set_threshold,
)

_KEYS = {
    "AutoEncoder": ["bias", "encoder.weight", "encoder.bias", "decoder.weight"],
    "AutoEncoderNew": ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"],
    "AutoEncoderTopK": ["k", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"],
    "BatchTopKSAE": ["k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"],
    "JumpReluAutoEncoder": ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
    "MatryoshkaBatchTopKSAE": ["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"],
    "GatedAutoEncoder": [
        "decoder_bias",
        "encoder.weight",
        "r_mag",
        "gate_bias",
        "mag_bias",
        "decoder.weight",
    ],
}


def _guess_class(t: dict[str, Tensor]) -> str:
    for cls in (
        "GatedAutoEncoder",
        "MatryoshkaBatchTopKSAE",
        "JumpReluAutoEncoder",
        "AutoEncoder",
        "AutoEncoderNew",
    ):
        if set(_KEYS[cls]) <= set(t) and (cls != "AutoEncoderNew" or "b_dec" not in t):
            return cls
    if set(_KEYS["AutoEncoderTopK"]) <= set(t):
        return "AutoEncoderTopK"
    raise FormatError(f"cannot tell the dictionary_learning class from the tensors {sorted(t)}")


def _batchtopk_arch(cls: str, registry: Architectures) -> str:
    """Our architecture for a BatchTopK-family checkpoint: matryoshka when registered and it has groups."""
    if cls == "MatryoshkaBatchTopKSAE" and "matryoshka" in registry.available():
        from dataclasses import fields

        if "group_sizes" in {f.name for f in fields(registry.lookup("matryoshka")[1])}:
            return "matryoshka"
    return "batchtopk"


def hookpoint_name(trainer: dict[str, Any]) -> str:
    """``submodule_name`` like ``resid_post_layer_3`` -> ``resid_post.3``; otherwise it is kept as is."""
    name = str(trainer.get("submodule_name") or "")
    if "_layer_" in name:
        site, _, layer = name.rpartition("_layer_")
        if layer.isdigit():
            return f"{site}.{layer}"
    if not name and trainer.get("layer") is not None:
        return f"resid_post.{trainer['layer']}"
    return name


def _fold(w_enc: Tensor, b_enc: Tensor, w_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fold per-latent decoder norms s into the encoder (``·s``) and decoder rows (``/s``)."""
    s = w_dec.float().norm(dim=1).clamp_min(1e-12)
    out = (w_enc.float() * s).to(w_enc.dtype), (b_enc.float() * s).to(b_enc.dtype)
    return *out, (w_dec.float() / s[:, None]).to(w_dec.dtype)


def load_dictionary_learning(path: str | Path, registry: Architectures):
    """Load ``ae.pt`` + ``config.json`` into the matching sparsedict architecture."""
    path = Path(path)
    where = str(path / "ae.pt")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{path / 'config.json'} is not valid JSON ({err})") from err
    trainer = dict(config.get("trainer") or {})
    try:
        t = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled code: say so instead of a pickle traceback
        raise FormatError(
            f"{where} could not be read as a plain tensor state dict with torch.load(weights_only=True) ({err}); "
            "sparsedict never unpickles arbitrary objects"
        ) from err
    if not isinstance(t, dict) or not all(isinstance(v, Tensor) for v in t.values()):
        raise FormatError(f"{where} is not a state dict of tensors")
    t = {k.removeprefix("_orig_mod."): v for k, v in t.items()}
    cls = trainer.get("dict_class") or _guess_class(t)
    if cls not in _KEYS:
        raise FormatError(
            f"{path / 'config.json'}: dict_class {cls!r} is not supported; supported: {sorted(_KEYS)}"
        )
    named = cls
    if not set(_KEYS[cls]) <= set(t):
        try:
            cls = _guess_class(t)
        except FormatError:
            cls = named
    require(t, _KEYS[cls], where)
    if "W_enc" in t:
        d, n = t["W_enc"].shape
        w_enc, b_enc, w_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    else:
        n, d = t["encoder.weight"].shape
        w_enc, w_dec = t["encoder.weight"].T.contiguous(), t["decoder.weight"].T.contiguous()
        b_enc = t.get("encoder.bias")
    for key, want in (("activation_dim", d), ("dict_size", n)):
        if key in trainer and int(trainer[key]) != want:
            raise FormatError(
                f"{path / 'config.json'}: trainer.{key}={trainer[key]} but the weights in {where} imply {want}: "
                "the config and the weights disagree"
            )
    if tuple(w_dec.shape) != (n, d):
        raise FormatError(
            f"{where}: decoder has shape {list(w_dec.shape)} in our layout but the encoder implies {[n, d]}"
        )
    hook = hookpoint_name(trainer)
    fields: dict[str, Any] = {"hookpoint": hook, "d_in": d, "d_out": d, "n_latents": n}
    fields["dtype"] = parse_dtype(w_dec.dtype, where)
    state: dict[str, Tensor] = {}
    theta = None
    if cls == "AutoEncoder":
        arch, b_dec = "relu", t["bias"]
        fields["apply_b_dec_to_input"] = True
        norms = w_dec.float().norm(dim=1)
        if not torch.allclose(
            norms, torch.ones_like(norms)
        ):  # AutoEncoder.from_pretrained(normalize_decoder=True)
            w_enc, b_enc, w_dec = _fold(w_enc, b_enc, w_dec)
    elif cls == "AutoEncoderNew":
        arch, b_dec = "relu", t["decoder.bias"]
        fields["apply_b_dec_to_input"] = False
    elif cls == "AutoEncoderTopK":
        arch, b_dec = "topk", t["b_dec"]
        fields.update(apply_b_dec_to_input=True, k=int(t["k"]))
    elif cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        theta = t["threshold"].float().reshape(-1)[:1]
        if float(theta) < 0:
            raise FormatError(
                f"{where}: threshold is unset ({float(theta)}): the inference threshold was never estimated "
                "(training stopped before threshold_start_step), so this checkpoint has no per-token encoder"
            )
        arch, b_dec = _batchtopk_arch(cls, registry), t["b_dec"]
        fields.update(apply_b_dec_to_input=True, k=int(t["k"]))
        if arch == "matryoshka":
            fields["group_sizes"] = [int(g) for g in t["group_sizes"].tolist()]
    elif cls == "JumpReluAutoEncoder":
        arch, b_dec, theta = "jumprelu", t["b_dec"], t["threshold"]
        fields["apply_b_dec_to_input"] = False
    else:  # GatedAutoEncoder
        arch, b_dec = "gated", t["decoder_bias"]
        fields["apply_b_dec_to_input"] = True
        state.update(b_gate=t["gate_bias"], b_mag=t["mag_bias"], r_mag=t["r_mag"])
    if tuple(b_dec.shape) != (d,):
        raise FormatError(f"{where}: decoder bias has shape {list(b_dec.shape)}, expected {[d]}")
    state.update(W_enc=w_enc, W_dec=w_dec, b_dec=b_dec)
    model = build_dictionary(registry, arch, fields, where)
    expected = model.state_dict()
    if b_enc is not None:
        state["b_enc"] = b_enc
    if theta is not None:
        set_threshold(state, expected, theta, n)
    meta = {
        "source_format": "dictionary_learning",
        "source_architecture": cls,
        "source_hookpoint": trainer.get("submodule_name", ""),
        "hookpoint": hook,
        "model": trainer.get("lm_name", ""),
    }
    if cls != named:
        meta["dict_class_in_config"] = named
    if cls == "MatryoshkaBatchTopKSAE":
        meta["group_sizes"] = [int(g) for g in t["group_sizes"].tolist()]
    if "norm_factor" in trainer:
        meta["norm_factor_folded"] = trainer["norm_factor"]
    return load_state(model, state, where, meta)
