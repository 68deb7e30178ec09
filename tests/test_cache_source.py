"""The data-source protocol: ActivationStore, LiveSource and TensorSource all satisfy ``Source`` and behave alike
(sample shapes, the same sample for the same seed, exact resume from ``state_dict``); the Trainer initialises
and trains on a LiveSource straight from the real SmolLM2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import make_dict

from sparsedict.cache import ActivationStore, CacheConfig, LiveSource, cache_activations
from sparsedict.cache.source import Source
from sparsedict.train import TensorSource, TrainConfig, Trainer

HP, TARGET = "resid_post.3", "mlp_out.3"
ROWS = 600


def _config(out_dir, max_tokens=ROWS) -> CacheConfig:
    return CacheConfig(dataset="embedded-sample", hookpoints=[HP, TARGET], max_tokens=max_tokens, context_length=48,
                       shard_rows=200, out_dir=str(out_dir), progress=False, num_threads=1)  # fmt: skip


@pytest.fixture(scope="module")
def cache_cfg(tmp_path_factory) -> CacheConfig:
    cfg = _config(tmp_path_factory.mktemp("source"))
    cache_activations(cfg)
    return cfg


@pytest.fixture(params=["store", "live", "tensor"])
def make_source(request, cache_cfg, smollm2):
    """``make(target: bool) -> Source`` of one kind, over the same rows."""
    model, tok = smollm2

    def make(target: bool):
        kw = dict(target=TARGET if target else None, batch_size=64, seed=3)
        if request.param == "store":
            return ActivationStore(cache_cfg.out_dir, HP, **kw)
        if request.param == "live":
            return LiveSource(cache_cfg, HP, shuffle_buffer_rows=256, model=model, tokenizer=tok, **kw)
        store = ActivationStore(cache_cfg.out_dir, HP, target=kw["target"])
        x, y = store.rows() if target else (store.rows(), None)
        return TensorSource(x, y, batch_size=64, seed=3)

    return make


@pytest.mark.parametrize("target", [False, True], ids=["sae", "transcoder"])
def test_every_source_satisfies_the_protocol(make_source, target):
    src = make_source(target)
    assert isinstance(src, Source)
    assert (src.d_in, src.d_out, src.n_rows, src.world_size) == (576, 576 if target else None, ROWS, 1)
    assert isinstance(src.meta, dict)

    x, y = src.sample(100, seed=5)
    assert x.shape == (100, 576) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert (y is None) if not target else (y.shape == (100, 576))
    x2, y2 = src.sample(100, seed=5)
    assert torch.equal(x, x2) and (y is None or torch.equal(y, y2))
    assert not torch.equal(src.sample(100, seed=6)[0], x)
    assert len({r.numpy().tobytes() for r in x}) == 100, "a sample repeats rows"
    big, _ = src.sample(10 * ROWS, seed=0)
    assert big.shape[0] == ROWS  # at most every row once

    it = iter(src)
    first = [next(it) for _ in range(3)]
    assert all(b[0].shape == (64, 576) and (b[1] is None) != target for b in first)
    state = src.state_dict()
    expected = [next(it) for _ in range(4)]  # crosses the epoch end (600 rows = 9 batches)... after 7
    again = make_source(target)
    again.load_state_dict(state)
    got = list(itertools.islice(iter(again), 4))
    for (xa, ya), (xb, yb) in zip(expected, got, strict=True):
        assert torch.equal(xa, xb) and (ya is None or torch.equal(ya, yb))


def test_live_source_samples_without_a_known_length(smollm2, tmp_path):
    model, tok = smollm2
    live = LiveSource(_config(tmp_path, max_tokens=None), HP, batch_size=32, model=model, tokenizer=tok)
    assert live.n_rows is None
    x, y = live.sample(150, seed=0)
    assert x.shape == (150, 576) and y is None and torch.equal(live.sample(150, seed=0)[0], x)
    cfg = TrainConfig(batch_size=32, out_dir=str(tmp_path / "t"), log_every=1)
    with pytest.raises(ValueError, match=r"no known length.*max_steps"):
        Trainer({"m": make_dict("topk", 576, 1024, k=8, hookpoint=HP)}, {(HP, ""): live}, cfg)


def test_trainer_initialises_and_trains_on_a_live_source(smollm2, cache_cfg, tmp_path):
    model, tok = smollm2
    live = LiveSource(cache_cfg, HP, batch_size=64, shuffle_buffer_rows=256, model=model, tokenizer=tok)
    sae = make_dict("topk", 576, 1024, k=8, hookpoint=HP, b_dec_init="mean")
    cfg = TrainConfig(batch_size=64, max_steps=4, init_rows=300, out_dir=str(tmp_path), log_every=2,
                      normalise_inputs="sqrt_d")  # fmt: skip
    trainer = Trainer({"m": sae}, {(HP, ""): live}, cfg)
    trainer.initialise()
    x, _ = live.sample(300, seed=0)  # what initialise() reads: init_rows rows, the run's seed
    assert float(sae.input_scale) == pytest.approx(576**0.5 / float(x.norm(dim=1).mean()), rel=1e-5)
    torch.testing.assert_close(sae.b_dec, x.mean(0) * float(sae.input_scale), rtol=1e-5, atol=1e-5)
    last = trainer.fit(resume=False)
    assert trainer.step == 4 and trainer.tokens == 4 * 64
    assert math.isfinite(last["m/loss"]) and last["m/fvu"] > 0 and 0 < last["m/l0"] <= 8
