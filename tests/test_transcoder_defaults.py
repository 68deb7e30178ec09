"""Transcoders and skip transcoders keep their latents alive with the package defaults (no LR given), on real
SmolLM2 activations (embedded model, shipped corpus sample): MLP input -> MLP output of block 6, whose
target is about eight times the input's scale.

Bound: at most 5 % of the latents dead at the end of training (no firing in the last ``DEAD_TOKENS``
training tokens). Measured here: 4.2 % (transcoder) and 1.7 % (skip transcoder); with the encoder left at
the input's scale 53 % and 35 %. At the recipes' size (4,608 latents, 390 steps): benchmarks/RESULTS.md.
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

HP, TARGET, TOKENS, HELD_OUT = "mlp_in.6", "mlp_out.6", 6000, 1500
DEAD_TOKENS = 4096
"""The dead window of these runs: 16 batches of 256 rows (a latent that fires in none of them is dead)."""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cache = small_cache(tmp_path_factory.mktemp("transcoder"), [HP, TARGET], TOKENS, context_length=64)
    x, y = ActivationStore(cache, HP, target=TARGET).rows()
    assert len(x) == TOKENS
    return (x[:-HELD_OUT], y[:-HELD_OUT]), (x[-HELD_OUT:], y[-HELD_OUT:])


def train_default(train, out_dir, skip: bool):
    torch.manual_seed(0)
    _, cfg_cls = lookup("topk")
    cfg = cfg_cls(hookpoint=HP, target=TARGET, expansion=2, k=16, skip=skip)
    model = build(cfg.resolved(train[0].shape[1], train[1].shape[1]))
    tc = TrainConfig(batch_size=256, epochs=16, dead_tokens=DEAD_TOKENS, log_every=10**9, out_dir=str(out_dir),
                     init_rows=len(train[0]))  # fmt: skip
    trainer = Trainer({"m": model}, {model.cfg.source_key: TensorSource(*train, batch_size=256)}, tc)
    trainer.fit(resume=False)
    return model, trainer.members[0].dead.dead_fraction()


def test_encoder_starts_in_the_targets_units(rows):
    """The first codes decode to the order of the target's residual, not of the input (8x smaller): within 4x."""
    (x, y), _ = rows
    assert (y.norm(dim=1).mean() / x.norm(dim=1).mean()) > 4, (
        "the workload must have input and target scales apart"
    )
    torch.manual_seed(0)
    _, cfg_cls = lookup("topk")
    model = build(cfg_cls(hookpoint=HP, target=TARGET, expansion=2, k=16).resolved(x.shape[1], y.shape[1]))
    model.init_from_data(x, y)
    with torch.no_grad():
        code = model.encode(x)
        ratio = float(
            (model.decode(code) - model.b_dec).norm(dim=1).mean() / (y - model.b_dec).norm(dim=1).mean()
        )
    assert 0.25 < ratio < 4, f"first reconstruction is {ratio:.3f} x the target residual's norm"


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_default_transcoder_keeps_latents_alive(rows, tmp_path, skip):
    train, (xt, yt) = rows
    model, dead = train_default(train, tmp_path, skip)
    held = reconstruction_stats(model, [(xt, yt)])
    assert dead <= 0.05, f"{dead:.1%} of the latents dead at the end of training (bound 5 %)"
    assert held.fvu < 0.7, (
        f"held-out FVU {held.fvu:.3f} (measured 0.60 and 0.50; one that learned nothing: 1)"
    )
