"""Gated SAE: forward and the three loss terms against a hand computation (aux loss through a frozen
decoder), no b_enc in the state dict, planted recovery (save/load: test_dict_registry.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_dict, mean_max_cosine, planted_data, train_dictionary

from sparsedict.dictionaries import build
from sparsedict.dictionaries.gated import GatedConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def make(d=16, n=40, **kw):
    m = make_dict("gated", d, n, **kw)
    with torch.no_grad():
        for p in (m.b_gate, m.b_mag, m.r_mag, m.b_dec):
            p.normal_(0, 0.3)
    return m


def test_state_dict_names_match_saelens():
    m = make()
    assert set(m.state_dict()) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag", "input_scale"}


def test_forward_and_losses_equal_hand_computation():
    m = make(l1_coefficient=0.7, l1_warmup_steps=0)
    x, y = torch.randn(32, 16), None
    m.on_step(0, 10)
    out = m(x, y)
    pi = (x - m.b_dec) @ m.W_enc
    f = (pi + m.b_gate > 0).float() * torch.relu(m.r_mag.exp() * pi + m.b_mag)
    x_hat = f @ m.W_dec + m.b_dec
    torch.testing.assert_close(out.code.values, f)
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.losses["mse"], (x - x_hat).pow(2).sum(1).mean())
    gate = torch.relu(pi + m.b_gate)
    torch.testing.assert_close(out.losses["l1"], 0.7 * gate.sum(1).mean())
    aux = (x - (gate @ m.W_dec + m.b_dec)).pow(2).sum(1).mean()
    torch.testing.assert_close(out.losses["aux"], aux)


def test_aux_loss_does_not_train_the_decoder():
    m = make()
    out = m(torch.randn(16, 16))
    out.losses["aux"].backward()
    assert m.W_dec.grad is None and m.b_dec.grad is not None  # b_dec only via the encoder input
    assert float(m.W_enc.grad.abs().sum()) > 0 and float(m.b_gate.grad.abs().sum()) > 0
    m.zero_grad()
    m.cfg.apply_b_dec_to_input = False
    m(torch.randn(16, 16)).losses["aux"].backward()
    assert m.b_dec.grad is None and m.r_mag.grad is None and m.b_mag.grad is None


def test_init_encoder_is_scaled_decoder_transpose():
    torch.manual_seed(0)
    m = build(GatedConfig(d_in=16, n_latents=40).resolved(16))
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.ones(40))
    torch.testing.assert_close(m.W_enc, 0.1 * m.W_dec.T)
    for p in (m.b_gate, m.b_mag, m.r_mag, m.b_dec):
        assert float(p.abs().sum()) == 0


def test_planted_recovery(tmp_path):
    """Threshold 0.95 mean max |cos| over the 256 true atoms (d=64, 6 active, noise 0.01), and the L0 near the planted 6.

    The package defaults (no LR, no coefficient: lr=0 and warmup_steps=-1 select the 'auto' preset, here the
    width rule's 1.13e-3 for 1,875 steps) with ``l0_target`` = the planted 6 (λ steered from its default 2, then
    the gate threshold calibrated). Measured: 0.995 / 0.994 / 0.993 on data seeds 0 / 2 / 3, L0 5.84–5.96; the
    fixed default λ = 2 gave 0.905 (L0 21). With a unit-norm encoder init (``encoder_init_norm=1``) an earlier
    run (lr 3e-3, fixed λ) gave 0.633 instead of 0.982.
    """
    x, atoms = planted_data(d=64, n_atoms=256, k_active=6, n_rows=40_000, seed=0)
    torch.manual_seed(0)
    m = build(GatedConfig(d_in=64, n_latents=512, l0_target=6.0).resolved(64))
    start = mean_max_cosine(m.W_dec, atoms)
    assert start < 0.5, f"the initial decoder already matches the atoms ({start:.3f}): seed leak"
    train_dictionary(m, x, epochs=12, lr=0, warmup_steps=-1, normalise_inputs="sqrt_d", out_dir=str(tmp_path))
    score = mean_max_cosine(m.W_dec, atoms)
    assert score >= 0.95, f"mean max cosine {score:.3f} < 0.95"
    m.eval()
    with torch.no_grad():
        l0 = float((m.encode(x[:4000] * m.input_scale).values != 0).sum(-1).float().mean())
    assert 5.4 < l0 < 6.6, f"L0 {l0:.2f} is not near the target 6"
