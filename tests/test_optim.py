"""Optimisers of the trainer: fused vs unfused decoder-normalised Adam, Adam's bias correction, the
schedule-free sign-SGD against a hand-written recurrence, eval()/train() swaps, width-rule LR, schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_helpers import err_ratio
from torch import nn

from sparsedict.dictionaries import build
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.train import TrainConfig
from sparsedict.train.optim import DictionaryOptimizer
from sparsedict.train.schedule import lr_factor, width_lr


def _topk(seed: int = 0, d: int = 24, n: int = 96):
    torch.manual_seed(seed)
    model = build(TopKConfig(d_in=d, n_latents=n, k=4, aux_alpha=0).resolved(d))
    with torch.no_grad():
        model.b_dec.normal_()
    return model


def _grads(model, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    sum(out.losses.values()).backward()


def _run(fused: bool, steps: int = 6, **cfg) -> tuple[nn.Module, DictionaryOptimizer]:
    model = _topk()
    opt = DictionaryOptimizer(
        model,
        TrainConfig(**{"optimizer": "adam", "lr": 1e-2, "warmup_steps": 2, **cfg}),
        total_steps=steps,
        fused=fused,
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.set_step(step)
        _grads(model, torch.randn(64, 24, generator=gen) + 1.0)
        opt.step()
    return model, opt


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fused_decoder_adam_equals_unfused_sequence(clip):
    """normalised_adam_step for W_dec == project -> torch Adam -> renormalise, over several steps."""
    fused_model, fused_opt = _run(True, grad_clip=clip)
    plain_model, plain_opt = _run(False, grad_clip=clip)
    assert fused_opt.fused_param is fused_model.W_dec and plain_opt.fused_param is None
    for name, p in plain_model.named_parameters():
        assert err_ratio(dict(fused_model.named_parameters())[name].detach(), p.detach()) < 1e-5, name
    fs, ps = fused_opt.opt.state[fused_model.W_dec], plain_opt.opt.state[plain_model.W_dec]
    assert float(fs["step"]) == float(ps["step"]) == 6.0
    assert err_ratio(fs["exp_avg_sq"], ps["exp_avg_sq"]) < 1e-5
    assert torch.allclose(fused_model.W_dec.norm(dim=1), torch.ones(96), atol=1e-6)
    # the fused state lives in torch's optimiser state, so it is checkpointed like the unfused one
    assert len(fused_opt.state_dict()["state"]) == len(plain_opt.state_dict()["state"])


@pytest.mark.parametrize("fused", [True, False])
def test_first_adam_step_is_bias_corrected(fused):
    """With bias correction the first Adam step moves every coordinate by lr·sign(g) (|m̂/√v̂| = 1)."""
    model = _topk()
    opt = DictionaryOptimizer(
        model, TrainConfig(optimizer="adam", lr=1e-3, warmup_steps=0), total_steps=10, fused=fused
    )
    opt.set_step(0)
    _grads(model, torch.randn(64, 24) + 1.0)
    W0 = model.W_dec.detach().clone()
    g = model.W_dec.grad.clone()
    w_hat = W0 / (W0.norm(dim=1, keepdim=True) + 1e-8)
    g -= (g * w_hat).sum(1, keepdim=True) * w_hat
    enc0, genc = model.W_enc.detach().clone(), model.W_enc.grad.clone()
    opt.step()
    expect = W0 - 1e-3 * g / (g.abs() + 6.25e-10)
    expect /= expect.norm(dim=1, keepdim=True) + 1e-8
    assert err_ratio(model.W_dec.detach(), expect) < 1e-6
    moved = (model.W_enc.detach() - enc0)[genc != 0]
    assert torch.allclose(moved.abs(), torch.full_like(moved, 1e-3), rtol=1e-3)


class _Quadratic(nn.Module):
    """A parameter vector with loss ½‖w − target‖² (no decoder: checks the optimiser alone)."""

    n_latents = 2**14
    unit_norm_decoder = False

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 10))


def test_signum_schedule_free_matches_recurrence_and_swaps():
    """sign-SGD under ScheduleFreeWrapper == the schedule-free recurrence written out; eval()/train() swap x/y."""
    model, target, beta, lr = _Quadratic(), torch.linspace(0.3, -0.7, 10), 0.9, 0.05
    opt = DictionaryOptimizer(model, TrainConfig(optimizer="signum_sf", lr=lr, momentum=beta), total_steps=20)
    z = x = model.w.detach().clone()
    for step in range(7):
        opt.set_step(step)
        y = (1 - beta) * z + beta * x
        assert torch.allclose(model.w.detach(), y, atol=1e-6)  # gradient point
        model.w.grad = model.w.detach() - target
        opt.step()
        z = z - lr * torch.sign(y - target)
        x = x + (z - x) / (step + 1)  # constant lr: uniform weights c_t = 1/(t+1)
    y = (1 - beta) * z + beta * x
    assert torch.allclose(model.w.detach(), y, atol=1e-6)
    opt.eval()
    assert torch.allclose(model.w.detach(), x, atol=1e-6)  # evaluation point
    opt.eval()  # idempotent
    assert torch.allclose(model.w.detach(), x, atol=1e-6)
    opt.set_step(7)  # the next step swaps y back in before the forward
    assert torch.allclose(model.w.detach(), y, atol=1e-6)
    opt.eval()
    opt.train()
    assert torch.allclose(model.w.detach(), y, atol=1e-6)


def test_signum_sf_trains_topk_and_eval_point_is_near_unit_norm():
    model, opt = _run(False, steps=8, optimizer="signum_sf")
    y = model.W_dec.detach().clone()
    assert torch.allclose(y.norm(dim=1), torch.ones(96), atol=1e-6)  # renormalised at y every step
    opt.eval()
    x = model.W_dec.detach()
    assert not torch.equal(x, y)
    assert (x.norm(dim=1) - 1).abs().max() < 0.2
    opt.train()
    assert err_ratio(model.W_dec.detach(), y) < 1e-6


@pytest.mark.parametrize("optimizer,base", [("adam", 2e-4), ("signum_sf", 5e-3)])
def test_width_rule_lr(optimizer, base):
    for n in (4608, 2**14, 131072):
        assert width_lr(n, optimizer) == pytest.approx(base / math.sqrt(n / 2**14), rel=1e-12)
    model = _topk(n=4608)
    assert DictionaryOptimizer(model, TrainConfig(optimizer=optimizer), 10).base_lr == pytest.approx(
        base * math.sqrt(2**14 / 4608)
    )
    assert DictionaryOptimizer(model, TrainConfig(optimizer=optimizer, lr=0.123), 10).base_lr == 0.123


def test_warmup_and_decay_schedule():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert all(a <= b for a, b in itertools.pairwise(f[:11])) and all(
        a >= b for a, b in itertools.pairwise(f[80:])
    )
    model = _topk()
    opt = DictionaryOptimizer(
        model, TrainConfig(optimizer="adam", lr=1e-3, warmup_steps=10, decay_fraction=0.2), 100
    )
    assert opt.set_step(4) == pytest.approx(5e-4)
    assert opt.opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    sf = DictionaryOptimizer(_topk(), TrainConfig(optimizer="signum_sf", lr=1e-3, warmup_steps=10), 100)
    assert sf.set_step(0) == 1e-3 and sf.set_step(99) == 1e-3  # schedule-free: constant LR


def test_fused_refused_where_not_equivalent():
    with pytest.raises(ValueError, match="fused decoder update needs Adam"):
        DictionaryOptimizer(_topk(), TrainConfig(optimizer="signum_sf"), 10, fused=True)


def test_storage_swap_wrapper_equals_package_wrapper():
    """Our schedule-free wrapper (storage swap) is bitwise the package's (XOR swap)."""
    import schedulefree

    from sparsedict.train.optim import SignSGD, _schedule_free

    runs = []
    for make in (
        lambda b: schedulefree.ScheduleFreeWrapper(b, momentum=0.95),
        lambda b: _schedule_free(b, 0.95),
    ):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(7, 5))
        opt = make(SignSGD([w], lr=0.01))
        opt.train()
        for step in range(5):
            w.grad = torch.sin(w.detach() * (step + 1))
            opt.step()
        y = w.detach().clone()
        opt.eval()
        runs.append((y, w.detach().clone(), opt.state[w]["z"].clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the one-pass Triton decoder update)")
def test_fused_decoder_adam_on_cuda_picks_triton_and_equals_unfused():
    """On CUDA the default picks the Triton one-pass update; it matches the unfused torch sequence."""
    results = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = _topk().cuda()
        opt = DictionaryOptimizer(
            model, TrainConfig(optimizer="adam", lr=1e-2, warmup_steps=2), total_steps=6, fused=fused
        )
        assert (opt.fused_param is model.W_dec) == (fused is None)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            opt.set_step(step)
            _grads(model, (torch.randn(64, 24, generator=gen) + 1.0).cuda())
            opt.step()
        results.append({n: p.detach().cpu() for n, p in model.named_parameters()})
    for name, p in results[1].items():
        assert err_ratio(results[0][name], p) < 1e-5, name


def test_run_length_rule_only_inside_its_measured_range():
    """Runs longer than the run-length rule's measured range take the width rule, and the printed line says so."""
    from sparsedict.train.schedule import BUDGET_MAX_STEPS, budget_lr, width_lr

    inside = DictionaryOptimizer(_topk(), TrainConfig(), BUDGET_MAX_STEPS)
    assert inside.base_lr == pytest.approx(budget_lr(96, BUDGET_MAX_STEPS))
    longer = DictionaryOptimizer(_topk(), TrainConfig(), 4 * BUDGET_MAX_STEPS)
    assert (
        longer.base_lr
        == pytest.approx(width_lr(96, "adam"))
        != pytest.approx(budget_lr(96, 4 * BUDGET_MAX_STEPS))
    )
    assert f"measured up to {BUDGET_MAX_STEPS} steps" in longer.describe()
    assert {g["betas"] for g in longer.opt.param_groups} == {(0.8, 0.99)}  # the rest of the preset stays


def test_auto_optimizer_applies_the_topk_preset_and_plain_adam_elsewhere():
    from sparsedict.dictionaries.relu import ReLUConfig
    from sparsedict.train.schedule import budget_lr

    assert TrainConfig().optimizer == "auto"
    topk = DictionaryOptimizer(_topk(), TrainConfig(), 200)
    assert topk.name == "adam" and not topk.schedule_free and isinstance(topk.opt, torch.optim.Adam)
    assert (
        topk.base_lr
        == pytest.approx(budget_lr(96, 200))
        == pytest.approx(0.0148 / (200 ** (1 / 3) * (96 / 2**14) ** 0.5))
    )
    # the batch factor (B / 4096)^(1/4), flat above 4096
    small = DictionaryOptimizer(_topk(), TrainConfig(batch_size=256), 200)
    assert small.base_lr == pytest.approx(budget_lr(96, 200, 256)) == pytest.approx(topk.base_lr / 2)
    big = DictionaryOptimizer(_topk(), TrainConfig(batch_size=16384), 200)
    assert big.base_lr == pytest.approx(topk.base_lr)
    assert topk.warmup_steps == 20  # min(warmup_steps=100, 10 % of 200 steps)
    assert {g["betas"] for g in topk.opt.param_groups} == {(0.8, 0.99)}
    topk.set_step(50)
    lrs = {n: g["lr"] for (n, _), g in zip(_topk().named_parameters(), topk.opt.param_groups)}
    assert lrs["W_dec"] == pytest.approx(2 * topk.base_lr) and lrs["W_enc"] == pytest.approx(topk.base_lr)
    # explicit values win over the preset
    own = DictionaryOptimizer(
        _topk(), TrainConfig(lr=1e-3, betas=(0.9, 0.999), lr_dec_scale=1.0, warmup_steps=5), 200
    )
    assert own.base_lr == 1e-3 and own.warmup_steps == 5
    assert {g["betas"] for g in own.opt.param_groups} == {(0.9, 0.999)}
    own.set_step(50)
    assert {g["lr"] for g in own.opt.param_groups} == {1e-3}
    # ReLU's preset: two thirds of the run-length rule, TopK's warmup cap, Adam's default betas
    relu = DictionaryOptimizer(build(ReLUConfig(d_in=24, n_latents=96).resolved(24)), TrainConfig(), 10)
    assert (
        relu.name == "adam"
        and relu.base_lr == pytest.approx(budget_lr(96, 10) * 2 / 3)
        and relu.warmup_steps == 1
    )
    assert {g["betas"] for g in relu.opt.param_groups} == {(0.9, 0.999)}
    plain = DictionaryOptimizer(
        build(ReLUConfig(d_in=24, n_latents=96).resolved(24)), TrainConfig(optimizer="adam"), 10
    )
    assert plain.base_lr == pytest.approx(width_lr(96, "adam")) and plain.warmup_steps == 100
    explicit = DictionaryOptimizer(_topk(), TrainConfig(optimizer="adam"), 10)
    assert explicit.base_lr == pytest.approx(width_lr(96, "adam"))
    assert DictionaryOptimizer(_topk(), TrainConfig(optimizer="signum_sf"), 10).schedule_free


def test_explicit_warmup_wins_over_the_auto_cap():
    """F3: an explicit ``warmup_steps`` is used as given (the large recipes' 1000 over 2441 steps); only the
    default (-1) is capped by the 'auto' preset to 10 % of the run."""
    assert DictionaryOptimizer(_topk(), TrainConfig(warmup_steps=1000), 2441).warmup_steps == 1000
    assert DictionaryOptimizer(_topk(), TrainConfig(warmup_steps=0), 2441).warmup_steps == 0
    assert DictionaryOptimizer(_topk(), TrainConfig(), 2441).warmup_steps == 100  # default, under the 245 cap
    assert DictionaryOptimizer(_topk(), TrainConfig(), 200).warmup_steps == 20  # default, capped
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-5)


def test_describe_states_what_the_run_gets():
    from sparsedict.train.schedule import budget_lr

    auto = DictionaryOptimizer(_topk(), TrainConfig(), 200)
    lr = budget_lr(96, 200)
    assert auto.describe() == (
        f"adam, lr {lr:.3g} ('auto' run-length rule: 200 steps of 4096, 96 latents), W_dec lr {2 * lr:.3g} (x2, 'auto' "
        "preset), betas (0.8, 0.99) ('auto' preset), warmup 20 steps (default 100, 'auto' cap 10% of the run = "
        "20), decay to 0 over the last 20% of 200 steps"
    )
    own = DictionaryOptimizer(_topk(), TrainConfig(lr=1e-3, betas=(0.9, 0.95), warmup_steps=7), 50)
    assert own.describe() == (
        "adam, lr 0.001 (set in the config), W_dec lr 0.002 (x2, 'auto' preset), betas (0.9, 0.95) (set in the "
        "config), warmup 7 steps (set in the config), decay to 0 over the last 20% of 50 steps"
    )
    plain = DictionaryOptimizer(_topk(), TrainConfig(optimizer="adam", warmup_steps=3), 10).describe()
    assert plain == f"adam, lr {width_lr(96, 'adam'):.3g} (width rule: 96 latents), betas (0.9, 0.999) (default), " \
        "warmup 3 steps (set in the config), decay to 0 over the last 20% of 10 steps"  # fmt: skip
    sf = DictionaryOptimizer(_topk(), TrainConfig(optimizer="signum_sf"), 10)
    want = f"signum_sf, lr {width_lr(96, 'signum_sf'):.3g} (width rule: 96 latents), constant (schedule-free)"
    assert sf.describe() == want + ", momentum 0.95"


def test_training_start_prints_settings_and_resume_step(tmp_path, capsys):
    """The LR/betas/warmup each dictionary gets are printed when training starts; a resumed run says so."""
    from sparsedict.train import TensorSource, Trainer

    x = torch.randn(640, 24, generator=torch.Generator().manual_seed(0))

    def run(max_steps: int) -> str:
        model = _topk()
        cfg = TrainConfig(batch_size=64, max_steps=max_steps, checkpoint_every=5, out_dir=str(tmp_path),
                          log_every=10**9, init_rows=256)  # fmt: skip
        source = TensorSource(x, None, batch_size=64, seed=0)
        trainer = Trainer({"m": model}, {model.cfg.source_key: source}, cfg)
        capsys.readouterr()
        trainer.fit()
        return capsys.readouterr().err

    first = run(10)
    assert f"m: {DictionaryOptimizer(_topk(), TrainConfig(batch_size=64), 10).describe()}" in first
    assert "resuming" not in first
    second = run(15)
    assert f"resuming from step 10 of 15 ({tmp_path / 'checkpoint'})" in second


def test_nan_loss_stops_training_with_the_step_and_the_fix(tmp_path):
    """A non-finite loss (here: an inf in the activations) ends the run with one line naming the dictionary,
    the step and what to check, instead of training on NaN."""
    from sparsedict.train import TensorSource, Trainer

    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(0))
    x[100, 3] = float("inf")
    model = _topk()
    cfg = TrainConfig(batch_size=256, max_steps=3, out_dir=str(tmp_path), log_every=10**9, init_rows=64,
                      lr=1e-3, warmup_steps=0)  # fmt: skip
    source = TensorSource(x, None, batch_size=256, seed=0)
    trainer = Trainer({"m": model}, {model.cfg.source_key: source}, cfg)
    with pytest.raises(FloatingPointError, match=r"^m: loss is (nan|inf) at step 0; check the activations for "
                       r"NaN/inf or lower the learning rate \(lr=0\.001\)$"):  # fmt: skip
        trainer.fit(resume=False)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_clt_auto_preset_follows_its_activation(activation):
    """A TopK/BatchTopK CLT takes TopK's preset (run-length LR over all its features, betas (0.8, 0.99), warmup
    capped at 10 %) with its decoder blocks at the base LR; the unmeasured activations keep plain Adam."""
    from sparsedict.dictionaries import CLTConfig
    from sparsedict.train.schedule import budget_lr

    clt = build(CLTConfig(layers=[0, 1], activation=activation, n_latents=32, k=4).resolved(8))
    opt = DictionaryOptimizer(clt, TrainConfig(batch_size=64), 100)
    measured = activation != "jumprelu"
    assert opt.base_lr == pytest.approx(budget_lr(64, 100, 64) if measured else width_lr(64, "adam"))
    assert opt.settings["betas"] == ((0.8, 0.99) if measured else (0.9, 0.999))
    assert {g["lr_scale"] for g in opt.opt.param_groups} == {1.0}  # no W_dec factor on the decoder blocks
    assert opt.warmup_steps == (10 if measured else 100)
