"""End to end on the real SmolLM2 and real corpus text: cache -> train -> eval -> save -> reload.

Runs the actual ``sparsedict quickstart`` command with fewer tokens (the shipped corpus sample, ~4k
training tokens) and checks what it reports and writes.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsedict.cache import ActivationStore
from sparsedict.cli import main
from sparsedict.dictionaries import from_pretrained

FVU_BOUND = 0.5  # a TopK SAE (k=32) after ~100 steps on ~4k tokens: far below 1 (predicting the mean)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--out_dir", str(out), "--cache.dataset", "embedded-sample",
               "--eval_cache.dataset", "embedded-sample", "--cache.max_tokens", "4000",
               "--eval_cache.max_tokens", "2000", "--train.epochs", "25", "--train.batch_size", "1000"])  # fmt: skip
    assert rc == 0
    report = capsys.readouterr().out
    assert "identical codes and reconstructions" in report
    ckpt = out / "train" / "topk-resid_post.6"
    config = json.loads((ckpt / "config.json").read_text())
    metrics = config["meta"]["eval"]
    assert metrics["tokens"] >= 1500
    assert metrics["fvu"] < FVU_BOUND, metrics
    assert 1 <= metrics["l0"] <= 32
    assert str(ckpt) in report and "FVU" in report
    browser = out / "inspect" / "index.html"  # the feature browser over the held-out cache
    assert f"browser         {browser.resolve()}" in report
    assert (out / "inspect" / "topk-resid_post.6" / "features" / "0.html").exists()
    # the saved dictionary reloads and reproduces its reported held-out FVU on the held-out cache
    model = from_pretrained(ckpt)
    store = ActivationStore(out / "cache-test", "resid_post.6", batch_size=512, loop=False, drop_last=False)
    xs = torch.cat([x for x, _ in store]).double()
    with torch.no_grad():
        x_hat = model.decode(model.encode(xs.float())).double()
    res = (xs - x_hat).pow(2).sum()
    tot = (xs - xs.mean(0)).pow(2).sum()
    assert abs(float(res / tot) - metrics["fvu"]) < 1e-4
