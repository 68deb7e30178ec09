"""Input normalisation: the constant c (``sqrt_d``: √d / E‖x‖; ``unit_msn``: 1 / √E‖x‖²) is estimated from the
init sample, training sees scaled inputs, and the exported checkpoint (c folded into the weights) gives on raw
activations exactly what the in-training model gives on scaled ones, scaled back. Also: b_dec initialisation."""

from __future__ import annotations

import pytest
import torch
from helpers import planted_data

from sparsedict.dictionaries import build, from_pretrained
from sparsedict.dictionaries.base import geometric_median
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.formats.native import read_config
from sparsedict.train import TensorSource, TrainConfig, Trainer

D, N_LAT, K = 32, 128, 4


def _data() -> torch.Tensor:
    x, _ = planted_data(d=D, n_atoms=96, k_active=K, n_rows=6000, offset=0.7, seed=3)
    return 40.0 * x  # far from unit scale, like residual streams (norms in the hundreds)


def _train(tmp_path, how: str, x: torch.Tensor, b_dec_init: str = "median"):
    torch.manual_seed(0)
    cfg = TopKConfig(d_in=D, n_latents=N_LAT, k=K, b_dec_init=b_dec_init, hookpoint="resid_post.0")
    model = build(cfg.resolved(D))
    tc = TrainConfig(batch_size=256, epochs=3, lr=3e-3, warmup_steps=5, normalise_inputs=how,
                     out_dir=str(tmp_path / how), log_every=1000, init_rows=4096, dead_tokens=3000)  # fmt: skip
    trainer = Trainer({"sae": model}, {(cfg.hookpoint, ""): TensorSource(x, batch_size=256)}, tc)
    trainer.fit(resume=False)
    return trainer, model


@pytest.mark.parametrize("how", ["sqrt_d", "unit_msn"])
def test_export_folds_scale_and_matches_in_training_outputs(tmp_path, how):
    x = _data()
    trainer, model = _train(tmp_path, how, x)
    c = float(model.input_scale)
    sample, _ = TensorSource(x, batch_size=256).sample(4096, seed=0)
    norms = sample.double().norm(dim=1)
    expected_c = D**0.5 / norms.mean() if how == "sqrt_d" else 1 / norms.pow(2).mean().sqrt()
    assert c == pytest.approx(float(expected_c), rel=1e-5)
    assert c < 0.2  # the data is far from unit scale: a missing fold would show

    probe = x[:512]
    model.eval()
    with torch.no_grad():
        ref = model(probe * c)  # what the trainer optimised: scaled inputs and targets
    path = trainer.save({"test": how})["sae"]
    loaded = from_pretrained(path)
    assert float(loaded.input_scale) == 1.0
    assert read_config(path)["meta"]["input_scale_folded"] == pytest.approx(c)
    with torch.no_grad():
        out = loaded(probe)  # raw activations
    assert torch.equal(out.code.indices, ref.code.indices)
    assert torch.allclose(out.code.values, ref.code.values, rtol=1e-4, atol=1e-5)  # latents unchanged
    assert torch.allclose(out.x_hat, ref.x_hat / c, rtol=1e-4, atol=1e-4 * float(probe.abs().mean()))
    # and it reconstructs raw activations well (trained, not only consistent)
    fvu = (out.x_hat - probe).pow(2).sum() / (probe - probe.mean(0)).pow(2).sum()
    assert fvu < 0.5


def test_in_memory_model_is_not_modified_by_export(tmp_path):
    trainer, model = _train(tmp_path, "sqrt_d", _data())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["median", "mean"])
def test_initialisation_per_methods(how):
    """W_enc = W_decᵀ, unit-norm decoder rows, b_dec from the geometric median / mean of the scaled sample."""
    x = _data()
    torch.manual_seed(0)
    cfg = TopKConfig(d_in=D, n_latents=N_LAT, k=K, b_dec_init=how, hookpoint="resid_post.0")
    model = build(cfg.resolved(D))
    assert torch.equal(model.W_enc, model.W_dec.T)
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(N_LAT), atol=1e-6)
    tc = TrainConfig(batch_size=256, normalise_inputs="sqrt_d", init_rows=2048, out_dir="unused")
    trainer = Trainer({"sae": model}, {(cfg.hookpoint, ""): TensorSource(x, batch_size=256)}, tc)
    trainer.initialise()
    c = float(model.input_scale)
    sample = TensorSource(x, batch_size=256).sample(2048, seed=0)[0].double() * c
    if how == "mean":
        expect = sample.mean(0)
    else:  # independent check of the geometric median: no point has a lower sum of distances nearby
        expect = geometric_median(sample, iters=500, eps=1e-12)
        cost = lambda m: (sample - m).norm(dim=1).sum()  # noqa: E731
        for _ in range(20):
            assert cost(expect) <= cost(expect + 1e-3 * torch.randn(D, dtype=torch.float64))
    assert torch.allclose(model.b_dec.double(), expect, atol=1e-4 * float(expect.norm()))
