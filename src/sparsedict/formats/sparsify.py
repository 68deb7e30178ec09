"""EleutherAI sparsify checkpoints: one directory per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Tensors: ``encoder.weight [n, d_in]`` (an ``nn.Linear``, so ours is its transpose),
``encoder.bias [n]``, ``W_dec [n, d_in]`` (already our orientation — do not transpose it), ``b_dec [d_in]``,
optional ``W_skip [d_in, d_in]`` used as ``x W_skipᵀ``. sparsify's forward:
``f = TopK(ReLU((x − b_dec·[not transcode]) encoder.weightᵀ + encoder.bias))``, ``ŷ = f W_dec + b_dec
(+ x W_skipᵀ)``. This is our ``topk`` architecture; a ``transcode`` checkpoint reads the input of the hooked
module and predicts its output, and never subtracts ``b_dec``. dtype is taken from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from sparsedict.formats.common import (
    Architectures,
    FormatError,
    build_dictionary,
    check_shape,
    load_state,
    parse_dtype,
    require,
)


def hookpoint_names(rel: str, transcode: bool) -> tuple[str, str]:
    """sparsify hookpoint (relative to ``model.base_model``) -> our (hookpoint, target) module paths.

    ``layers.6`` -> (``layers.6``, "") for an SAE; a transcoder on ``layers.6.mlp`` reads ``layers.6.mlp:in`` and
    writes ``layers.6.mlp:out``. A trailing ``/seedN`` directory level is dropped.
    """
    rel = rel.split("/")[0]
    if transcode:
        return f"{rel}:in", f"{rel}:out"
    return rel, ""


def load_sparsify(path: str | Path, registry: Architectures):
    """Load one sparsify hookpoint directory into our ``topk`` architecture."""
    path = Path(path)
    where = str(path / "sae.safetensors")
    try:
        cfg: dict[str, Any] = json.loads((path / "cfg.json").read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{path / 'cfg.json'} is not valid JSON ({err})") from err
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise FormatError(
            f"{path / 'cfg.json'}: sparsify activation {activation!r} is not supported (only 'topk')"
        )
    if "k" not in cfg:
        raise FormatError(f"{path / 'cfg.json'} lacks 'k': not a sparsify TopK config")
    t = load_file(where)
    require(t, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], where)
    d_in = int(cfg.get("d_in") or t["encoder.weight"].shape[1])
    n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor") or 0)
    if n <= 0:
        raise FormatError(f"{path / 'cfg.json'}: neither num_latents nor expansion_factor gives the width")
    hint = f"cfg.json (d_in={d_in}, num_latents={n})"
    check_shape(t["encoder.weight"], (n, d_in), "encoder.weight", where, hint)
    check_shape(t["encoder.bias"], (n,), "encoder.bias", where, hint)
    check_shape(t["W_dec"], (n, d_in), "W_dec", where, hint)
    check_shape(t["b_dec"], (d_in,), "b_dec", where, hint)
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in t
    if bool(cfg.get("skip_connection", False)) != skip:
        raise FormatError(
            f"{where}: cfg.json skip_connection={cfg.get('skip_connection')} but W_skip is "
            f"{'present' if skip else 'absent'} in the weights"
        )
    if skip:
        check_shape(t["W_skip"], (d_in, d_in), "W_skip", where, hint)
    rel, run_dir = path.name, path.parent
    if rel.startswith("seed") and rel[4:].isdigit():  # <hookpoint>/seed<N>
        rel, run_dir = path.parent.name, path.parent.parent
    hookpoint, target = hookpoint_names(cfg.get("hookpoint") or rel, transcode)
    fields = {
        "hookpoint": hookpoint,
        "target": target,
        "d_in": d_in,
        "d_out": d_in,
        "n_latents": n,
        "k": int(cfg["k"]),
        "skip": skip,
        "apply_b_dec_to_input": not transcode,
        "dtype": parse_dtype(t["W_dec"].dtype, where),
    }
    state = {
        "W_enc": t["encoder.weight"].T.contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    if skip:
        state["W_skip"] = t["W_skip"]
    meta = {
        "source_format": "sparsify",
        "source_hookpoint": rel,
        "hookpoint": hookpoint,
        "transcode": transcode,
        "multi_topk": bool(cfg.get("multi_topk", False)),
    }
    run_cfg = run_dir / "config.json"
    if run_cfg.exists():
        try:
            run = json.loads(run_cfg.read_text())
            meta["model"] = run.get("model", "")
        except json.JSONDecodeError:
            pass
    model = build_dictionary(registry, "topk", fields, where)
    return load_state(model, state, where, meta)
