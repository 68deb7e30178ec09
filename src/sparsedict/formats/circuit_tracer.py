"""circuit-tracer's transcoder files (version 0.5.0): per-layer transcoder sets and cross-layer transcoders.

The layout (docs/formats/circuit-tracer.md): a directory with ``config.yaml`` (``model_kind``
``transcoder_set`` or ``cross_layer_transcoder``, ``feature_input_hook``/``feature_output_hook`` as
TransformerLens names relative to ``blocks.{l}``, optional ``model_name``) and

- ``transcoder_set``: ``layer_{l}.safetensors`` for ``l = 0 … L−1``: ``W_enc [F, d]``, ``b_enc [F]``,
  ``W_dec [F, d]``, ``b_dec [d]``, optional ``activation_function.threshold [F]`` (JumpReLU) and
  ``W_skip [d, d]`` (adds ``x W_skipᵀ``);
- ``cross_layer_transcoder``: ``W_enc_{l}.safetensors`` (``W_enc_{l} [F, d]``, ``b_enc_{l} [F]``, ``b_dec_{l} [d]``:
  output layer l's bias, optional ``threshold_{l} [F]``) and ``W_dec_{l}.safetensors`` (``W_dec_{l} [F, L − l, d]``).

:func:`load_circuit_tracer` maps a set onto a :class:`~sparsedict.dictionaries.TranscoderSet` of ``relu`` or
``jumprelu`` transcoders and a CLT onto a ``clt`` (``activation`` ``relu`` or ``jumprelu``), so that their outputs
are circuit-tracer's. What circuit-tracer 0.5.0 does on load, and how it is matched:

- its JumpReLU is ``z · 1[z > θ]`` with no ReLU: a CLT with θ < 0 lets negative pre-activations in ``(θ, 0)``
  through, and so does ours (the ``clt`` reads θ as written). sparsedict's ``jumprelu`` transcoder reads θ < 0 as
  0 (as SAELens does), so a transcoder set holding a negative threshold is refused rather than computed
  differently;
- whether a CLT has thresholds is decided by ``W_enc_0`` alone: thresholds in later files are ignored (with a
  warning) when ``W_enc_0`` has none, and their absence from a later file is an error (circuit-tracer fails);
- a CLT's skip connection is neither written nor read by its files, so a loaded CLT has none (and
  :func:`save_circuit_tracer` refuses a CLT with one);
- ``log_thresholds`` in a transcoder file is refused (circuit-tracer asserts it away);
- layers must run from 0 without a gap (its ``TranscoderSet`` asserts it; its replacement model covers the model's
  layers from 0).

:func:`save_circuit_tracer` writes our transcoder sets (members ``relu``, ``jumprelu``, ``batchtopk`` with θ set)
and CLTs (``relu``, ``jumprelu``, ``batchtopk`` converted with ``to_jumprelu``) in this layout, input scales
folded, with the hook names a loaded circuit-tracer checkpoint came with, else those circuit-tracer uses for the
model family (Gemma 2/3: ``ln2.hook_normalized`` / ``hook_mlp_out``; others: ``mlp.hook_in`` / ``mlp.hook_out``,
which both its backends provide).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sparsedict.cache.hooks import at_layer
from sparsedict.cache.manifest import read_manifest
from sparsedict.config import from_dict
from sparsedict.formats.common import (
    Architectures,
    FormatError,
    build_dictionary,
    check_shape,
    load_state,
    require,
)
from sparsedict.util import atomic_write

CONFIG = "config.yaml"
KINDS = ("transcoder_set", "cross_layer_transcoder")
PLT_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip")
# circuit-tracer hook (relative to blocks.{l}) -> our alias kind
_FROM_HOOK = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in", "mlp.hook_out": "mlp_out",
              "hook_mlp_out": "mlp_out", "hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post"}  # fmt: skip


def is_circuit_tracer(path: Path) -> bool:
    """A directory holding circuit-tracer's ``config.yaml`` (with a ``model_kind`` it defines)."""
    cfg = path / CONFIG
    if not cfg.is_file():
        return False
    try:
        data = yaml.safe_load(cfg.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("model_kind") in KINDS


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((path / CONFIG).read_text())
    except yaml.YAMLError as err:
        raise FormatError(f"{path / CONFIG} is not valid YAML ({err})") from err
    if not isinstance(cfg, dict) or cfg.get("model_kind") not in KINDS:
        raise FormatError(f"{path / CONFIG}: model_kind must be one of {KINDS}, got {cfg!r:.200}")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(cfg.get(key), str):
            raise FormatError(
                f"{path / CONFIG}: missing {key!r} (a TransformerLens hook relative to blocks.{{l}})"
            )
    return cfg


def _our_hook(hook: str) -> str:
    """circuit-tracer's hook -> our alias kind, or a ``{layer}`` template of the TransformerLens name."""
    return _FROM_HOOK.get(hook, f"blocks.{{layer}}.{hook}")


def _tensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FormatError(f"{file} is missing: the circuit-tracer checkpoint is incomplete")
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iteration)


def _layer_files(path: Path, pattern: str, what: str) -> int:
    """Number of layers ``L`` from the files ``pattern.format(l)``, which must be ``l = 0 … L−1``."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted(int(m.group(1)) for p in path.iterdir() if (m := regex.match(p.name)))
    if not found:
        raise FormatError(f"{path}: a circuit-tracer {what} needs {pattern.format('{l}')} files; found none")
    if found != list(range(len(found))):
        raise FormatError(
            f"{path}: {pattern.format('{l}')} files for layers {found}; circuit-tracer needs every layer from 0"
        )
    return len(found)


def _meta(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"source_format": "circuit_tracer", "model": cfg.get("model_name"),
            "source_hookpoint": cfg["feature_input_hook"], "source_target": cfg["feature_output_hook"],
            "circuit_tracer_config": {k: v for k, v in cfg.items() if k != "transcoders"}}  # fmt: skip


def load_circuit_tracer(
    path: str | Path, registry: Architectures, fetch: Callable[[str], Path] | None = None
):
    """Load a circuit-tracer ``transcoder_set`` (-> ``TranscoderSet``) or ``cross_layer_transcoder`` (-> ``clt``).

    A set's ``transcoders`` list names each layer's file: a path relative to ``path``, or an ``hf://`` URI that
    ``fetch`` turns into a local file (:func:`sparsedict.hub.fetch_uri`; without ``fetch`` it is refused)."""
    path = Path(path)
    cfg = _read_config(path)
    if cfg["model_kind"] == "transcoder_set":
        return _load_set(path, cfg, registry, fetch)
    return _load_clt(path, cfg, registry)


def _transcoder_file(path: Path, entry: Any, fetch: Callable[[str], Path] | None) -> Path:
    """The local file of one ``transcoders`` entry of ``path``'s config."""
    entry = str(entry)
    if "://" not in entry:
        return path / entry
    if not entry.startswith("hf://") or fetch is None:
        how = "only hf:// URIs are fetched" if fetch is not None else "this loader fetches nothing"
        raise FormatError(
            f"{path / CONFIG}: transcoder {entry!r} is a remote file and {how}; load with from_pretrained (which "
            "fetches hf://org/repo/file URIs), or download the files into the directory and list local paths"
        )
    try:
        return fetch(entry)
    except ValueError as err:
        raise FormatError(f"{path / CONFIG}: {err}") from err


def _load_set(path: Path, cfg: dict[str, Any], registry: Architectures, fetch: Callable[[str], Path] | None):
    if cfg.get("transcoders"):
        files = [_transcoder_file(path, entry, fetch) for entry in cfg["transcoders"]]
    else:
        files = [
            path / f"layer_{i}.safetensors"
            for i in range(_layer_files(path, "layer_{}.safetensors", "transcoder set"))
        ]
    hookpoint, target = _our_hook(cfg["feature_input_hook"]), _our_hook(cfg["feature_output_hook"])
    members, archs, shapes = {}, set(), set()
    for layer, file in enumerate(files):
        t = _tensors(file)
        where = str(file)
        if "log_thresholds" in t:
            raise FormatError(
                f"{where}: 'log_thresholds' is not part of the format (circuit-tracer refuses it)"
            )
        require(t, ["W_enc", "W_dec", "b_enc", "b_dec"], where)
        unknown = sorted(set(t) - set(PLT_TENSORS))
        if unknown:
            raise FormatError(
                f"{where}: unexpected tensors {unknown}; a circuit-tracer transcoder holds {PLT_TENSORS}"
            )
        n, d = t["W_enc"].shape
        check_shape(t["W_dec"], (n, d), "W_dec", where, f"W_enc {[n, d]}")
        check_shape(t["b_enc"], (n,), "b_enc", where, f"W_enc {[n, d]}")
        check_shape(t["b_dec"], (d,), "b_dec", where, f"W_enc {[n, d]}")
        theta = t.get("activation_function.threshold")
        if theta is not None:
            check_shape(theta, (n,), "activation_function.threshold", where, f"W_enc {[n, d]}")
            if bool((theta < 0).any()):
                raise FormatError(
                    f"{where}: negative thresholds; circuit-tracer's JumpReLU (z·1[z > θ], no ReLU) passes negative "
                    "pre-activations there, sparsedict's jumprelu transcoder reads θ < 0 as 0: refused rather than "
                    "computed differently"
                )
        if "W_skip" in t:
            check_shape(t["W_skip"], (d, d), "W_skip", where, f"d_model={d}")
        arch = "jumprelu" if theta is not None else "relu"
        archs.add(arch)
        shapes.add((d, n, "W_skip" in t, str(t["W_enc"].dtype).removeprefix("torch.")))
        fields = {"hookpoint": at_layer(hookpoint, layer), "target": at_layer(target, layer), "d_in": d, "d_out": d,
                  "n_latents": n, "skip": "W_skip" in t, "apply_b_dec_to_input": False,
                  "dtype": str(t["W_enc"].dtype).removeprefix("torch.")}  # fmt: skip
        model = build_dictionary(registry, arch, fields, str(path / CONFIG))
        state = {
            "W_enc": t["W_enc"].T.contiguous(),
            "b_enc": t["b_enc"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
        }
        if "W_skip" in t:
            state["W_skip"] = t["W_skip"]
        if theta is not None:
            state["threshold"] = theta
        members[layer] = load_state(model, state, where, _meta(cfg), f"{path / CONFIG}")
    if len(archs) > 1 or len(shapes) > 1:
        raise FormatError(
            f"{path}: the layers differ in activation {sorted(archs)} or shape/skip/dtype {sorted(shapes)}; a "
            "transcoder set holds transcoders of one kind"
        )
    d, n, skip, dtype = shapes.pop()
    template = {"hookpoint": hookpoint, "target": target, "layers": list(range(len(files))), "d_in": d, "d_out": d,
                "n_latents": n, "skip": skip, "apply_b_dec_to_input": False, "dtype": dtype}  # fmt: skip
    _, cfg_cls = registry.lookup(archs.pop())
    out = registry.build_set(from_dict(cfg_cls, template), members)
    out.meta = _meta(cfg)
    return out


def _load_clt(path: Path, cfg: dict[str, Any], registry: Architectures):
    if cfg.get("transcoders"):
        raise FormatError(
            f"{path / CONFIG}: a cross_layer_transcoder with a 'transcoders' list is Gemma Scope 2's per-layer file "
            "layout, which sparsedict does not read; load circuit-tracer's own layout (W_enc_{l}/W_dec_{l})"
        )
    L = _layer_files(path, "W_enc_{}.safetensors", "cross-layer transcoder")
    enc = [_tensors(path / f"W_enc_{i}.safetensors") for i in range(L)]
    dec = [_tensors(path / f"W_dec_{i}.safetensors") for i in range(L)]
    jump = "threshold_0" in enc[0]
    n, d = enc[0]["W_enc_0"].shape
    for i, (e, w) in enumerate(zip(enc, dec)):
        where = str(path / f"W_enc_{i}.safetensors")
        names = [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"] + ([f"threshold_{i}"] if jump else [])
        require(e, names, where)
        check_shape(e[f"W_enc_{i}"], (n, d), f"W_enc_{i}", where, f"W_enc_0 {[n, d]}")
        check_shape(e[f"b_enc_{i}"], (n,), f"b_enc_{i}", where, f"W_enc_0 {[n, d]}")
        check_shape(e[f"b_dec_{i}"], (d,), f"b_dec_{i}", where, f"W_enc_0 {[n, d]}")
        if jump:
            check_shape(e[f"threshold_{i}"], (n,), f"threshold_{i}", where, f"W_enc_0 {[n, d]}")
        elif f"threshold_{i}" in e:
            warnings.warn(
                f"{where} holds threshold_{i} but W_enc_0 has no threshold: circuit-tracer (and so this loader) "
                "reads the whole CLT as ReLU and ignores it",
                stacklevel=3,
            )
        require(w, [f"W_dec_{i}"], str(path / f"W_dec_{i}.safetensors"))
        check_shape(w[f"W_dec_{i}"], (n, L - i, d), f"W_dec_{i}", str(path / f"W_dec_{i}.safetensors"),
                    f"{L} layers and W_enc_0 {[n, d]}")  # fmt: skip
    dtype = str(enc[0]["W_enc_0"].dtype).removeprefix("torch.")
    fields = {"hookpoint": _our_hook(cfg["feature_input_hook"]), "target": _our_hook(cfg["feature_output_hook"]),
              "layers": list(range(L)), "d_in": d, "d_out": d, "n_latents": n,
              "activation": "jumprelu" if jump else "relu", "dtype": dtype}  # fmt: skip
    model = build_dictionary(registry, "clt", fields, str(path / CONFIG))
    state = {
        "W_enc": torch.stack([e[f"W_enc_{i}"].T for i, e in enumerate(enc)]),
        "b_enc": torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]),
        "b_dec": torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]),
        "target_variance": torch.ones(L),
        **{f"W_dec.{i}": w[f"W_dec_{i}"] for i, w in enumerate(dec)},
    }
    if jump:
        state["threshold"] = torch.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)])
    return load_state(model, state, str(path), _meta(cfg), f"{path / CONFIG}")


# -- writing ---------------------------------------------------------------------------------------------------
def _model_class(meta: dict[str, Any]) -> str:
    """The HF model class a checkpoint was trained on (from its training cache's manifest), or ''."""
    cache = meta.get("cache")
    if cache and (Path(cache) / "manifest.json").exists():
        return str(read_manifest(cache)["model"].get("class") or "")
    return str(meta.get("model_class") or "")


def hook_names(kind: str, model_class: str) -> str:
    """circuit-tracer's name (relative to ``blocks.{l}``) for our alias kind ``mlp_in``/``mlp_out``."""
    gemma = model_class.startswith(("Gemma2", "Gemma3"))
    names = {"mlp_in": "ln2.hook_normalized" if gemma else "mlp.hook_in",
             "mlp_out": "hook_mlp_out" if gemma else "mlp.hook_out"}  # fmt: skip
    if kind not in names:
        raise FormatError(
            f"circuit-tracer names MLP inputs and outputs; this dictionary reads {kind!r}: pass feature_input_hook "
            "and feature_output_hook (TransformerLens names relative to blocks.{l}) to save_circuit_tracer"
        )
    return names[kind]


def _check_layers(model, what: str) -> None:
    if model.layers != list(range(model.n_layers)):
        raise FormatError(
            f"circuit-tracer reads layers 0..L-1 without a gap (its replacement model covers the model from layer 0); "
            f"this {what} covers layers {model.layers}: train one from layer 0"
        )


def save_circuit_tracer(model, path: str | Path, model_name: str | None = None, feature_input_hook: str | None = None,
                        feature_output_hook: str | None = None) -> Path:  # fmt: skip
    """Write a transcoder set or a CLT in circuit-tracer's layout (``config.yaml`` + per-layer safetensors)."""
    path = Path(path)
    kind = "cross_layer_transcoder" if model.architecture == "clt" else "transcoder_set"
    if not model.layered:
        raise FormatError(
            f"circuit-tracer reads transcoder sets and cross-layer transcoders; this is one {model.architecture} "
            "dictionary: train a set over the model's layers (layers: [0, 1, ...])"
        )
    _check_layers(model, "cross-layer transcoder" if kind == "cross_layer_transcoder" else "transcoder set")
    inp = feature_input_hook or _hook(model.cfg.hookpoint, model.meta, "source_hookpoint")
    out = feature_output_hook or _hook(model.cfg.target, model.meta, "source_target")
    path.mkdir(parents=True, exist_ok=True)
    files = _clt_tensors(model) if kind == "cross_layer_transcoder" else _set_tensors(model)
    for name, tensors in files.items():
        atomic_write(path / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
    cfg = {"model_kind": kind, "feature_input_hook": inp, "feature_output_hook": out}
    name = model_name or model.meta.get("model")
    if name:
        cfg["model_name"] = str(name)
    atomic_write(path / CONFIG, lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=True)))
    return path


def _kind(hookpoint: str) -> str:
    return hookpoint.split(".")[0] if "{layer}" not in hookpoint else hookpoint


def _hook(hookpoint: str, meta: dict[str, Any], source_key: str) -> str:
    """circuit-tracer's name for our per-layer ``hookpoint``: the name it was loaded from (a model that came from
    circuit-tracer), a ``blocks.{layer}.<hook>`` template's hook, else the model family's MLP names."""
    if meta.get("source_format") == "circuit_tracer" and meta.get(source_key):
        return str(meta[source_key])
    prefix = "blocks.{layer}."
    if hookpoint.startswith(prefix):
        return hookpoint[len(prefix) :]
    return hook_names(_kind(hookpoint), _model_class(meta))


def _set_tensors(tset) -> dict[str, dict[str, Tensor]]:
    files = {}
    for i, (layer, member) in enumerate(tset.items()):
        m = copy.deepcopy(member).cpu()
        m.fold_scaling()
        arch = m.architecture
        where = f"layer {layer} ({arch})"
        if arch not in ("relu", "jumprelu", "batchtopk"):
            raise FormatError(
                f"{where}: circuit-tracer's transcoders are ReLU or JumpReLU (z·1[z > θ]); a {arch} transcoder has no "
                "such form: use relu, jumprelu or batchtopk (exported with its threshold)"
            )
        if m.d_in != m.d_out:
            raise FormatError(
                f"{where}: circuit-tracer's transcoders map d_model to d_model; this one {m.d_in} -> {m.d_out}"
            )
        with torch.no_grad():
            b_enc = (
                m.b_enc - m.b_dec @ m.W_enc if m.subtracts_b_dec else m.b_enc
            )  # z = x W_enc + b_enc on raw x
            t = {"W_enc": m.W_enc.T, "b_enc": b_enc, "W_dec": m.W_dec, "b_dec": m.b_dec}
            if arch == "jumprelu":
                t["activation_function.threshold"] = m.threshold.clamp_min(0.0)  # ours reads θ < 0 as 0
            elif arch == "batchtopk":
                if float(m.threshold) < 0:
                    raise FormatError(
                        f"{where}: its inference threshold θ is unset (train past threshold_start_step)"
                    )
                t["activation_function.threshold"] = m.threshold.expand(m.n_latents).to(m.W_enc.dtype)
            if m.W_skip is not None:
                t["W_skip"] = m.W_skip
        files[f"layer_{i}.safetensors"] = {k: v.detach().contiguous() for k, v in t.items()}
    return files


def _clt_tensors(clt) -> dict[str, dict[str, Tensor]]:
    if clt.W_skip is not None:
        raise FormatError(
            "circuit-tracer 0.5.0 neither writes nor reads a CLT's skip connection (W_skip): export a CLT without "
            "skip, or it would load without it"
        )
    act = clt.cfg.activation
    if act == "topk":
        raise FormatError(
            "circuit-tracer has no TopK CLT: train with activation batchtopk (exported as JumpReLU) or jumprelu"
        )
    m = copy.deepcopy(clt).cpu()
    if act == "batchtopk":
        m = m.to_jumprelu()
    m.fold_scaling()
    files = {}
    with torch.no_grad():
        for i in range(m.n_layers):
            enc = {f"W_enc_{i}": m.W_enc[i].T, f"b_enc_{i}": m.b_enc[i], f"b_dec_{i}": m.b_dec[i]}
            if m.cfg.activation == "jumprelu":
                enc[f"threshold_{i}"] = m.threshold[i]
            files[f"W_enc_{i}.safetensors"] = {k: v.detach().contiguous() for k, v in enc.items()}
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": m.W_dec[i].detach().contiguous()}
    return files
