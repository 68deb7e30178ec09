"""`sparsedict bench pareto` end to end on a small real cache (embedded SmolLM2, shipped corpus sample)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparsedict.cli import main
from sparsedict.sweep import parse_sweep


def test_parse_sweep_and_errors():
    assert parse_sweep("topk:k=8,16;aux_alpha=0") == [
        ("topk", {"k": 8, "aux_alpha": 0}),
        ("topk", {"k": 16, "aux_alpha": 0}),
    ]
    with pytest.raises(ValueError, match="no config field 'kk'"):
        parse_sweep("topk:kk=8")
    with pytest.raises(KeyError, match="unknown architecture"):
        parse_sweep("topkk:k=8")
    with pytest.raises(ValueError, match="must look like"):
        parse_sweep("topk")


@pytest.mark.usefixtures("one_thread")  # shared 2-core machine: one thread is much faster under contention
def test_pareto_end_to_end(tmp_path):
    from sparsedict.cache import ActivationStore
    from sparsedict.dictionaries import from_pretrained

    out = tmp_path / "pareto"
    argv = ["bench", "pareto", "--cache.hookpoints", "resid_post.3", "--cache.dataset", "embedded-sample",
            "--cache.max_tokens", "2000", "--cache.context_length", "64", "--cache.num_threads", "1",
            "--sweep", "topk:k=4,16", "relu:l1_coefficient=1,10", "--expansion", "2",
            "--train.batch_size", "256", "--train.max_steps", "12", "--train.threads", "1",
            "--eval.max_tokens", "1500", "--eval.splice_tokens", "128", "--eval.threads", "1",
            "--out_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    png = out / "pareto.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "pareto.json").read_text())
    points = {p["name"]: p for p in result["points"]}
    assert set(points) == {"topk-k4", "topk-k16", "relu-l1_coefficient1", "relu-l1_coefficient10"}
    assert result["train"]["steps"] == 12 and result["train"]["dictionaries"] == 4
    for p in points.values():
        for key in ("l0", "fvu", "ce_recovered", "ce_clean", "ce_spliced", "kl", "dead_fraction"):
            assert math.isfinite(p[key]), (p["name"], key)
        assert 0.0 < p["fvu"] < 2.0
    assert 0 < points["topk-k4"]["l0"] <= 4 and 4 < points["topk-k16"]["l0"] <= 16
    # One clean pass is shared: the same clean CE for every point.
    assert len({round(p["ce_clean"], 9) for p in points.values()}) == 1
    # Independent recomputation of one point's FVU and L0 on the held-out rows, in numpy.
    p = points["topk-k16"]
    model = from_pretrained(p["checkpoint"])
    store = ActivationStore(result["eval"]["cache"], "resid_post.3", batch_size=256)
    assert result["eval"]["recon_tokens"] == store.n_rows == p["tokens"]
    x = store.rows()
    with torch.no_grad():
        code = model.encode(x)
        x_hat = model.decode(code).numpy().astype(np.float64)
    xn = x.numpy().astype(np.float64)
    fvu = ((xn - x_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert p["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert p["l0"] == pytest.approx(float((code.values != 0).sum(1).double().mean()), rel=1e-9)
