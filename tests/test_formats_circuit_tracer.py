"""circuit-tracer's transcoder files (docs/formats/circuit-tracer.md) against the fixtures circuit-tracer wrote or ran.

- the documented layout (file and tensor names, shapes, orientation, activation, decoder sums, skip), read with
  plain torch from that document alone, reproduces circuit-tracer's own outputs on the fixtures' inputs;
- sparsedict's ``from_pretrained`` loads every fixture (a ``TranscoderSet`` or a ``clt``) and reproduces them;
- the ``sd_*`` fixtures go the other way: ``save_circuit_tracer`` of a sparsedict model (kept in
  ``sd_*/sparsedict``) wrote ``checkpoint/``, circuit-tracer's own loaders ran it
  (``scripts/peer_fixtures/gen_circuit_tracer.py``), and the export written now is those files, whose
  circuit-tracer outputs are the model's own;
- a set whose ``transcoders`` list names ``hf://`` files loads them from the HF cache (offline), as circuit-tracer
  does;
- what circuit-tracer cannot hold is refused with one line saying why.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sparsedict.dictionaries import CLT, TranscoderSet, build, from_pretrained
from sparsedict.dictionaries.clt import CLTConfig
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.formats import FormatError
from sparsedict.formats.circuit_tracer import save_circuit_tracer

ROOT = Path(__file__).parent / "data" / "peers" / "circuit_tracer"
FIXTURES = sorted(p.parent for p in ROOT.glob("*/fixture.json"))
EXPORTS = [fx for fx in FIXTURES if fx.name.startswith("sd_")]


def read(fx: Path):
    meta = json.loads((fx / "fixture.json").read_text())
    return meta, load_file(str(fx / "expected.safetensors")), fx / "checkpoint"


def jump(z: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """ReLU without a threshold; ``z · 1[z > θ]`` (no ReLU) with one."""
    return torch.relu(z) if theta is None else z * (z > theta)


def test_fixtures_present():
    for fixtures in (FIXTURES, EXPORTS):
        kinds = {read(fx)[0]["model_kind"] for fx in fixtures}
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


def _ours(m, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A sparsedict set/CLT on circuit-tracer's ``x [L, B, d]``: its outputs in circuit-tracer's layout."""
    xb = x.transpose(0, 1)  # [B, L, d]
    with torch.no_grad():
        code = m.encode(xb)
        acts = code.to_dense().view(xb.shape[0], m.n_layers, m.n_per_layer).transpose(0, 1)
        out = m.decode(code, xb).transpose(0, 1)
        decoded = m.decode(code).transpose(0, 1)
        per_layer = {f"acts_layer{i}": m.encode_layer(i, xb[:, i]).to_dense() for i in range(m.n_layers)}
    return {"acts": acts, "out": out, "decoded": decoded, **per_layer}


def _check_outputs(got: dict[str, torch.Tensor], e: dict[str, torch.Tensor]) -> None:
    rows = e["out"].shape[1]  # circuit-tracer's CLT decode drops trailing rows without an active feature
    torch.testing.assert_close(got["out"][:, :rows], e["out"], atol=1e-5, rtol=1e-5)
    for key in ("acts", "decoded", *(k for k in e if k.startswith("acts_layer"))):
        torch.testing.assert_close(got[key], e[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda p: p.name)
def test_from_pretrained_reproduces_circuit_tracer(fx):
    meta, e, ckpt = read(fx)
    m = from_pretrained(ckpt)
    kind = TranscoderSet if meta["model_kind"] == "transcoder_set" else CLT
    assert isinstance(m, kind) and m.layers == list(range(meta["n_layers"]))
    assert (m.d_in, m.d_out, m.n_per_layer) == (meta["d_model"], meta["d_model"], meta["d_transcoder"])
    assert m.meta["source_format"] == "circuit_tracer"
    arch = m.member_architecture if kind is TranscoderSet else m.cfg.activation
    assert arch == meta["activation"]
    _check_outputs(_ours(m, e["x"]), e)


def _unfold(m: torch.nn.Module, c: float) -> None:
    """Undo :meth:`fold_scaling` by hand: the same function on raw inputs, kept as input scale ``c``."""
    members = [d for _, d in m.items()] if isinstance(m, TranscoderSet) else [m]
    with torch.no_grad():
        for d in members:
            d.W_enc.div_(c)
            for w in d.W_dec if isinstance(d, CLT) else [d.W_dec]:
                w.mul_(c)
            d.b_dec.mul_(c)
            d.input_scale.fill_(c)


def _same_files(a: Path, b: Path) -> None:
    assert yaml.safe_load((a / "config.yaml").read_text()) == yaml.safe_load((b / "config.yaml").read_text())
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert set(ta) == set(tb), name
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-5, msg=f"{name}: {k}")


@pytest.mark.parametrize("fx", EXPORTS, ids=lambda p: p.name)
def test_export_round_trips_through_circuit_tracer(fx, tmp_path):
    meta, e, ckpt = read(fx)
    m = from_pretrained(fx / "sparsedict")
    assert meta["library"] == "circuit-tracer" and "save_circuit_tracer" in meta["how"]
    _same_files(save_circuit_tracer(m, tmp_path / "now"), ckpt)  # what circuit-tracer ran is today's export
    got = _ours(m, e["x"])
    if isinstance(m, CLT) and m.cfg.activation == "batchtopk":
        assert meta["activation"] == "jumprelu"  # exported as the equal JumpReLU CLT
    _check_outputs(got, e)  # circuit-tracer's outputs on the exported files are the model's own
    # an unfolded input scale is folded on export: the same files
    scaled = copy.deepcopy(m)
    _unfold(scaled, 1.7)
    _same_files(save_circuit_tracer(scaled, tmp_path / "scaled"), ckpt)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_transcoders_listed_as_hf_uris_load_from_the_hf_cache(tmp_path, monkeypatch):
    """circuit-tracer's ``transcoders: [hf://org/repo/file?revision=…, …]``: each file comes from the HF cache
    (offline here: a cache laid out as huggingface_hub writes it), a local entry from the directory."""
    import huggingface_hub.constants

    from sparsedict.dictionaries import ARCHITECTURES
    from sparsedict.formats import load_dir

    _, e, ckpt = read(ROOT / "plt_relu")
    repo = tmp_path / "hf" / "models--org--plt"
    (repo / "snapshots" / COMMIT / "layers").mkdir(parents=True)
    for i in range(2):
        shutil.copy(ckpt / f"layer_{i}.safetensors", repo / "snapshots" / COMMIT / "layers")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert (
        huggingface_hub.constants.HF_HUB_OFFLINE
    )  # nothing is downloaded: the files must come from the cache

    def listing(name: str, entries: list[str]) -> Path:
        out = tmp_path / name
        out.mkdir()
        cfg = {**yaml.safe_load((ckpt / "config.yaml").read_text()), "transcoders": entries}
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        shutil.copy(ckpt / "layer_2.safetensors", out / "local_2.safetensors")
        return out

    uris = [
        "hf://org/plt/layers/layer_0.safetensors",
        f"hf://org/plt/layers/layer_1.safetensors?revision={COMMIT}",
    ]
    m = from_pretrained(listing("set", [*uris, "local_2.safetensors"]))
    assert (
        isinstance(m, TranscoderSet)
        and m.layers == [0, 1, 2]
        and "transcoders" not in m.meta["circuit_tracer_config"]
    )
    _check_outputs(_ours(m, e["x"]), e)  # circuit-tracer's outputs on the same three files

    with pytest.raises(
        FileNotFoundError, match=r"'hf://org/other/layer_0\.safetensors'.*HF_HUB_OFFLINE is set"
    ):
        from_pretrained(
            listing("uncached", ["hf://org/other/layer_0.safetensors", *uris[1:], "local_2.safetensors"])
        )
    with pytest.raises(FormatError, match="not a hub file URI"):
        from_pretrained(listing("bad", ["hf://org/plt", *uris[1:], "local_2.safetensors"]))
    with pytest.raises(FormatError, match="only hf:// URIs are fetched"):
        from_pretrained(listing("s3", ["s3://bucket/layer_0.safetensors", *uris[1:], "local_2.safetensors"]))
    with pytest.raises(FormatError, match="this loader fetches nothing"):
        load_dir(tmp_path / "set", ARCHITECTURES)  # no fetch given: nothing is downloaded


def test_what_circuit_tracer_cannot_hold_is_refused(tmp_path):
    src = ROOT / "plt_jumprelu_skip" / "checkpoint"
    neg = tmp_path / "neg"
    shutil.copytree(src, neg)
    t = load_file(str(neg / "layer_1.safetensors"))
    t["activation_function.threshold"][0] = -0.2
    save_file(t, str(neg / "layer_1.safetensors"))
    with pytest.raises(FormatError, match="negative thresholds"):
        from_pretrained(neg)
    gap = tmp_path / "gap"
    shutil.copytree(src, gap)
    (gap / "layer_1.safetensors").unlink()
    with pytest.raises(FormatError, match=r"layers \[0, 2\].*every layer from 0"):
        from_pretrained(gap)
    short = tmp_path / "short"
    shutil.copytree(ROOT / "clt_relu" / "checkpoint", short)
    t = load_file(str(short / "W_dec_1.safetensors"))
    save_file({"W_dec_1": t["W_dec_1"][:, :1].contiguous()}, str(short / "W_dec_1.safetensors"))
    with pytest.raises(FormatError, match="W_dec_1"):
        from_pretrained(short)
    d = 8
    topk = build(CLTConfig(layers=[0, 1], activation="topk", n_latents=16, k=2).resolved(d))
    with pytest.raises(FormatError, match="no TopK CLT"):
        save_circuit_tracer(topk, tmp_path / "topk")
    skip = build(CLTConfig(layers=[0, 1], activation="relu", n_latents=16, skip=True).resolved(d))
    with pytest.raises(FormatError, match="skip connection"):
        save_circuit_tracer(skip, tmp_path / "skip")
    late = build(CLTConfig(layers=[2, 3], activation="relu", n_latents=16).resolved(d))
    with pytest.raises(FormatError, match=r"layers 0\.\.L-1"):
        save_circuit_tracer(late, tmp_path / "late")
    tset = TranscoderSet(
        TopKConfig(layers=[0, 1], hookpoint="mlp_in", target="mlp_out", n_latents=16).resolved(d)
    )
    with pytest.raises(FormatError, match="ReLU or JumpReLU"):
        save_circuit_tracer(tset, tmp_path / "topkset")
    with pytest.raises(FormatError, match="transcoder sets and cross-layer transcoders"):
        save_circuit_tracer(tset[0], tmp_path / "one")


@pytest.mark.parametrize("name", ["plt_jumprelu_skip", "clt_jumprelu"])
def test_convert_to_ours_and_back_rewrites_the_same_files(name, tmp_path, capsys):
    from sparsedict.cli import main

    ckpt = ROOT / name / "checkpoint"
    assert main(["convert", str(ckpt), str(tmp_path / "ours"), "--to", "sparsedict"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "ct"), "--to", "circuit_tracer"]) == 0
    assert capsys.readouterr().out.count("verified on 256 random inputs") == 2
    _same_files(tmp_path / "ct", ckpt)
