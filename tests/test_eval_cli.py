"""`sparsedict eval` on real held-out caches of SmolLM2: JSON/table output, exclusion checks, transcoders,
and every registered architecture through the Dictionary interface."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import identity_dict, small_cache

from sparsedict.cache import ActivationStore
from sparsedict.cli import main
from sparsedict.dictionaries import available, build, lookup
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.eval.evaluate import EvalConfig, evaluate

HP, MLP_IN, MLP_OUT = "resid_post.2", "mlp_in.2", "mlp_out.2"
pytestmark = pytest.mark.usefixtures("one_thread")  # thread barriers dominate small ops on a shared machine


def _cache(root, split: str, tokens: int, **kw):
    return small_cache(root, [HP, MLP_IN, MLP_OUT], tokens, split=split, context_length=48, **kw)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {
        "train": _cache(root / "train", "train", 400),
        "test": _cache(root / "test", "test", 900),
        "other": _cache(root / "other", "test", 300, exclude_first_n=0, exclude_bos=False),
    }


def test_eval_cli_identity_and_transcoder(caches, tmp_path, capsys):
    torch.manual_seed(0)
    ident = identity_dict(576, HP)
    ident.save_pretrained(tmp_path / "ident", {"cache": str(caches["train"])})
    tc = build(
        TopKConfig(hookpoint=MLP_IN, target=MLP_OUT, d_in=576, d_out=576, n_latents=256, k=16).resolved(576)
    )
    store = ActivationStore(caches["test"], MLP_IN, target=MLP_OUT, batch_size=64)
    with torch.no_grad():
        tc.b_dec.copy_(store.rows()[1].mean(0))
    tc.save_pretrained(tmp_path / "tc", {"cache": str(caches["train"]), "dead_tokens": 600})
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tmp_path / "ident"), str(tmp_path / "tc"), "--cache", str(caches["test"]), "--max_tokens", "5000",
               "--splice_tokens", "150", "--threads", "1", "--json_out", str(out)])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "CE rec" in table and "ident" in table and "tc" in table
    records = {r["checkpoint"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())}
    m = records["ident"]["metrics"]
    assert m["fvu"] == pytest.approx(0.0, abs=1e-10) and m["cosine"] == pytest.approx(1.0)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-5) and m["kl"] == pytest.approx(0.0, abs=1e-6)
    # Identity code = [relu(x), relu(-x)]: L0 = nonzero entries; a latent is dead when its sign never occurs.
    xr = ActivationStore(caches["test"], HP, batch_size=64).rows()
    assert m["l0"] == pytest.approx(float((xr != 0).sum(1).double().mean()))
    dead = int((~(xr > 0).any(0)).sum() + (~(xr < 0).any(0)).sum())
    assert m["dead_fraction"] == pytest.approx(dead / 1152)
    assert records["ident"]["distributions"]["firing_histogram"]["dead"] == dead
    data = records["ident"]["data"]
    assert data["cache"] == str(caches["test"]) and data["exclusions"]["exclude_first_n"] == 2
    assert data["recon_tokens"] == 900 and data["splice_contexts"] >= 1 and m["splice_tokens"] > 0
    # F8: the dead window is reported; below the training window (10M by default, 600 recorded for tc) it says so
    assert data["dead_window_tokens"] == 900 and data["training_dead_tokens"] == 10_000_000
    assert (
        "too few tokens to call latents dead" in data["dead_note"]
        and "900 held-out tokens" in data["dead_note"]
    )
    assert records["tc"]["data"]["dead_note"] == "dead: no firing in 900 held-out tokens"
    assert f"note: {data['dead_note']}" in table and "note: dead: no firing in 900 held-out tokens" in table
    # The transcoder: held-out FVU of mlp_out from mlp_in, recomputed independently in numpy.
    x, y = store.rows()
    with torch.no_grad():
        y_hat = tc.decode(tc.encode(x)).double().numpy()
    yn = y.double().numpy()
    want = ((yn - y_hat) ** 2).sum() / ((yn - yn.mean(0)) ** 2).sum()
    t = records["tc"]["metrics"]
    assert t["fvu"] == pytest.approx(want, rel=1e-5)
    assert math.isfinite(t["ce_recovered"]) and t["ce_zero_ablation"] > t["ce_clean"]
    assert t["ce_clean"] == pytest.approx(m["ce_clean"], rel=1e-9)


def test_eval_refuses_other_exclusion_rules(caches, tmp_path, capsys):
    identity_dict(576, HP).save_pretrained(tmp_path / "ident", {"cache": str(caches["train"])})
    rc = main(["eval", str(tmp_path / "ident"), "--cache", str(caches["other"]), "--splice_tokens", "0"])
    assert rc == 2
    assert "exclusion rules" in capsys.readouterr().err


def test_every_registered_architecture(caches):
    """Each architecture, at default settings and a small width, evaluates through the Dictionary interface: its
    held-out FVU and L0 equal a plain computation on the same rows, the splice metrics are finite."""
    x = ActivationStore(caches["train"], HP, batch_size=64).rows()
    dicts = {}
    for arch in available():
        cls, cfg_cls = lookup(arch)
        if cls.layered:  # multi-layer dictionaries read several hookpoints: tests/test_eval_replacement.py
            continue
        torch.manual_seed(0)
        d = build(cfg_cls(architecture=arch, hookpoint=HP, n_latents=128).resolved(576))
        d.init_from_data(x)
        dicts[arch] = d
    cfg = EvalConfig(
        cache=str(caches["test"]), max_tokens=500, splice_tokens=60, threads=1, mean_ablation=False
    )
    records = evaluate(cfg, dicts)
    assert [r["architecture"] for r in records] == list(dicts)
    y = torch.cat(
        [b for b, _ in ActivationStore(caches["test"], HP, batch_size=4096, loop=False, drop_last=False)]
    )
    y = y[:500].double()  # the rows evaluate() reads (the store's order, first max_tokens)
    for r, d in zip(records, dicts.values(), strict=True):
        with torch.no_grad():
            out = d.eval()(y.float())
        fvu = float((out.x_hat.double() - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert r["metrics"]["fvu"] == pytest.approx(fvu, rel=1e-4), r["architecture"]
        assert r["metrics"]["l0"] == pytest.approx(float((out.code.to_dense() != 0).sum(1).double().mean()))
        for key in ("dead_fraction", "ce_spliced", "ce_recovered", "kl"):
            assert math.isfinite(r["metrics"][key]), (r["architecture"], key)
        assert r["metrics"]["tokens"] == 500
