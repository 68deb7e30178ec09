"""Every SAE architecture lands its sparsity target with the package defaults (no LR, no coefficient given), on
real SmolLM2 activations (embedded model, shipped corpus sample), measured on held-out rows.

TopK, BatchTopK and Matryoshka get ``k``; ReLU, Gated and JumpReLU get ``l0_target`` (the coefficient is steered,
then frozen, and the firing threshold calibrated at the end). Tolerance: held-out L0 within 10 % of the target, the
bound the defaults are stated to meet. The FVU bound only says the dictionary learned something (a dictionary that
outputs b_dec has FVU 1). Every run is 3 epochs over 12,000 rows (140 steps; at one epoch TopK's held-out L0 is
13.4, some of its k activations still 0). A run that repeats its rows holds 1,200 of them out of training
(``TrainConfig.calibration_rows``) and sets BatchTopK/Matryoshka's θ and the ReLU family's final L0 on them: rows
trained on fire fewer latents than new ones, and without the held-out rows ReLU's held-out L0 ends 20-30 % above
its target (the control below). Measurements: benchmarks/RESULTS_defaults.md.
"""

from __future__ import annotations

import pytest
import torch
from helpers import small_cache

from sparsedict.cache import ActivationStore
from sparsedict.dictionaries import build, lookup
from sparsedict.eval.heldout import reconstruction_stats
from sparsedict.train import TensorSource, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

HP, TOKENS, HELD_OUT, TARGET = "resid_post.3", 14_000, 2000, 16
TOLERANCE = 0.1
"""Held-out L0 within this fraction of the target."""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cache = small_cache(tmp_path_factory.mktemp("defaults"), [HP], TOKENS, context_length=64)
    x = ActivationStore(cache, HP).rows()
    assert len(x) == TOKENS
    # rows in a fixed random order: the held-out rows are unseen tokens of the same documents, not the last
    # documents of a small corpus slice (whose activation statistics differ by more than the tolerance)
    x = x[torch.randperm(TOKENS, generator=torch.Generator().manual_seed(0))]
    return x[:-HELD_OUT], x[-HELD_OUT:]


@pytest.mark.parametrize(
    "arch, fields, epochs",
    [
        ("topk", {"k": TARGET}, 3),
        ("batchtopk", {"k": TARGET}, 3),
        ("matryoshka", {"k": TARGET}, 3),
        ("relu", {"l0_target": TARGET}, 3),
        ("gated", {"l0_target": TARGET}, 3),
        ("jumprelu", {"l0_target": TARGET}, 3),
    ],
)
def test_default_lands_the_target_l0(rows, tmp_path, arch, fields, epochs):
    """12,000 training rows x ``epochs`` (of 256 rows a step), n = 1152, then 2,000 held-out rows."""
    train, test = rows
    torch.manual_seed(0)
    _, cfg_cls = lookup(arch)
    model = build(cfg_cls(hookpoint=HP, expansion=2, **fields).resolved(train.shape[1]))
    cfg = TrainConfig(batch_size=256, epochs=epochs, log_every=10**9, out_dir=str(tmp_path), init_rows=8192)
    trainer = Trainer({arch: model}, {model.cfg.source_key: TensorSource(train, batch_size=256)}, cfg)
    assert [len(x) for x, _ in trainer.held.values()] == ([1200] if model.calibrates else [])
    trainer.fit(resume=False)
    held = reconstruction_stats(model, [(test, None)])
    assert abs(held.l0 - TARGET) <= TOLERANCE * TARGET, f"{arch}: held-out L0 {held.l0:.2f}, target {TARGET}"
    assert held.fvu < 0.5, f"{arch}: held-out FVU {held.fvu:.3f}"


def test_calibration_on_trained_rows_overshoots(rows, tmp_path):
    """The control: the same ReLU run with no rows held out (``calibration_rows=0``) calibrates on rows it trained
    on, and its held-out L0 misses the target by more than the tolerance; one pass holds none out by default."""
    train, test = rows
    results = {}
    for calibration_rows, epochs in ((0, 3), (-1, 1)):
        torch.manual_seed(0)
        model = build(lookup("relu")[1](hookpoint=HP, expansion=2, l0_target=TARGET).resolved(train.shape[1]))
        cfg = TrainConfig(batch_size=256, epochs=epochs, log_every=10**9, out_dir=str(tmp_path / str(epochs)),
                          init_rows=8192, calibration_rows=calibration_rows)  # fmt: skip
        trainer = Trainer({"relu": model}, {model.cfg.source_key: TensorSource(train, batch_size=256)}, cfg)
        assert trainer.held == {}
        trainer.fit(resume=False)
        results[epochs] = reconstruction_stats(model, [(test, None)]).l0
    assert results[3] > (1 + TOLERANCE) * TARGET, (
        f"held-out L0 {results[3]:.2f}: the control no longer overshoots"
    )
    assert abs(results[1] - TARGET) <= TOLERANCE * TARGET, f"one pass: held-out L0 {results[1]:.2f}"
