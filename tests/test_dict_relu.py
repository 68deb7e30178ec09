"""ReLU + decoder-norm-weighted L1: loss terms, warmup, init, the 'auto' preset, planted recovery, and the
multi-dictionary sweep (one Trainer, shared batches == each trained alone). Save/load: test_dict_registry.py."""

from __future__ import annotations

import pytest
import torch
from helpers import make_dict, mean_max_cosine, planted_data, train_dictionary

from sparsedict.dictionaries import build
from sparsedict.dictionaries.relu import ReLUConfig
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.train import TrainConfig
from sparsedict.train.optim import DictionaryOptimizer
from sparsedict.train.schedule import budget_lr

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: thread barriers dominate on a shared machine


def make(d=16, n=40, **kw):
    return make_dict("relu", d, n, **kw)


def test_init_and_no_unit_norm():
    m = make()
    assert m.unit_norm_decoder is False
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.full((40,), 0.1))
    torch.testing.assert_close(m.W_enc, m.W_dec.T)
    assert float(m.b_enc.abs().sum()) == 0 and float(m.b_dec.abs().sum()) == 0


def test_l1_term_equals_hand_computation_and_warmup():
    m = make(l1_coefficient=3.0, l1_warmup_steps=10)
    with torch.no_grad():
        m.W_dec.mul_(torch.linspace(0.5, 3.0, 40)[:, None])  # unequal row norms
        m.b_dec.normal_()
        m.b_enc.normal_()
    x = torch.randn(32, 16)
    m.on_step(4, 100)  # 5/10 of the way through warmup
    out = m(x)
    f = torch.relu((x - m.b_dec) @ m.W_enc + m.b_enc)
    l1_ref = (
        3.0 * 0.5 * sum(float(f[b, i]) * float(m.W_dec[i].norm()) for b in range(32) for i in range(40)) / 32
    )
    assert abs(float(out.losses["l1"]) - l1_ref) < 1e-4 * l1_ref
    x_hat = f @ m.W_dec + m.b_dec
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.losses["mse"], (x - x_hat).pow(2).sum(1).mean())
    m.on_step(0, 100)
    assert abs(m.l1_current - 0.3) < 1e-9
    m.on_step(50, 100)
    assert m.l1_current == 3.0
    m2 = make(l1_warmup_steps=-1)  # default: 5% of the run
    m2.on_step(9, 400)
    assert abs(m2.l1_current - 5.0 * 10 / 20) < 1e-9


def test_apply_b_dec_flag():
    m = make(apply_b_dec_to_input=False)
    with torch.no_grad():
        m.b_dec.normal_()
    x = torch.randn(8, 16)
    torch.testing.assert_close(m.encode(x).values, torch.relu(x @ m.W_enc + m.b_enc))


def test_planted_recovery(tmp_path):
    """Threshold 0.95 mean max |cos| over the 256 true atoms (d=64, 6 active, noise 0.01)."""
    x, atoms = planted_data(d=64, n_atoms=256, k_active=6, n_rows=40_000, seed=0)
    torch.manual_seed(0)
    # λ = 2, not the default 5: λ soft-thresholds a coefficient c to c − λ/2, and the planted coefficients
    # are U(0.7, 3.6) after the sqrt_d scaling (measurements: benchmarks/RESULTS_defaults.md).
    m = build(ReLUConfig(d_in=64, n_latents=512, l1_coefficient=2.0).resolved(64))
    start = mean_max_cosine(m.W_dec, atoms)
    assert start < 0.5, f"the initial decoder already matches the atoms ({start:.3f}): seed leak"
    # the package defaults otherwise (lr=0, warmup_steps=-1: the 'auto' preset; 937 steps is past the run-length
    # rule, so the width rule's 1.13e-3, warmup 94): 0.995 / 0.993 / 0.993 on data seeds 0 / 2 / 3
    train_dictionary(m, x, epochs=6, lr=0, warmup_steps=-1, normalise_inputs="sqrt_d", out_dir=str(tmp_path))
    score = mean_max_cosine(m.W_dec, atoms)
    assert score >= 0.95, f"mean max cosine {score:.3f} < 0.95"


def test_sweep_in_one_pass_equals_separate_runs(tmp_path):
    """Three dictionaries sharing one Trainer / one data pass end with the same weights as three
    runs of one dictionary each (same seed, same batches)."""
    x, _ = planted_data(d=32, n_atoms=64, k_active=4, n_rows=4096, seed=1)
    cfgs = {
        "topk4": TopKConfig(d_in=32, n_latents=96, k=4),
        "topk8": TopKConfig(d_in=32, n_latents=96, k=8),
        "relu": ReLUConfig(d_in=32, n_latents=96, l1_coefficient=1.0),
    }

    def fresh(name):
        torch.manual_seed(123)
        return build(cfgs[name].resolved(32))

    kw = dict(batch_size=128, epochs=2, lr=2e-3, normalise_inputs="sqrt_d", warmup_steps=5, dead_tokens=512)
    together = {name: fresh(name) for name in cfgs}
    from sparsedict.train import TensorSource, TrainConfig, Trainer

    tc = TrainConfig(out_dir=str(tmp_path / "all"), log_every=10**9, init_rows=2048, **kw)
    Trainer(together, {("", ""): TensorSource(x, batch_size=128)}, tc).fit(resume=False)
    for name in cfgs:
        alone = fresh(name)
        train_dictionary(alone, x, out_dir=str(tmp_path / name), init_rows=2048, **kw)
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(
                together[name].state_dict()[key], value, atol=0, rtol=0, msg=f"{name}.{key}"
            )
        assert not torch.equal(alone.W_dec, fresh(name).W_dec)  # it did train


def test_auto_preset_is_two_thirds_of_the_run_length_rule():
    """``optimizer='auto'`` (the default) gives ReLU, Gated and JumpReLU two thirds of the run-length LR and a
    warmup capped at 10 % of the run."""
    for arch in ("relu", "gated", "jumprelu"):
        opt = DictionaryOptimizer(make_dict(arch, 16, 64), TrainConfig(), 50)
        assert opt.base_lr == pytest.approx(budget_lr(64, 50) * 2 / 3, rel=1e-12), arch
        assert opt.warmup_steps == 5, arch
        assert "'auto' run-length rule x 0.667: 50 steps" in opt.describe(), arch
