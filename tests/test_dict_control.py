"""The L0 controller of ReLU, Gated and JumpReLU (``l0_target``): its update against a hand computation, the freeze,
the data-driven sparse start, the final calibration of the firing threshold, and an exact resume of a steered run
through the real Trainer's checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_dict, planted_data

from sparsedict.dictionaries.control import L0Controller
from sparsedict.train import TensorSource, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _code(l0s: list[int], n: int = 50) -> torch.Tensor:
    """A dense code whose rows have the given numbers of nonzeros."""
    v = torch.zeros(len(l0s), n)
    for i, k in enumerate(l0s):
        v[i, :k] = 1.0
    return v


def test_controller_step_is_the_damped_log_error_step_and_freezes():
    c = L0Controller(target=8, coefficient=2.0, k_i=0.1, k_p=0.4, freeze_fraction=0.5, max_step=0.3)
    c.update(_code([16, 16]), step=0, total_steps=10)  # e1 = log 2, no previous error: k_i·e1
    assert c.coefficient == pytest.approx(2.0 * math.exp(0.1 * math.log(2)), rel=1e-12)
    c.update(_code([4, 12]), step=1, total_steps=10)  # mean L0 8: e2 = 0, step k_p·(0 − log 2) = −0.28
    assert c.coefficient == pytest.approx(2.0 * math.exp(0.1 * math.log(2) - 0.4 * math.log(2)), rel=1e-12)
    before = c.coefficient
    c.update(_code([50, 50]), step=2, total_steps=10)  # e = log 6.25: k_i·e + k_p·e = 0.92, clipped to 0.3
    assert c.coefficient == pytest.approx(before * math.exp(0.3), rel=1e-12)
    frozen = c.coefficient
    for step in (5, 6, 9):  # int(0.5 · 10) = 5: frozen from there on
        c.update(_code([50, 50]), step=step, total_steps=10)
    assert c.coefficient == frozen
    state = c.state_dict()
    again = L0Controller(target=8, coefficient=1.0, k_i=0.1, k_p=0.4, freeze_fraction=0.5, max_step=0.3)
    again.load_state_dict(state)
    assert again.coefficient == frozen and again.last_error == c.last_error


def test_integral_gain_shrinks_with_the_run_length_past_gain_steps():
    for total, scale in ((50, 1.0), (100, 1.0), (400, 0.25)):  # gain_steps 100: k_i · min(1, 100 / total)
        c = L0Controller(
            target=8, coefficient=2.0, k_i=0.1, k_p=0.4, freeze_fraction=1.0, max_step=1.0, gain_steps=100
        )
        # e = log 2 and no previous error: the integral step alone
        c.update(_code([16, 16]), step=0, total_steps=total)
        assert c.coefficient == pytest.approx(2.0 * math.exp(scale * 0.1 * math.log(2)), rel=1e-12)
        c.update(_code([4, 12]), step=1, total_steps=total)  # e = 0: the damping term is not scaled
        assert c.coefficient == pytest.approx(2.0 * math.exp((scale * 0.1 - 0.4) * math.log(2)), rel=1e-12)
    for arch in ("relu", "gated"):  # their defaults scale the gain; JumpReLU's does not
        m = make_dict(arch, l0_target=8)
        assert m.l0_controller.gain_steps == m.cfg.l0_control_steps > 0
    assert make_dict("jumprelu", l0_target=8).l0_controller.gain_steps == 0


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_steered_coefficient_rises_when_l0_is_too_high(arch):
    torch.manual_seed(0)
    x, _ = planted_data(d=16, n_atoms=40, k_active=3, n_rows=2048)
    model = make_dict(arch, d_in=16, n_latents=64, l0_target=2.0, l0_control_gain=0.2, l0_control_damping=0.0,
                      threshold_init_l0=0)  # fmt: skip
    start = model.l1_current
    trainer = Trainer({"m": model}, {model.cfg.source_key: TensorSource(x, batch_size=256)},
                      TrainConfig(max_steps=8, lr=1e-3, normalise_inputs="sqrt_d", log_every=10**9,
                                  out_dir="/tmp/unused", init_rows=2048))  # fmt: skip
    trainer.initialise()
    it = iter(trainer.sources[model.cfg.source_key])
    for _ in range(8):
        trainer.train_step({model.cfg.source_key: next(it)})
    # A fresh ReLU/Gated fires on far more than 2 of 64 latents (and a small LR keeps it so): every step until the freeze at
    # int(0.8 · 8) = 6 raises log λ by the largest step (0.1); the coefficient in use follows it.
    assert model.l0_controller.coefficient == pytest.approx(start * math.exp(6 * 0.1), rel=1e-9)
    assert model.l1_current == pytest.approx(model.l0_controller.coefficient, rel=1e-12)


def _l0(model, x: torch.Tensor) -> float:
    return float((model.encode(x).values != 0).sum(-1).float().mean())


@pytest.mark.parametrize("arch, factor", [("relu", 4), ("gated", 1), ("jumprelu", 1)])
def test_sparse_start_fires_each_latent_on_the_same_fraction(arch, factor):
    """With l0_target, init_from_data shifts each latent's firing threshold to the quantile of its pre-activations on
    the sample that makes it fire on (factor · l0_target) / n of the rows: ReLU at 4 x the target, the others at it."""
    x = torch.randn(1000, 16) + 0.3
    m = make_dict(arch, d_in=16, n_latents=40, l0_target=2.0)
    m.init_from_data(x)
    with torch.no_grad():
        fires = (m.encode(x).values != 0).float().mean(0)
    assert float((fires - factor * 2.0 / 40).abs().max()) <= 1e-3, fires
    off = make_dict(arch, d_in=16, n_latents=40, l0_target=2.0, threshold_init_l0=0)
    off.init_from_data(x)
    with torch.no_grad():
        assert _l0(off, x) > 2 * factor * 2.0  # without the sparse start far more fire


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_calibration_sets_the_mean_l0_of_the_batches_to_the_target(arch):
    """calibrate_l0 gives its batches exactly target·N firings in all (N rows)."""
    torch.manual_seed(0)
    m = make_dict(arch, d_in=16, n_latents=64, l0_target=5.0, threshold_init_l0=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(256, 16)
    with torch.no_grad():
        assert abs(_l0(m, x) - 5.0) > 3  # far from the target before
        m.calibrate_l0([x])
        assert _l0(m, x) == 5.0
        for target in (2.0, 20.0):  # down and up again
            m.l0_controller.target = target
            m.calibrate_l0([x[:100], x[100:]])  # pooled over the batches: exact on their union
            assert _l0(m, x) == target


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_steered_run_ends_calibrated_on_its_last_batches(arch):
    """Through the real Trainer: at the last step the threshold is calibrated on the frozen phase's batches (the
    last ``l0_calibration_rows`` rows), so their mean L0 under the final weights is the target; 0 turns it off.
    (JumpReLU here needs θ lowered below 0 for some latents: the clamp at 0 is accounted for.)"""
    x, _ = planted_data(d=16, n_atoms=40, k_active=3, n_rows=2048)
    l0s = {}
    for rows in (512, 0):
        model = make_dict(arch, d_in=16, n_latents=64, l0_target=3.0, l0_calibration_rows=rows)
        trainer = Trainer({"m": model}, {model.cfg.source_key: TensorSource(x, batch_size=256)},
                          TrainConfig(max_steps=10, batch_size=256, normalise_inputs="sqrt_d", log_every=10**9,
                                      out_dir="/tmp/unused", init_rows=2048))  # fmt: skip
        trainer.initialise()
        it = iter(trainer.sources[model.cfg.source_key])
        batches = [next(it) for _ in range(10)]
        for batch in batches:
            trainer.train_step({model.cfg.source_key: batch})
        model.eval()
        c = float(model.input_scale)
        last = torch.cat([b[0] for b in batches[-2:]]) * c  # the frozen phase: steps 8, 9 (int(0.8 · 10) = 8)
        with torch.no_grad():
            l0s[rows] = _l0(model, last)
    assert l0s[512] == 3.0, l0s
    assert abs(l0s[0] - 3.0) > 0.5, l0s


class _StopAt(Trainer):
    """A Trainer that asks to stop (as SIGTERM does) after ``stop_at`` steps: it checkpoints and exits."""

    stop_at = 0

    def train_step(self, batches):
        out = super().train_step(batches)
        if self.step == self.stop_at:
            self._stop = True
        return out


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_steered_run_resumes_exactly(tmp_path, arch):
    x, _ = planted_data(d=16, n_atoms=40, k_active=3, n_rows=4096)

    def trainer(out, cls=Trainer):
        torch.manual_seed(0)
        model = make_dict(arch, d_in=16, n_latents=48, l0_target=4.0)
        cfg = TrainConfig(batch_size=128, max_steps=40, normalise_inputs="sqrt_d", log_every=10**9,
                          out_dir=str(out), init_rows=4096)  # fmt: skip
        return cls({"m": model}, {model.cfg.source_key: TensorSource(x, batch_size=128, seed=1)}, cfg), model

    ref, ref_model = trainer(tmp_path / "ref")
    ref.fit(resume=False)
    _StopAt.stop_at = 17  # before the freeze at int(0.8 · 40) = 32: the controller state matters
    first, _ = trainer(tmp_path / "cut", _StopAt)
    with pytest.raises(SystemExit, match="stopped by SIGTERM at step 17"):
        first.fit(resume=False)
    second, model = trainer(tmp_path / "cut")
    second.fit(resume=True)
    assert model.l0_controller.coefficient == ref_model.l0_controller.coefficient
    assert model.l0_controller.last_error == ref_model.l0_controller.last_error
    for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(p, q), name
