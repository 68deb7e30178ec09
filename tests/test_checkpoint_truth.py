"""What a checkpoint says about itself is true: the real ``sparsedict train`` on the shipped skip-transcoder
recipe (fewer tokens, the embedded corpus sample) records the model, the module paths, the data and the
exclusion rules; its model card shows the held-out metrics the run measured; the SAELens export names the
model; the run prints the optimiser settings each dictionary gets."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import make_dict

from sparsedict.cache.manifest import read_manifest
from sparsedict.cli import main
from sparsedict.dictionaries import from_pretrained
from sparsedict.formats.common import FormatError
from sparsedict.formats.modelcard import _fmt
from sparsedict.formats.saelens import save_saelens
from sparsedict.train.schedule import budget_lr

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m" / "skip_transcoder.yaml"
NAME = "skip_transcoder-mlp_in.6-to-mlp_out.6"


@pytest.mark.slow
def test_skip_transcoder_checkpoint_card_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(RECIPE), "--out_dir", str(out), "--cache.dataset", "embedded-sample",
               "--eval_cache.dataset", "embedded-sample", "--cache.max_tokens", "3000",
               "--eval_cache.max_tokens", "1500", "--train.epochs", "2", "--train.batch_size", "500",
               "--dictionaries.0.expansion", "2"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    # the recipe sets no LR: the 'auto' preset's run-length rule for this run's steps, batch and width
    said = re.search(
        rf"{re.escape(NAME)}: adam, lr (\S+) \('auto' run-length rule: (\d+) steps of 500, 1152 latents\), "
        r"W_dec lr (\S+) \(x2, 'auto' preset\), betas \(0\.8, 0\.99\) \('auto' preset\), warmup (\d+) steps",
        err,
    )
    assert said, f"no settings line for {NAME} in the run's output"
    steps = int(said[2])
    lr = budget_lr(1152, steps, 500)
    assert said[1] == f"{lr:.3g}" and said[3] == f"{2 * lr:.3g}"
    assert int(said[4]) == min(100, math.ceil(0.1 * steps))
    ckpt = next(p for p in out.rglob(NAME) if (p / "config.json").exists())
    config = json.loads((ckpt / "config.json").read_text())
    meta = config["meta"]
    manifest = read_manifest(meta["cache"])
    paths = {h: manifest["hookpoints"][h]["path"] for h in ("mlp_in.6", "mlp_out.6")}
    assert meta["model"] == "smollm2-135m" and meta["hookpoint_paths"] == paths
    assert meta["dataset"]["name"] == "embedded-sample" and meta["dataset"]["split"] == "train"
    assert meta["exclusions"]["rules"]["exclude_first_n"] == 2 and meta["dead_tokens"] == 100_000
    card = (ckpt / "README.md").read_text()
    for needle in ["| model | smollm2-135m", f"| input module | {paths['mlp_in.6']} |",
                   f"| target module | {paths['mlp_out.6']} |", "| subtracts b_dec before encoding | False |",
                   "| training data | embedded-sample (split train, contexts of 128 tokens) |",
                   f"| fvu | {meta['eval']['fvu']:.6g} |",
                   f"Measured on {_fmt(meta['eval']['tokens'])} held-out tokens of embedded-sample (split test).",
                   "too few tokens to call latents dead"]:  # fmt: skip
        assert needle in card, needle
    assert "No evaluation metrics" not in card and "not recorded" not in card.split("## Evaluation")[0]
    trained = from_pretrained(ckpt)
    with pytest.raises(FormatError, match="SAELens has no transcoder or skip variant of 'topk'"):
        save_saelens(trained, tmp_path / "refused")  # a TopK skip transcoder: SAELens has none
    relu = make_dict("relu", 576, 64, d_out=576, hookpoint="mlp_in.6", target="mlp_out.6", skip=True)
    relu.meta = trained.meta  # SAELens' skip_transcoder, with the provenance the run recorded
    with pytest.warns(UserWarning, match="ln2.hook_normalized"):
        exported = save_saelens(relu, tmp_path / "saelens")
    sl = json.loads((exported / "cfg.json").read_text())["metadata"]
    assert sl["model_name"] == "smollm2-135m" and sl["hf_hook_name"] == paths["mlp_in.6"]
    assert sl["hf_hook_name_out"] == paths["mlp_out.6"] and sl["dataset_path"] == "embedded-sample"
    assert sl["context_size"] == 128


def test_model_card_states_the_recorded_provenance():
    """The card's rows come from ``meta``: model and revision, module paths, training data, eval data; a
    transcoder never claims to subtract b_dec."""
    from sparsedict.formats.modelcard import render

    config = {
        "architecture": "topk",
        "dictionary": {
            "hookpoint": "mlp_in.6",
            "target": "mlp_out.6",
            "d_in": 576,
            "d_out": 576,
            "n_latents": 64,
            "k": 4,
            "apply_b_dec_to_input": True,
        },
        "sparsity_fields": ["k"],
        "meta": {
            "model": "HuggingFaceTB/SmolLM2-135M",
            "model_revision": "abc123",
            "hookpoint_paths": {"mlp_in.6": "model.layers.6.mlp:in", "mlp_out.6": "model.layers.6.mlp"},
            "dataset": {"name": "HuggingFaceFW/fineweb", "config": "sample-10BT", "split": "train"},
            "context_length": 1024,
            "training_tokens": 1000,
            "eval": {
                "fvu": 0.25,
                "l0": 4.0,
                "tokens": 20_000,
                "dataset": {"name": "embedded", "split": "test"},
                "dead_note": "dead: no firing in 20,000 held-out tokens",
                "cache": "/x",
            },
        },
    }
    card = render(config)
    for row in ["| model | HuggingFaceTB/SmolLM2-135M (revision abc123) |", "| input module | model.layers.6.mlp:in |",
                "| target module | model.layers.6.mlp |", "| subtracts b_dec before encoding | False |",
                "| training data | HuggingFaceFW/fineweb (sample-10BT, split train, contexts of 1024 tokens) |",
                "| fvu | 0.25 |", "Measured on 20,000 held-out tokens of embedded (split test).",
                "dead_fraction: dead: no firing in 20,000 held-out tokens."]:  # fmt: skip
        assert row in card, row
    assert "| dataset |" not in card and "| dead_note |" not in card and "| cache |" not in card


def test_package_facade_and_documented_paths_exist():
    """Stale bits: ``sparsedict.train`` and ``from sparsedict import *`` resolve; every recipe path the docs
    name exists."""
    import re

    import sparsedict

    assert sparsedict.train.Trainer is sparsedict.Trainer
    namespace: dict = {}
    exec("from sparsedict import *", namespace)
    assert {"Trainer", "TrainConfig", "from_pretrained"} <= set(namespace)
    root = RECIPE.parents[2]
    docs = [root / "README.md", root / "recipes" / "README.md", *sorted((root / "docs").rglob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"recipes/[\w.-]+/[\w.-]+\.yaml", doc.read_text())}
    assert named and not [p for p in sorted(named) if not (root / p).exists()]
