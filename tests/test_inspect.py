"""`sparsedict inspect` on a real SmolLM2 cache: the streaming pass against a brute-force dense computation,
every registered architecture (and a skip transcoder), the logit lens against a plain reference, the
Neuronpedia and delphi exports read back field by field, the CLI, and the browser in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
from urllib.parse import quote

import numpy as np
import pytest
import torch
from helpers import make_dict, small_cache

from sparsedict.cache import ActivationStore
from sparsedict.cli import main as sparsedict_main
from sparsedict.dictionaries import available, build, lookup
from sparsedict.inspect import InspectConfig, Inspection, collect, inspect
from sparsedict.inspect.export import read_jsonl_gz
from sparsedict.inspect.stream import BINS_PER_OCTAVE, HIST_LOW, N_BINS, priority
from sparsedict.inspect.tokens import display, token_texts

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
HP, MLP_IN, MLP_OUT, HIDDEN = "resid_post.3", "mlp_in.3", "mlp_out.3", "mlp_hidden.3"
T = 48  # context length


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)  # shared 2-core machine: one thread is much faster under contention
    return small_cache(tmp_path_factory.mktemp("cache") / "c", [HP, MLP_IN, MLP_OUT, HIDDEN], 1500,
                       context_length=T, shard_rows=400)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    from sparsedict.lm import load_model

    return load_model()[1]


def _dictionary(arch: str, hookpoint: str = HP, n: int = 64, data=None, **kw):
    d = make_dict(arch, data.shape[1], n, hookpoint=hookpoint, **kw)
    torch.manual_seed(0)
    with torch.no_grad():
        d.init_from_data(data[:400].to(d.W_dec.dtype))
        # encoder rows = noisy data rows, so that every latent fires sometimes
        if getattr(d, "W_enc", None) is not None:
            pick = torch.randperm(len(data))[:n] if n <= len(data) else torch.randint(len(data), (n,))
            rows = (data[pick] + 0.3 * torch.randn(len(pick), data.shape[1])).to(d.W_enc.dtype)
            d.W_enc.copy_((rows / rows.norm(dim=1, keepdim=True)).T[: d.W_enc.shape[0]])
    return d.eval()


def _row_map(cache_dir, hookpoint=HP):
    """``{(global context, position): global row}`` and the stored token ids, from the cache's tokens files."""
    tok = ActivationStore(cache_dir, hookpoint, loop=False).tokens()
    where = {(int(c), int(p)): r for r, (c, p) in enumerate(zip(tok["row_context"], tok["row_position"]))}
    return where, tok


def _cfg(cache_dir, out, **kw) -> InspectConfig:
    base = dict(cache=str(cache_dir), out=str(out), top_n=6, quantiles=3, per_quantile=2, window=5, logits=5,
                neighbours=4, batch_rows=150, progress=False)  # fmt: skip
    return InspectConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- the pass
def test_pass_matches_dense_brute_force(cache, tmp_path):
    """Two dictionaries (sparse TopK and dense ReLU codes, float64 so codes do not depend on the batching)
    share one pass; every statistic and table equals a dense [rows, n] computation."""
    x = ActivationStore(cache, HP, loop=False).rows()
    topk = _dictionary("topk", k=6, dtype="float64", data=x)
    relu = _dictionary("relu", dtype="float64", data=x)
    with torch.no_grad():
        relu.b_enc.fill_(-3.0)  # sparser ReLU codes
    where, tok = _row_map(cache)
    dicts = {"a/topk": topk, "b/relu": relu}
    results, _ = collect(_cfg(cache, tmp_path, seed=7), dicts)
    assert list(results) == ["topk", "relu"]
    for (_, d), r in zip(dicts.items(), results.values()):
        with torch.no_grad():
            dense = d.encode(x.double()).to_dense().numpy()
        assert r.tokens == len(x) and r.meta["seconds"]["pass_shared_by"] == 2
        np.testing.assert_array_equal(r["count"], (dense != 0).sum(0))
        np.testing.assert_allclose(r["total"], dense.sum(0), rtol=1e-6)  # values kept as float32
        fired = (dense != 0).any(0)
        np.testing.assert_allclose(r["max"][fired], dense.max(0)[fired], rtol=1e-6)
        assert np.all(np.isneginf(r["max"][~fired]))
        rows, lat = np.nonzero(dense > 0)
        bins = np.clip(np.floor(np.log2(dense[rows, lat]) * BINS_PER_OCTAVE).astype(int) - HIST_LOW * BINS_PER_OCTAVE,
                       0, N_BINS - 1)  # fmt: skip
        ref_hist = np.zeros((d.n_latents, N_BINS), dtype=np.int64)
        np.add.at(ref_hist, (lat, bins), 1)
        np.testing.assert_array_equal(r["hist"], ref_hist)
        assert fired.sum() > 0.8 * d.n_latents
        for j, i in enumerate(r["latents"]):
            col = dense[:, i]
            nz = np.flatnonzero(col)
            ref_top = nz[np.lexsort((nz, -col[nz]))][:6]  # value descending, ties: earlier row
            got = r["top_row"][j][r["top_row"][j] >= 0]
            np.testing.assert_array_equal(got, ref_top)
            np.testing.assert_allclose(r["top_value"][j][: len(got)], col[got], rtol=1e-6)
            keys = priority(7, torch.from_numpy(nz), torch.full((len(nz),), int(i))).numpy()
            ref_sample = nz[np.lexsort((nz, -keys))][:6]
            np.testing.assert_array_equal(
                np.sort(r["sample_row"][j][r["sample_row"][j] >= 0]), np.sort(ref_sample)
            )
            for table in ("top", "sample"):
                for e in r.examples(table, j):
                    assert where[(e["ctx"], e["pos"])] == e["row"]
                    lc = e["ctx"]
                    length = int(tok["attention_mask"][lc].sum())
                    for o, (t, a) in enumerate(zip(e["tokens"], e["window"])):
                        p = e["pos"] - 5 + o
                        if not 0 <= p < length:
                            assert t == -1 and math.isnan(a)
                            continue
                        assert t == int(tok["token_ids"][lc, p])
                        row = where.get((e["ctx"], p))
                        if row is None:  # an excluded position (BOS, attention sink): no activation
                            assert math.isnan(a) and not tok["keep"][lc, p]
                        else:
                            assert a == pytest.approx(float(col[row]), rel=1e-6, abs=1e-9)
                    assert e["window"][5] == pytest.approx(e["value"], rel=1e-6)


def test_pass_is_deterministic_and_subsets_agree(cache, tmp_path):
    x = ActivationStore(cache, HP, loop=False).rows()
    d = _dictionary("topk", k=6, dtype="float64", data=x)
    a, _ = collect(_cfg(cache, tmp_path, batch_rows=90), {"m": d})
    b, _ = collect(_cfg(cache, tmp_path, batch_rows=2000, latents="3-9,40"), {"m": d})
    a, b = a["m"], b["m"]
    np.testing.assert_array_equal(b["latents"], [3, 4, 5, 6, 7, 8, 9, 40])
    for key in ("count", "hist"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("top_row", "top_tokens", "sample_row", "sample_tokens"):
        np.testing.assert_array_equal(a[key][b["latents"]], b[key])
    np.testing.assert_allclose(a["top_window"][b["latents"]], b["top_window"], equal_nan=True, rtol=1e-9)
    c, _ = collect(_cfg(cache, tmp_path, tokens=500), {"m": d})
    c = c["m"]
    _, tok = _row_map(cache)
    assert 500 <= c.tokens < 500 + T and (
        int(tok["row_context"][c.tokens]) != int(tok["row_context"][c.tokens - 1])
    )
    with torch.no_grad():
        dense = d.encode(x[: c.tokens].double()).to_dense().numpy()
    np.testing.assert_array_equal(c["count"], (dense != 0).sum(0))
    assert c["top_row"].max() < c.tokens


# ---------------------------------------------------------------------------------- every architecture
def _zoo(cache):
    x = ActivationStore(cache, HP, loop=False).rows()
    h = ActivationStore(cache, HIDDEN, loop=False).rows()
    zoo = {}
    for arch in available():
        if lookup(arch)[0].layered:  # several hookpoints per row: refused (test_cli_and_errors)
            continue
        if arch == "snmf":
            zoo[arch] = _dictionary(arch, HIDDEN, n=16, data=h)
        elif arch == "mp":
            zoo[arch] = _dictionary(arch, n=64, data=x, steps=4)
        else:
            kw = {"k": 6} if arch in ("topk", "batchtopk", "matryoshka") else {}
            if arch == "topk":  # float64: codes do not depend on the batching, so exports compare exactly
                kw["dtype"] = "float64"
            zoo[arch] = _dictionary(arch, data=x, **kw)
    xi = ActivationStore(cache, MLP_IN, loop=False).rows()
    zoo["skip-transcoder"] = _dictionary("topk", MLP_IN, data=xi, k=6, target=MLP_OUT, d_out=576, skip=True)
    return zoo


@pytest.fixture(scope="module")
def zoo_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    folders = {}
    for name, d in _zoo(cache).items():
        d.save_pretrained(out / "ckpt" / name)
        folders[name] = str(out / "ckpt" / name)
    index = inspect(checkpoints=list(folders.values()), cache=str(cache), out=str(out / "browser"), top_n=5,
                    quantiles=3, per_quantile=2, window=6, neuronpedia=True, delphi=True, delphi_splits=3,
                    batch_rows=256, progress=False)  # fmt: skip
    return index, folders


def test_every_architecture_is_inspected(zoo_run, cache, tokenizer):
    index, folders = zoo_run
    assert index.name == "index.html" and index.exists()
    assert set(folders) >= {a for a in available() if not lookup(a)[0].layered}  # layered: refused
    landing = index.read_text()
    assert all(f"href='{name}/index.html'" in landing for name in folders)
    texts = token_texts(tokenizer)
    for name in folders:
        r = Inspection.load(index.parent / name)
        assert r.tokens == 1500, name
        fired = r["count"] > 0
        assert fired.sum() >= 0.5 * r.n_latents, (name, fired.sum())
        for j, i in enumerate(r["latents"]):
            top = r.examples("top", j)
            assert len(top) == min(5, int(r["count"][i])), name
            values = [e["value"] for e in top]
            assert values == sorted(values, reverse=True)
            if top:
                assert values[0] == pytest.approx(float(r["max"][i]), rel=1e-6)
            for e in top + r.examples("sample", j):
                assert e["window"][6] == pytest.approx(e["value"], rel=1e-5), name  # the firing token itself
                assert e["tokens"][6] >= 0
        page = (index.parent / name / "features" / f"{int(r['latents'][0])}.html").read_text()
        data = json.loads(
            re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
        )
        assert data["kind"] == "feature" and len(data["top"]) == len(r.examples("top", 0))
        if data["top"]:
            ex = data["top"][0]
            assert data["tok"][str(ex["t"][ex["c"]])] == display(texts[int(r["top_tokens"][0, 0, 6])])
        assert "lens_top_ids" in r.arrays, (name, r.meta["lens"])
        assert r["near_ids"].shape == (len(r["latents"]), 8)
    assert "down_proj" in Inspection.load(index.parent / "snmf").meta["lens"]
    tc = Inspection.load(index.parent / "skip-transcoder")
    assert tc.meta["hookpoint"] == MLP_IN and tc.meta["target"] == MLP_OUT


def test_logit_lens_and_neighbours_match_a_plain_reference(zoo_run):
    from sparsedict.dictionaries import from_pretrained
    from sparsedict.lm import load_model

    index, folders = zoo_run
    model, tok = load_model()
    gamma = model.model.norm.weight.detach()
    W_U = model.lm_head.weight.detach()
    down = model.model.layers[3].mlp.down_proj.weight.detach()
    for name, resid in (("topk", lambda w: w), ("snmf", lambda w: w @ down.T)):
        r = Inspection.load(index.parent / name)
        w_dec = from_pretrained(folders[name]).W_dec.detach().float()
        logits = (resid(w_dec) * gamma) @ W_U.T
        ref = logits.topk(5, dim=1)
        np.testing.assert_array_equal(r["lens_top_ids"][:, :5], ref.indices.numpy())
        np.testing.assert_allclose(r["lens_top_values"][:, :5], ref.values.numpy(), rtol=1e-4, atol=1e-5)
        low = logits.topk(5, dim=1, largest=False)
        np.testing.assert_array_equal(r["lens_bottom_ids"][:, :5], low.indices.numpy())
        assert r["lens_hist_counts"].sum(1).tolist() == [len(tok)] * len(w_dec)
        unit = w_dec / w_dec.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        cos.fill_diagonal_(-2)
        ref = cos.topk(min(8, len(w_dec) - 1), dim=1)
        np.testing.assert_allclose(r["near_cos"], ref.values.numpy(), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- exports
# Database rows of Neuronpedia's importer (neuronpedia-utils db_models Feature / Activation).
NP_FEATURE_FIELDS = {
    "modelId": str, "layer": str, "index": str, "creatorId": str, "createdAt": str, "maxActApprox": float,
    "hasVector": bool, "vector": list, "vectorLabel": type(None), "vectorDefaultSteerStrength": int,
    "hookName": type(None), "topkCosSimIndices": list, "topkCosSimValues": list,
    "neuron_alignment_indices": list, "neuron_alignment_values": list, "neuron_alignment_l1": list,
    "correlated_neurons_indices": list, "correlated_neurons_pearson": list, "correlated_neurons_l1": list,
    "correlated_features_indices": list, "correlated_features_pearson": list, "correlated_features_l1": list,
    "neg_str": list, "neg_values": list, "pos_str": list, "pos_values": list, "frac_nonzero": float,
    "freq_hist_data_bar_heights": list, "freq_hist_data_bar_values": list, "logits_hist_data_bar_heights": list,
    "logits_hist_data_bar_values": list, "decoder_weights_dist": list,
}  # fmt: skip
NP_ACTIVATION_FIELDS = {
    "id": str, "tokens": list, "index": str, "layer": str, "modelId": str, "maxValue": float,
    "maxValueTokenIndex": int, "minValue": float, "values": list, "creatorId": str, "dataSource": type(None),
    "dataIndex": str, "dfaValues": list, "dfaTargetIndex": type(None), "dfaMaxValue": type(None),
    "createdAt": str, "lossValues": list, "logitContributions": type(None), "binMin": (int, float),
    "binMax": (int, float), "binContains": (int, float), "qualifyingTokenIndex": int,
}  # fmt: skip


def test_neuronpedia_export_reads_back(zoo_run, tokenizer):
    index, _ = zoo_run
    texts = token_texts(tokenizer)
    r = Inspection.load(index.parent / "topk")
    root = index.parent / "topk" / "neuronpedia" / "smollm2-135m" / "3-sparsedict-topk"
    for meta_file in ("model.jsonl", "source.jsonl", "sourceset.jsonl"):
        assert len((root / meta_file).read_text().splitlines()) == 1
    assert json.loads((root / "source.jsonl").read_text())["id"] == "3-sparsedict-topk"
    features = read_jsonl_gz(root / "features" / "batch-0.jsonl.gz")
    acts = read_jsonl_gz(root / "activations" / "batch-0.jsonl.gz")
    assert [f["index"] for f in features] == [str(i) for i in range(64)]
    for f in features:
        assert set(f) == set(NP_FEATURE_FIELDS)
        for key, kind in NP_FEATURE_FIELDS.items():
            assert isinstance(f[key], kind) or (kind is float and isinstance(f[key], int)), (key, f[key])
        i = int(f["index"])
        assert f["frac_nonzero"] == pytest.approx(r["count"][i] / r.tokens)
        assert sum(f["freq_hist_data_bar_heights"]) == r["count"][i]
        assert f["pos_str"] == [texts[t] for t in r["lens_top_ids"][i]]
        assert f["neg_values"] == sorted(f["neg_values"]) and len(f["neg_str"]) == 10
        assert f["topkCosSimIndices"] == r["near_ids"][i].tolist()
        assert sum(f["logits_hist_data_bar_heights"]) == len(texts)
    by_index: dict[str, list] = {}
    for a in acts:
        assert set(a) == set(NP_ACTIVATION_FIELDS)
        for key, kind in NP_ACTIVATION_FIELDS.items():
            assert isinstance(a[key], kind) or (kind is float and isinstance(a[key], int)), (key, a[key])
        assert len(a["tokens"]) == len(a["values"]) and all(isinstance(t, str) for t in a["tokens"])
        assert a["maxValue"] == max(a["values"]) and a["minValue"] == min(a["values"])
        by_index.setdefault(a["index"], []).append(a)
    for j in range(64):
        rows = by_index.get(str(j), [])
        top = r.examples("top", j)
        assert len(rows) == len(top) + len(r.examples("sample", j))
        for a, e in zip(rows, top):
            assert a["binMin"] == -1 and a["binContains"] == pytest.approx(len(top) / r["count"][j], rel=1e-4)
            assert a["values"][a["qualifyingTokenIndex"]] == pytest.approx(e["value"], abs=1e-3)
            inside = e["tokens"][e["tokens"] >= 0]
            assert "".join(a["tokens"]) == "".join(texts[t] for t in inside)
            assert a["dataIndex"] == str(e["ctx"])
        for a in rows[len(top) :]:
            assert 0 < a["binContains"] < 1 and a["binMin"] <= a["values"][a["qualifyingTokenIndex"]] + 1e-3


def test_delphi_export_reads_back(zoo_run, cache):
    """Read the latent cache the way delphi's TensorBuffer does and compare with the dictionary's codes."""
    from safetensors.numpy import load_file

    from sparsedict.dictionaries import from_pretrained

    index, folders = zoo_run
    module = index.parent / "topk" / "delphi" / HP
    config = json.loads((module / "config.json").read_text())
    assert config["cache_ctx_len"] == T and config["n_splits"] == 3
    assert os.path.isdir(config["model_name"])  # delphi loads the tokenizer from it
    files = sorted(module.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
    assert [p.stem for p in files] == ["0_20", "21_41", "42_63"]  # delphi: linspace(0, width, splits + 1)
    where, tok = _row_map(cache)
    d = from_pretrained(folders["topk"])
    x = ActivationStore(cache, HP, loop=False).rows()
    with torch.no_grad():
        dense = d.encode(x.double()).to_dense().numpy()
    seen = np.zeros_like(dense)
    for path in files:
        data = load_file(str(path))
        assert data["locations"].dtype == np.uint16 and data["activations"].dtype == np.float16
        np.testing.assert_array_equal(data["tokens"], tok["token_ids"].numpy())
        loc = data["locations"].astype(np.int64)
        loc[:, 2] += int(path.stem.split("_")[0])
        rows = np.array([where[(c, p)] for c, p in loc[:, :2]])
        seen[rows, loc[:, 2]] = data["activations"]
    np.testing.assert_allclose(seen, np.where(np.abs(dense) > 1e-5, dense, 0).astype(np.float16), rtol=1e-3)


# ------------------------------------------------------------------------------------------- CLI, text
def main(argv: list[str]) -> int:
    return sparsedict_main(["inspect", *argv])


def test_cli_and_errors(cache, tmp_path, capsys):
    x = ActivationStore(cache, HP, loop=False).rows()
    _dictionary("topk", k=6, data=x).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--top_n" in shown and "Top-activating examples kept per latent (exact)" in shown
    rc = main([str(tmp_path / "ckpt"), "--cache", str(cache), "--out", str(tmp_path / "o"), "--latents", "0-3",
               "--tokens", "300", "--progress", "false"])  # fmt: skip
    assert rc == 0
    assert f"feature browser: {(tmp_path / 'o' / 'index.html').resolve()}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o" / "ckpt" / "features").iterdir()) == [
        f"{i}.html" for i in range(4)
    ]
    # a recipe gives the defaults, flags override them
    recipe = tmp_path / "inspect.yaml"
    recipe.write_text(f"inspect:\n  cache: {cache}\n  out: {tmp_path / 'y'}\n  latents: 5-6\n  tokens: 200\n"
                      "  progress: false\n  top_n: 3\n")  # fmt: skip
    assert main([str(recipe), str(tmp_path / "ckpt"), "--latents", "7"]) == 0
    capsys.readouterr()
    assert [p.name for p in (tmp_path / "y" / "ckpt" / "features").iterdir()] == ["7.html"]
    r = Inspection.load(tmp_path / "y" / "ckpt")
    assert r["top_row"].shape == (1, 3) and r.meta["settings"]["tokens"] == 200
    (tmp_path / "bad.yaml").write_text("inspect:\n  top_m: 3\n")
    assert main([str(tmp_path / "bad.yaml"), str(tmp_path / "ckpt")]) == 2
    assert "did you mean 'top_n'" in capsys.readouterr().err
    assert main([str(tmp_path / "ckpt"), "--cache", str(tmp_path / "nope"), "--progress", "false"]) == 2
    assert "not an activation cache" in capsys.readouterr().err
    assert (
        main([str(tmp_path / "ckpt"), "--cache", str(cache), "--latents", "0-99999", "--progress", "false"])
        == 2
    )
    assert "out of range" in capsys.readouterr().err
    assert (
        main([str(tmp_path / "ckpt"), "--cache", str(cache), "--latents", "7-x", "--progress", "false"]) == 2
    )
    assert "cannot read '7-x'" in capsys.readouterr().err
    assert main([str(tmp_path / "ckpt"), "--cache", str(cache), "--top-n", "-1"]) == 2
    assert "top_n must be >= 0" in capsys.readouterr().err
    d = _dictionary("topk", HIDDEN, k=6, data=ActivationStore(cache, HIDDEN, loop=False).rows())
    d.cfg.hookpoint = "resid_post.9"
    d.save_pretrained(tmp_path / "wrong")
    assert main([str(tmp_path / "wrong"), "--cache", str(cache), "--progress", "false"]) == 2
    assert "resid_post.9" in capsys.readouterr().err
    layered = [a for a in available() if lookup(a)[0].layered]
    assert layered, "the registry has a multi-layer architecture (clt)"
    for arch in layered:  # several hookpoints per row: refused with the reason
        cfg = lookup(arch)[1](hookpoint="mlp_in", target="mlp_out", layers=[1, 2], d_in=576,
                                               d_out=576, n_latents=8)  # fmt: skip
        with pytest.raises(ValueError, match="reads several hookpoints per row"):
            collect(InspectConfig(cache=str(cache)), dictionaries={"clt": build(cfg)})


def test_token_text_and_escaping(tokenizer):
    from sparsedict.inspect.browser import _page

    texts = token_texts(tokenizer)
    ids = tokenizer("Hello world\n\tfoo <b>&amp; é中", add_special_tokens=False)["input_ids"]
    assert "".join(texts[i] for i in ids) == "Hello world\n\tfoo <b>&amp; é中"
    assert texts[tokenizer.convert_tokens_to_ids("Ġworld")] == " world"
    assert display("a\nb\tc\x01") == "a↵b⇥c\\x01"
    partial = [t for t in texts if "\\x" in t]
    assert partial, "byte tokens of split multi-byte characters are shown as escapes"
    evil = {"t": "</script><img src=x onerror=alert(1)>&amp;<!--"}
    page = _page("<b>title</b>", "", 0, data=evil)
    assert "</script><img" not in page and "<!--" not in page and "<b>title" not in page
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload) == evil


def test_quickstart_sized_call(cache, tmp_path):
    """The one call the quickstart makes: a quickstart-sized TopK (8·576 latents, k=32) -> index.html."""
    x = ActivationStore(cache, HP, loop=False).rows()
    _dictionary("topk", n=8 * 576, k=32, data=x).save_pretrained(tmp_path / "topk-resid_post.3")
    index = inspect(checkpoints=[str(tmp_path / "topk-resid_post.3")], cache=str(cache), out=str(tmp_path / "b"),
                    progress=False)  # fmt: skip
    assert index == tmp_path / "b" / "index.html" and index.exists()
    assert len(list((tmp_path / "b" / "topk-resid_post.3" / "features").iterdir())) == 8 * 576


# ------------------------------------------------------------------------------------- headless browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it as root)")
def test_browser_renders_in_headless_chromium(zoo_run, tmp_path, tokenizer):
    index, _ = zoo_run
    shots = os.environ.get("SPARSEDICT_SCREENSHOTS")
    shot_dir = tmp_path if not shots else __import__("pathlib").Path(shots)
    shot_dir.mkdir(parents=True, exist_ok=True)
    r = Inspection.load(index.parent / "topk")
    texts = token_texts(tokenizer)
    j = int(np.argmax(r["max"]))  # the latent with the largest activation
    page = index.parent / "topk" / "features" / f"{j}.html"
    for url, shot, size in ((index.parent / "topk" / "index.html", "index.png", "1280,900"),
                            (page, "feature.png", "1280,1500")):  # fmt: skip
        _chromium(tmp_path, url.as_uri(), f"--screenshot={shot_dir / shot}", f"--window-size={size}")
        w, h = _png_size(shot_dir / shot)
        assert (w, h) == tuple(int(v) for v in size.split(",")) and (shot_dir / shot).stat().st_size > 20_000
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom").stdout
    # the top example, as rendered: its tokens in order inside the first example row, the firing token marked
    first = r.examples("top", j)[0]
    inside = first["tokens"][first["tokens"] >= 0]
    want = "".join(display(texts[t]) for t in inside)
    rows = re.findall(r'<div class="ex">(.*?)</div>', dom, re.S)
    assert rows, "no example rows rendered"
    spans = re.findall(r'<span class="tok[^"]*"[^>]*>(.*?)</span>', rows[0], re.S)
    import html as html_mod

    assert "".join(html_mod.unescape(s) for s in spans) == want
    assert re.search(r'class="tok[^"]*fire[^"]*"', rows[0])
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]*height="([0-9.]+)"', dom)]
    assert heights and max(heights) > 10
    idx = index.parent / "topk" / "index.html"
    idx_dom = _chromium(tmp_path, idx.as_uri(), "--dump-dom").stdout
    assert _listed(idx_dom) == list(range(64)) and "64 of 64 latents" in idx_dom

    # sorting and search run in the page's script; the view comes from the address's fragment
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', idx.read_text(),
                                re.S).group(1))  # fmt: skip
    fired = r["count"] > 0
    np.testing.assert_allclose([data["max"][i] for i in np.flatnonzero(fired)], r["max"][fired], rtol=1e-3)
    assert all(data["max"][i] is None for i in np.flatnonzero(~fired))
    by_max = sorted(range(64), key=lambda i: (data["max"][i] is None, -(data["max"][i] or 0), i))
    assert by_max[0] == j
    assert _listed(_chromium(tmp_path, idx.as_uri() + "#sort=-max", "--dump-dom").stdout) == by_max
    by_density = sorted(range(64), key=lambda i: (data["density"][i], i))
    assert _listed(_chromium(tmp_path, idx.as_uri() + "#sort=density", "--dump-dom").stdout) == by_density
    half = int(r.meta["settings"]["window"])
    top_text = {int(i): display(texts[int(r["top_tokens"][k, 0, half])]) for k, i in enumerate(r["latents"])
                if r["top_row"][k, 0] >= 0}  # fmt: skip
    assert {i: t for i, t in enumerate(data["top_token"]) if t is not None} == top_text
    q = next(t.strip().lower() for t in top_text.values() if t.strip().isalpha() and len(t.strip()) >= 2)
    hits = [i for i in range(64)
            if any(t is not None and q in t.lower() for t in (data["top_token"][i], data["logit_token"][i]))]  # fmt: skip
    found = _chromium(tmp_path, f"{idx.as_uri()}#sort=latent&q={quote(q)}", "--dump-dom").stdout
    assert _listed(found) == hits and f"{len(hits)} of 64 latents" in found


def _listed(dom: str) -> list[int]:
    """Latent ids in the index table's rows, in order, from a dumped DOM."""
    body = dom.split('<tbody id="rows">', 1)[1].split("</tbody>", 1)[0]
    return [int(i) for i in re.findall(r'<tr[^>]*><td><a href="features/(\d+)\.html">', body)]
