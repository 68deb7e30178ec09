"""Generated model card (``README.md``) for a saved dictionary.

The card states what a user needs before loading: architecture and sizes, the model (and revision) and the
hookpoint the dictionary reads with its module path (and the target a transcoder writes), the training data and
tokens, the input normalisation that was folded into the weights, and evaluation metrics with the data they
were measured on when the checkpoint's ``meta`` carries them (``update_meta`` re-renders the card when metrics
are added). Numbers come from
the checkpoint's own ``config.json``; nothing is invented, and unknown fields say "not recorded".
"""

from __future__ import annotations

import json
from typing import Any

_METRIC_ORDER = (
    "fvu",
    "explained_variance",
    "mse",
    "l0",
    "dead_fraction",
    "ce_recovered",
    "delta_lm_loss",
    "kl",
)
_NOT_METRICS = ("tokens", "cache", "dataset", "dead_note")
"""Entries of ``meta["eval"]`` that describe the data, not a metric."""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _metrics(meta: dict[str, Any]) -> dict[str, Any]:
    found = meta.get("metrics") or meta.get("eval") or {}
    if not isinstance(found, dict):
        return {}
    flat = {
        k: v
        for k, v in found.items()
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in _NOT_METRICS
    }
    ordered = {k: flat[k] for k in _METRIC_ORDER if k in flat}
    ordered.update({k: v for k, v in sorted(flat.items()) if k not in ordered})
    return ordered


def _data(dataset: Any, context_length: Any = None) -> str | None:
    """``name (config, split …)`` of a recorded dataset (a cache manifest's ``dataset`` entry)."""
    if not isinstance(dataset, dict) or not dataset.get("name"):
        return None
    extra = [str(dataset["config"])] if dataset.get("config") else []
    if dataset.get("split"):
        extra.append(f"split {dataset['split']}")
    if context_length:
        extra.append(f"contexts of {context_length} tokens")
    return dataset["name"] + (f" ({', '.join(extra)})" if extra else "")


def render(config: dict[str, Any], repo_id: str | None = None) -> str:
    """Markdown model card for a sparsedict ``config.json`` dict (with YAML front matter for the hub)."""
    d = config.get("dictionary", {})
    meta = config.get("meta", {}) or {}
    arch = config.get("architecture", d.get("architecture", "?"))
    model = meta.get("model") or "not recorded"
    hookpoint = d.get("hookpoint") or meta.get("hookpoint") or "not recorded"
    target = d.get("target") or ""
    tokens = meta.get("training_tokens", meta.get("tokens"))
    kind = "transcoder" if target and target != hookpoint else "sparse autoencoder"
    if d.get("skip"):
        kind = "skip " + kind
    tags = ["sparsedict", "sparse-autoencoder", "interpretability", arch]
    front = ["---", "library_name: sparsedict", "tags:"] + [f"- {t}" for t in tags]
    if isinstance(model, str) and model.count("/") == 1 and " " not in model:
        front.append(f"base_model: {model}")
    front.append("---")
    title = repo_id or d.get("name") or f"{arch} {kind} on {hookpoint}"
    lines = [*front, "", f"# {title}", ""]
    lines.append(f"A {arch} {kind} trained with sparsedict.")
    lines += ["", "| field | value |", "|---|---|"]
    revision = meta.get("model_revision")
    paths = meta.get("hookpoint_paths") or {}
    rows = [
        ("architecture", arch),
        ("model", f"{model} (revision {revision})" if revision and model != "not recorded" else model),
        ("hookpoint (input)", hookpoint),
    ]
    if paths.get(hookpoint):
        rows.append(("input module", paths[hookpoint]))
    if target:
        rows.append(("target (output)", target))
        if paths.get(target):
            rows.append(("target module", paths[target]))
    if meta.get("source_hookpoint") and meta.get("source_hookpoint") != hookpoint:
        rows.append(("hookpoint in the source library", meta["source_hookpoint"]))
    rows += [
        ("d_in", d.get("d_in")),
        ("d_out", d.get("d_out") or d.get("d_in")),
        ("latents", d.get("n_latents")),
    ]
    for key in config.get("sparsity_fields", ()):
        if key in d:
            rows.append((key, d[key]))
    d_out = d.get("d_out") or d.get("d_in")
    subtracts = (
        bool(d.get("apply_b_dec_to_input")) and kind.endswith("autoencoder") and d_out == d.get("d_in")
    )
    rows.append(("subtracts b_dec before encoding", subtracts))
    rows.append(("training tokens", tokens if tokens is not None else "not recorded"))
    training_data = _data(meta.get("dataset"), meta.get("context_length"))
    if training_data:
        rows.append(("training data", training_data))
    if "input_scale_folded" in meta:
        rows.append(("input scale (folded into the weights)", meta["input_scale_folded"]))
    if meta.get("source_format"):
        rows.append(("converted from", meta["source_format"]))
    rows.append(("sparsedict version", config.get("sparsedict_version", "?")))
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    metrics = _metrics(meta)
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        ev = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
        if ev.get("tokens"):
            data = _data(ev.get("dataset"))
            lines += ["", f"Measured on {_fmt(ev['tokens'])} held-out tokens{f' of {data}' if data else ''}."]
        if ev.get("dead_note"):
            lines += ["", f"dead_fraction: {ev['dead_note']}."]
    else:
        lines.append("No evaluation metrics were recorded with this checkpoint.")
    load_arg = json.dumps(repo_id or "path/to/this/directory")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from sparsedict import from_pretrained",
        "from sparsedict.lm import load_model",
        "",
        f"sae = from_pretrained({load_arg})",
        f"model, tok = load_model({json.dumps(model if model != 'not recorded' else 'smollm2-135m')})",
        'with sae.hook(model, mode="both") as h:  # splice the reconstruction, keep the codes',
        '    model(**tok("Hello world", return_tensors="pt"))',
        "codes = h.last  # SparseCode for every token",
        "```",
        "",
        "Files: `config.json` (architecture, sizes, hookpoint, metadata) and `model.safetensors` (weights in the "
        "layout `W_enc [d_in, n]`, `b_enc [n]`, `W_dec [n, d_out]`, `b_dec [d_out]`).",
        "",
    ]
    return "\n".join(lines)
