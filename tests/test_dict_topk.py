"""TopK SAE: planted-dictionary recovery, AuxK maths, sparse backward, bad input (save/load:
test_dict_registry.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import mean_max_cosine, planted_data, train_dictionary
from sparsedict.kernels.topk_encode import topk_encode_ref

from sparsedict.dictionaries import build, from_pretrained
from sparsedict.dictionaries.topk import TopKConfig

RECOVERY_THRESHOLD = 0.95  # mean over true atoms of the best (signed) cosine with a learned decoder row


def _train(model, x, tmp_path, **kw):
    # the LR is tuned for Adam; all sample rows initialise b_dec
    train_dictionary(
        model, x, out_dir=str(tmp_path), dead_tokens=20_000, init_rows=32768, optimizer="adam", **kw
    )
    return model


def test_topk_recovers_planted_dictionary(tmp_path):
    x, atoms = planted_data(d=64, n_atoms=256, k_active=6, n_rows=30_000, seed=1)
    model = build(TopKConfig(k=6, d_in=64, n_latents=512))
    _train(model, x, tmp_path, epochs=8)
    score = mean_max_cosine(model.W_dec, atoms, absolute=False)
    assert score >= RECOVERY_THRESHOLD, f"mean max-cosine {score:.3f} < {RECOVERY_THRESHOLD}"
    # b_dec must have learned the constant offset direction rather than wasting latents on it
    assert (model.W_dec.norm(dim=1) - 1).abs().max() < 1e-5  # unit-norm decoder kept


def test_sparse_backward_matches_dense_autograd():
    torch.manual_seed(3)
    x = torch.randn(13, 20, dtype=torch.float32, requires_grad=True)
    W = torch.randn(20, 37, dtype=torch.float32, requires_grad=True)
    b = torch.randn(37, dtype=torch.float32, requires_grad=True)
    vals, idx = topk_encode_ref(x, W, b, 5)
    g = torch.randn_like(vals)
    (vals * g).sum().backward()
    grads = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    pre = (x @ W + b).relu()
    dense_vals = pre.gather(1, idx)
    (dense_vals * g).sum().backward()
    for got, t in zip(grads, (x, W, b)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)  # fp32 accumulation


def test_auxk_decodes_without_bias_and_uses_dead_latents_only():
    torch.manual_seed(0)
    model = build(TopKConfig(d_in=16, n_latents=64, k=4, aux_k=8, aux_alpha=0.5))
    with torch.no_grad():
        model.b_dec.normal_()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    model.set_dead_mask(dead)
    model.train()
    out = model(x)
    # hand computation
    pre = (x - model.b_dec) @ model.W_enc + model.b_enc
    pre = pre.masked_fill(~dead, float("-inf"))
    v, i = pre.topk(8, dim=-1)
    e_hat = torch.zeros(32, 16).index_add_(
        0, torch.arange(32).repeat_interleave(8), v.relu().reshape(-1, 1) * model.W_dec[i.reshape(-1)]
    )
    e = (x - out.x_hat).detach()
    expected = 0.5 * (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["auxk"], expected, rtol=1e-4, atol=1e-6)
    model.set_dead_mask(torch.zeros(64, dtype=torch.bool))
    assert "auxk" not in model(x).losses


def test_bad_inputs_give_clear_errors(tmp_path):
    model = build(TopKConfig(d_in=24, n_latents=96, k=5, hookpoint="resid_post.3"))
    with pytest.raises(ValueError, match=r"expects input of shape \[batch, 24\].*resid_post.3"):
        model(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"unknown checkpoint format.*config\.json"):
        from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=r"model\.safetensors"):
        from_pretrained(tmp_path / "c")
    with pytest.raises(KeyError, match="did you mean 'topk'"):
        build(TopKConfig(architecture="topkk", d_in=4, n_latents=8))
