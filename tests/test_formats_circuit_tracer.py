"""circuit-tracer's transcoder files (docs/formats/circuit-tracer.md) against the fixtures circuit-tracer wrote.

sparsedict has no loader for these yet; this checks that the documented layout (file and tensor names, shapes,
orientation, activation, decoder sums, skip) reproduces circuit-tracer's own outputs on the fixtures' inputs,
with a plain-torch reading of the files written from that document alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).parent / "data" / "peers" / "circuit_tracer"
FIXTURES = sorted(p.parent for p in ROOT.glob("*/fixture.json"))


def read(fx: Path):
    meta = json.loads((fx / "fixture.json").read_text())
    return meta, load_file(str(fx / "expected.safetensors")), fx / "checkpoint"


def jump(z: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """ReLU without a threshold; ``z · 1[z > θ]`` (no ReLU) with one."""
    return torch.relu(z) if theta is None else z * (z > theta)


def test_fixtures_present():
    kinds = {read(fx)[0]["model_kind"] for fx in FIXTURES}
    assert kinds == {"transcoder_set", "cross_layer_transcoder"}, (
        "run scripts/peer_fixtures/make_all.sh circuit_tracer"
    )


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda p: p.name)
def test_layout_reproduces_circuit_tracer(fx):
    meta, e, ckpt = read(fx)
    n_layers, d, f = meta["n_layers"], meta["d_model"], meta["d_transcoder"]
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert cfg["model_kind"] == meta["model_kind"]
    assert {"feature_input_hook", "feature_output_hook"} <= set(cfg)
    x = e["x"]
    assert x.shape == (n_layers, x.shape[1], d)
    acts, outs = [], []
    if cfg["model_kind"] == "transcoder_set":
        assert sorted(p.name for p in ckpt.glob("*.safetensors")) == [
            f"layer_{i}.safetensors" for i in range(n_layers)
        ]
        for i in range(n_layers):
            t = load_file(str(ckpt / f"layer_{i}.safetensors"))
            shapes = {"W_enc": (f, d), "W_dec": (f, d), "b_enc": (f,), "b_dec": (d,)}
            shapes |= {"activation_function.threshold": (f,)} if meta["activation"] == "jumprelu" else {}
            shapes |= {"W_skip": (d, d)} if meta["skip"] else {}
            assert {k: tuple(v.shape) for k, v in t.items()} == shapes
            a = jump(x[i] @ t["W_enc"].T + t["b_enc"], t.get("activation_function.threshold"))
            y = a @ t["W_dec"] + t["b_dec"]
            acts.append(a)
            outs.append(y + x[i] @ t["W_skip"].T if meta["skip"] else y)
            torch.testing.assert_close(e["decoded"][i], y, atol=1e-5, rtol=1e-5)
    else:
        names = sorted(p.name for p in ckpt.glob("*.safetensors"))
        assert names == sorted(
            [f"W_enc_{i}.safetensors" for i in range(n_layers)]
            + [f"W_dec_{i}.safetensors" for i in range(n_layers)]
        )
        enc = [load_file(str(ckpt / f"W_enc_{i}.safetensors")) for i in range(n_layers)]
        dec = [load_file(str(ckpt / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n_layers)]
        for i in range(n_layers):
            shapes = {f"W_enc_{i}": (f, d), f"b_enc_{i}": (f,), f"b_dec_{i}": (d,)}
            shapes |= {f"threshold_{i}": (f,)} if meta["activation"] == "jumprelu" else {}
            assert {k: tuple(v.shape) for k, v in enc[i].items()} == shapes
            assert tuple(dec[i].shape) == (f, n_layers - i, d)
            t = enc[i]
            acts.append(jump(x[i] @ t[f"W_enc_{i}"].T + t[f"b_enc_{i}"], t.get(f"threshold_{i}")))
        for j in range(n_layers):  # output j sums the features of every layer l <= j
            outs.append(sum(acts[i] @ dec[i][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"])
    acts, outs = torch.stack(acts), torch.stack(outs)
    torch.testing.assert_close(acts, e["acts"], atol=1e-5, rtol=1e-5)
    for i in range(n_layers):
        torch.testing.assert_close(acts[i], e[f"acts_layer{i}"], atol=1e-5, rtol=1e-5)
    # circuit-tracer's CLT decode sizes its output by the last position with an active feature in any layer
    rows = int(e["acts"].ne(0).any(-1).any(0).nonzero().max()) + 1
    assert e["out"].shape == (n_layers, rows, d)
    torch.testing.assert_close(outs[:, :rows], e["out"], atol=1e-5, rtol=1e-5)
    active = e["acts"] != 0
    assert active.any() and not active.all()
