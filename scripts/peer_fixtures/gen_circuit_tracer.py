"""circuit-tracer fixtures: per-layer transcoder sets and cross-layer transcoders, written by circuit-tracer itself.

Built with its own classes (``SingleLayerTranscoder`` + ``TranscoderSet``, ``CrossLayerTranscoder``), parameters
overwritten with seeded random values, saved with their ``to_safetensors`` (the layout its loaders and its local
cache read) plus the ``config.yaml`` its hub loader reads, then reloaded with its loaders (``load_transcoder_set``,
``load_clt``, lazily: weights read from the files on use). Outputs on fixed inputs ``x [n_layers, B, d_model]``:
``acts`` = ``encode(x)`` ``[n_layers, B, d_transcoder]``, ``out`` = ``decode(acts, x)`` (skip included),
``decoded`` = decode without the skip, and ``acts_layer{i}`` = ``encode_layer(x[i], i)``. The ``sd_*``
fixtures are the other way round: checkpoints sparsedict exported (``export_circuit_tracer.py``, run first),
run here by circuit-tracer's loaders. See docs/formats/circuit-tracer.md for the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import (
    SingleLayerTranscoder,
    TranscoderSet,
    load_transcoder_set,
)
from common import BATCH, ROOT, fresh_dir, write
from safetensors.torch import load_file

LIB = "circuit_tracer"
L, D, F_ = 3, 16, 32
CPU = torch.device("cpu")


def gauss(g: torch.Generator, *shape: int, scale: float, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale + shift


def x_inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, BATCH, D, generator=g) * 2.0 + torch.randn(L, 1, D, generator=g) * 0.5


def config(kind: str, inp: str, out: str) -> dict:
    return {
        "model_kind": kind,
        "model_name": "google/gemma-2-2b",
        "feature_input_hook": inp,
        "feature_output_hook": out,
    }


def finish(path, cls: str, kind: str, jumprelu: bool, skip: bool, how: str, tensors: dict) -> None:
    meta = {
        "class": cls,
        "model_kind": kind,
        "n_layers": L,
        "d_model": D,
        "d_transcoder": F_,
        "activation": "jumprelu" if jumprelu else "relu",
        "skip": skip,
        "how": how,
        "made_by": "scripts/peer_fixtures/gen_circuit_tracer.py",
    }
    write(path, "circuit-tracer", meta, tensors)


def plt_set(name: str, seed: int, jumprelu: bool, skip: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(L):
        act = JumpReLU(gauss(g, F_, scale=0.1, shift=0.3).abs(), 0.1) if jumprelu else F.relu
        tc = SingleLayerTranscoder(D, F_, act, i, skip_connection=skip, device=CPU, dtype=torch.float32)
        with torch.no_grad():
            tc.W_enc.copy_(gauss(g, F_, D, scale=D**-0.5))
            tc.b_enc.copy_(gauss(g, F_, scale=0.3, shift=-0.1))
            tc.W_dec.copy_(gauss(g, F_, D, scale=0.5))
            tc.b_dec.copy_(gauss(g, D, scale=0.5))
            if skip:
                tc.W_skip.copy_(gauss(g, D, D, scale=0.1))
        layers[i] = tc
    path = fresh_dir(LIB, name)
    ckpt = path / "checkpoint"
    TranscoderSet(layers, "mlp.hook_in", "mlp.hook_out").to_safetensors(str(ckpt))
    cfg = config("transcoder_set", "mlp.hook_in", "mlp.hook_out")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    how = (
        "SingleLayerTranscoder per layer (seeded random parameters) in a TranscoderSet, to_safetensors + "
        "config.yaml; outputs after load_transcoder_set(lazy_encoder=True, lazy_decoder=True)"
    )
    tensors = set_outputs(ckpt, cfg, name, x_inputs(seed + 1), skip)
    finish(path, "TranscoderSet", "transcoder_set", jumprelu, skip, how, tensors)


def set_outputs(ckpt, cfg: dict, name: str, x: torch.Tensor, skip: bool) -> dict:
    """circuit-tracer's outputs on ``x`` of the transcoder set in ``ckpt`` (loaded lazily by its own loader)."""
    back = load_transcoder_set(
        {i: str(ckpt / f"layer_{i}.safetensors") for i in range(L)},
        scan=name,
        feature_input_hook=cfg["feature_input_hook"],
        feature_output_hook=cfg["feature_output_hook"],
        device=CPU,
        dtype=torch.float32,
        lazy_encoder=True,
        lazy_decoder=True,
    )
    with torch.no_grad():
        acts = back.encode(x)
        out = back.decode(acts, x)
        decoded = torch.stack([acts[i] @ back[i].W_dec + back[i].b_dec for i in range(L)]) if skip else out
        per_layer = {f"acts_layer{i}": back.encode_layer(x[i], i) for i in range(L)}
    return {"x": x, "acts": acts, "out": out, "decoded": decoded, **per_layer}


def clt(name: str, seed: int, jumprelu: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    tc = CrossLayerTranscoder(
        L,
        F_,
        D,
        activation_function="jump_relu" if jumprelu else "relu",
        lazy_decoder=False,
        device=CPU,
        dtype=torch.float32,
    )
    with torch.no_grad():
        tc.W_enc.copy_(gauss(g, L, F_, D, scale=D**-0.5))
        tc.b_enc.copy_(gauss(g, L, F_, scale=0.3, shift=-0.1))
        tc.b_dec.copy_(gauss(g, L, D, scale=0.5))
        for i in range(L):
            tc.W_dec[i].copy_(gauss(g, F_, L - i, D, scale=0.5))
        if jumprelu:
            tc.activation_function.threshold.copy_(gauss(g, L, 1, F_, scale=0.1, shift=0.3).abs())
    path = fresh_dir(LIB, name)
    ckpt = path / "checkpoint"
    tc.to_safetensors(str(ckpt))
    cfg = config("cross_layer_transcoder", "hook_resid_mid", "hook_mlp_out")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    how = (
        "CrossLayerTranscoder (seeded random parameters), to_safetensors + config.yaml; outputs after "
        "load_clt(lazy_encoder=True, lazy_decoder=True)"
    )
    tensors = clt_outputs(ckpt, cfg, name, x_inputs(seed + 1))
    finish(path, "CrossLayerTranscoder", "cross_layer_transcoder", jumprelu, False, how, tensors)


def clt_outputs(ckpt, cfg: dict, name: str, x: torch.Tensor) -> dict:
    """circuit-tracer's outputs on ``x`` of the CLT in ``ckpt`` (loaded lazily by its own loader)."""
    back = load_clt(
        str(ckpt),
        feature_input_hook=cfg["feature_input_hook"],
        feature_output_hook=cfg["feature_output_hook"],
        scan=name,
        device=CPU,
        dtype=torch.float32,
        lazy_decoder=True,
        lazy_encoder=True,
    )
    with torch.no_grad():
        acts = back.encode(x)
        out = back.decode(acts, x)
        per_layer = {f"acts_layer{i}": back.encode_layer(x[i], i) for i in range(L)}
    return {"x": x, "acts": acts, "out": out, "decoded": out, **per_layer}


def sparsedict_exports() -> None:
    """The ``sd_*`` fixtures: checkpoints sparsedict's ``save_circuit_tracer`` wrote (export_circuit_tracer.py),
    loaded and run by circuit-tracer's loaders on the inputs stored beside them."""
    for path in sorted((ROOT / LIB).glob("sd_*")):
        ckpt = path / "checkpoint"
        cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
        x = load_file(str(path / "x.safetensors"))["x"]
        kind = cfg["model_kind"]
        if kind == "transcoder_set":
            first = load_file(str(ckpt / "layer_0.safetensors"))
            jumprelu, skip = "activation_function.threshold" in first, "W_skip" in first
            tensors, cls = set_outputs(ckpt, cfg, path.name, x, skip), "TranscoderSet"
        else:
            jumprelu, skip = "threshold_0" in load_file(str(ckpt / "W_enc_0.safetensors")), False
            tensors, cls = clt_outputs(ckpt, cfg, path.name, x), "CrossLayerTranscoder"
        how = (
            "written by sparsedict's save_circuit_tracer (scripts/peer_fixtures/export_circuit_tracer.py, the "
            f"model itself in sparsedict/); outputs after circuit-tracer's lazy {cls} loader"
        )
        finish(path, cls, kind, jumprelu, skip, how, tensors)


def main() -> None:
    plt_set("plt_relu", 70, jumprelu=False, skip=False)
    plt_set("plt_jumprelu_skip", 71, jumprelu=True, skip=True)
    clt("clt_relu", 72, jumprelu=False)
    clt("clt_jumprelu", 73, jumprelu=True)
    sparsedict_exports()


if __name__ == "__main__":
    main()
