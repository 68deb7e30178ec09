"""Matryoshka: group resolution, the prefix losses against a dense reference (both selections),
threshold tracking, planted recovery (save/load: test_dict_registry.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_dict, mean_max_cosine, planted_data, train_dictionary

from sparsedict.dictionaries import build
from sparsedict.dictionaries.matryoshka import MatryoshkaConfig, resolve_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def make(d=16, n=48, k=4, **kw):
    m = make_dict("matryoshka", d, n, k=k, **kw)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
    return m


def test_group_resolution():
    assert resolve_groups(MatryoshkaConfig(n_latents=64, group_sizes=(8, 8, 48))) == [8, 16, 64]
    assert resolve_groups(MatryoshkaConfig(n_latents=512)) == [16, 32, 64, 128, 256, 512]
    with pytest.raises(ValueError, match="sum to n_latents"):
        resolve_groups(MatryoshkaConfig(n_latents=64, group_sizes=(8, 8)))
    with pytest.raises(ValueError, match="selection"):
        MatryoshkaConfig(selection="dense")


@pytest.mark.parametrize("selection", ["topk", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_prefix_losses_equal_dense_reference(selection, skip):
    weights = (0.1, 0.2, 0.3, 0.4)
    m = make(
        selection=selection, group_sizes=(5, 11, 16, 16), group_weights=weights, skip=skip, aux_alpha=0.0
    )
    if skip:
        with torch.no_grad():
            m.W_skip.normal_(0, 0.1)
    x = torch.randn(32, 16)
    m.train()
    out = m(x)
    f = out.code.to_dense()
    ref = 0.0
    for w, end in zip(weights, (5, 16, 32, 48), strict=True):
        y_g = f[:, :end] @ m.W_dec[:end] + m.b_dec + (x @ m.W_skip.T if skip else 0)
        ref = ref + w * (x - y_g).pow(2).sum(1).mean()
    total = out.losses["prefix"] + out.losses["mse"]
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    # gradients agree too
    g = torch.autograd.grad(total, [m.W_dec, m.W_enc], retain_graph=True)
    g_ref = torch.autograd.grad(ref, [m.W_dec, m.W_enc])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_threshold_tracked_and_used_in_eval_for_batchtopk():
    m = make(selection="batchtopk")
    x = torch.randn(64, 16)
    m.train()
    out = m(x)
    m.after_step(out)
    assert float(m.threshold) > 0
    m.eval()
    acts = torch.relu((x - m.b_dec) @ m.W_enc + m.b_enc)
    torch.testing.assert_close(m.encode(x).values, acts * (acts > m.threshold))
    t = make(selection="topk").eval()  # per-token top-k stays top-k in eval
    assert t.encode(x).indices.shape == (64, 4)


def test_planted_recovery(tmp_path):
    """Threshold 0.95 mean max |cos| over the 256 true atoms (d=64, 6 active, noise 0.01).

    Two groups of 256 latents: the first prefix alone has room for the 256 planted atoms (planted data
    has no feature hierarchy, so tiny early groups can only learn mixtures)."""
    # data seed ≠ model seed: with equal seeds the model's random W_dec starts as the planted atoms
    x, atoms = planted_data(d=64, n_atoms=256, k_active=6, n_rows=40_000, seed=1)
    torch.manual_seed(0)
    cfg = MatryoshkaConfig(d_in=64, n_latents=512, k=6, selection="topk", group_fractions=(0.5, 0.5))
    m = build(cfg.resolved(64))
    assert mean_max_cosine(m.W_dec, atoms) < 0.5  # the start is not the answer
    train_dictionary(m, x, epochs=6, lr=4e-3, out_dir=str(tmp_path), dead_tokens=20_000)
    score = mean_max_cosine(m.W_dec, atoms)
    assert score >= 0.95, f"mean max cosine {score:.3f} < 0.95"
