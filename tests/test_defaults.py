"""Every architecture lands its sparsity target with the package defaults (no LR, no coefficient given), on real
SmolLM2 activations (embedded model, shipped corpus sample), measured on held-out rows.

Gated and JumpReLU get ``l0_target`` (the coefficient is steered, then frozen). Tolerance: held-out L0 within
10 % of the target (the bound the defaults are stated to meet). ReLU, BatchTopK and Matryoshka do not meet it
on this workload yet (held-out L0 25.6 / 20.4 / 20.2 for 16), so they are not listed; the measurements are in
benchmarks/RESULTS_defaults.md.
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

HP, TOKENS, HELD_OUT, TARGET = "resid_post.3", 6000, 1500, 16


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cache = small_cache(tmp_path_factory.mktemp("defaults"), [HP], TOKENS, context_length=64)
    x = ActivationStore(cache, HP).rows()
    assert len(x) == TOKENS
    return x[:-HELD_OUT], x[-HELD_OUT:]


@pytest.mark.parametrize(
    "arch, fields",
    [
        ("gated", {"l0_target": TARGET}),
        ("jumprelu", {"l0_target": TARGET}),
    ],
)
def test_default_lands_the_target_l0(rows, tmp_path, arch, fields):
    train, test = rows
    torch.manual_seed(0)
    _, cfg_cls = lookup(arch)
    model = build(cfg_cls(hookpoint=HP, expansion=2, **fields).resolved(train.shape[1]))
    cfg = TrainConfig(batch_size=256, epochs=8, log_every=10**9, out_dir=str(tmp_path), init_rows=len(train))
    Trainer({arch: model}, {model.cfg.source_key: TensorSource(train, batch_size=256)}, cfg).fit(resume=False)
    held = reconstruction_stats(model, [(test, None)])
    assert abs(held.l0 - TARGET) <= 0.1 * TARGET, f"{arch}: held-out L0 {held.l0:.2f}, target {TARGET}"
    assert held.fvu < 0.5, f"{arch}: held-out FVU {held.fvu:.3f}"
