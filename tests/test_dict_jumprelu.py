"""JumpReLU: straight-through estimators against hand-derived references and finite differences of the
kernel-smoothed functions, L0 / target-L0 loss values, planted recovery and round trip."""

from __future__ import annotations

import math

import torch

from sparsedict.dictionaries import build
from sparsedict.dictionaries.jumprelu import JumpReLUConfig, JumpReLUFn, StepFn
from sparsedict.hub import from_pretrained

torch.set_num_threads(1)


def make(d=16, n=40, **kw):
    torch.manual_seed(0)
    return build(JumpReLUConfig(d_in=d, n_latents=n, **kw).resolved(d))


def test_ste_gradients_match_hand_derived_reference():
    torch.manual_seed(1)
    eps = 0.1
    z = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(7, dtype=torch.float64) * 0.5 + 0.1).requires_grad_()
    g = torch.randn(50, 7, dtype=torch.float64)
    (JumpReLUFn.apply(z, theta, eps) * g).sum().backward()
    zd, td = z.detach(), theta.detach()
    H = (zd > td).double()
    K = ((zd - td).abs() / eps < 0.5).double()
    torch.testing.assert_close(z.grad, g * H)
    torch.testing.assert_close(theta.grad, (g * (-td / eps) * K).sum(0))
    assert float(K.sum()) > 5  # the kernel window is hit, so the check is not vacuous

    z.grad = theta.grad = None
    (StepFn.apply(z, theta, eps) * g).sum().backward()
    assert z.grad is None or float(z.grad.abs().sum()) == 0  # no gradient to z through the L0 term
    torch.testing.assert_close(theta.grad, (g * (-1 / eps) * K).sum(0))


def test_theta_gradient_equals_finite_difference_of_kernel_smoothed_expectation():
    """The STE is the derivative of the rectangle-kernel smoothed objective: for z uniform on a grid,
    d/dθ Σ_z z·H(z−θ) (a sum of jumps of height ≈ θ) ≈ −θ·density = the STE average."""
    eps = 0.05
    z = torch.linspace(-1, 2, 300_001, dtype=torch.float64).unsqueeze(1)  # density 1e5 per unit
    theta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    JumpReLUFn.apply(z, theta, eps).sum().backward()
    h = 1e-2
    f = lambda t: float((z * (z > t)).sum())  # noqa: E731
    fd = (f(0.7 + h) - f(0.7 - h)) / (2 * h)
    assert abs(float(theta.grad) - fd) < 2e-3 * abs(fd)
    theta.grad = None
    StepFn.apply(z, theta, eps).sum().backward()
    fd_step = (float((z > 0.7 + h).sum()) - float((z > 0.7 - h).sum())) / (2 * h)
    assert abs(float(theta.grad) - fd_step) < 2e-3 * abs(fd_step)


def test_log_threshold_chain_rule_and_l0_loss():
    m = make(l0_coefficient=0.3, l0_warmup_steps=0, bandwidth=0.5, threshold_init=0.2)
    with torch.no_grad():
        m.log_threshold.add_(torch.randn(40) * 0.3)
    x = torch.randn(64, 16)
    m.on_step(0, 10)
    out = m(x)
    z = x @ m.W_enc + m.b_enc  # no b_dec subtraction by default (Gemma Scope)
    theta = m.log_threshold.exp().detach()
    H = (z > theta).float()
    torch.testing.assert_close(out.code.values, z * H)
    torch.testing.assert_close(out.losses["sparsity"], 0.3 * H.sum(1).mean())
    m.zero_grad()
    out.losses["sparsity"].backward()
    K = ((z - theta).abs() / 0.5 < 0.5).float()
    ref = 0.3 * (-1 / 0.5) * K.mean(0) * theta  # ∂/∂t = ∂/∂θ · θ
    torch.testing.assert_close(m.log_threshold.grad, ref.detach(), atol=1e-6, rtol=1e-5)
    assert m.W_enc.grad is None or float(m.W_enc.grad.abs().sum()) == 0  # L0 gives z no gradient


def test_target_l0_loss_and_warmup():
    m = make(l0_coefficient=2.0, l0_target=5.0, l0_warmup_steps=4)
    x = torch.randn(32, 16)
    m.on_step(1, 100)
    out = m(x)
    l0 = float(out.code.l0().float().mean())
    assert abs(float(out.losses["sparsity"]) - 2.0 * 0.5 * (l0 / 5 - 1) ** 2) < 1e-4


def test_round_trip(tmp_path):
    m = make(apply_b_dec_to_input=True)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        m.b_dec.normal_()
        m.log_threshold.copy_(torch.rand(40).log() - 1)
        m.input_scale.fill_(3.0)
    m.eval()
    x = torch.randn(20, 16)
    code = m.encode(x * 3.0)
    ref = m.decode(code) / 3.0
    m.save_pretrained(tmp_path / "j")
    m2 = from_pretrained(tmp_path / "j")
    torch.testing.assert_close(m2.log_threshold, m.log_threshold)  # θ is in latent units: no fold
    code2 = m2.encode(x)
    torch.testing.assert_close(code2.values, code.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2.decode(code2), ref, atol=1e-5, rtol=1e-5)


def test_defaults_follow_methods():
    cfg = JumpReLUConfig()
    assert cfg.bandwidth == 0.001 and cfg.threshold_init == 0.001 and cfg.apply_b_dec_to_input is False
    m = make()
    torch.testing.assert_close(m.threshold, torch.full((40,), 0.001))
    assert math.isclose(float(m.log_threshold[0]), math.log(0.001), rel_tol=1e-6)
