"""Matryoshka: group resolution, the prefix losses against a dense reference (both selections),
threshold tracking, planted recovery (save/load: test_dict_registry.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_dict, mean_max_cosine, planted_data, train_dictionary

from sparsedict.dictionaries import build, from_pretrained
from sparsedict.dictionaries.matryoshka import MatryoshkaConfig, resolve_groups
from sparsedict.formats import FormatError
from sparsedict.formats.saelens import save_saelens
from sparsedict.train import TensorSource, TrainConfig, Trainer

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
    total = out.losses["prefix"]
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


def scaled_tokens(n: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian rows with a log-normal scale per token (as real activations have): per-token k-th values
    spread over orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.randn(n, 1, generator=g).exp()


def test_per_token_topk_exports_what_it_computes(tmp_path):
    """``selection="topk"`` is per-token top-k at inference, so it exports as SAELens ``topk`` with the same k
    (not a JumpReLU with the batch-minimum θ, which fires on ~60× k latents in this toy) and tracks no θ."""
    m = make(d=64, n=4608, k=32, selection="topk", threshold_start_step=0, hookpoint="resid_post.1")
    m.train()
    for step in range(4):
        m.on_step(step, 10)
        m.after_step(m(scaled_tokens(1024, 64, step)))
    assert float(m.threshold) == -1.0  # no threshold estimate for per-token selection
    m.eval()
    path = save_saelens(m, tmp_path / "sae")
    assert json.loads((path / "cfg.json").read_text())["architecture"] == "topk"
    back = from_pretrained(path)
    x = scaled_tokens(512, 64, 99)
    with torch.no_grad():
        a, b = m.encode(x), back.encode(x)
    assert back.architecture == "topk" and back.cfg.k == 32
    assert torch.equal(b.l0(), torch.full((512,), 32))
    torch.testing.assert_close(b.to_dense(), a.to_dense())
    transcoder = make(d=16, n=48, k=4, d_out=10, selection="topk", hookpoint="mlp_in.1", target="mlp_out.1")
    with pytest.raises(FormatError, match="no transcoder or skip variant of 'topk'"):
        save_saelens(transcoder.eval(), tmp_path / "tc")


def test_logged_mse_is_the_full_reconstruction_error(tmp_path):
    """The logged ``mse`` is the full dictionary's per-token SSE, not its prefix-loss share w_G·SSE."""
    x = scaled_tokens(512, 16, 0)
    m = make(selection="topk")
    cfg = TrainConfig(batch_size=512, max_steps=1, out_dir=str(tmp_path), normalise_inputs="none")
    trainer = Trainer({"m": m}, {m.cfg.source_key: TensorSource(x, batch_size=512)}, cfg)
    trainer.initialise()
    batch = next(iter(trainer.sources[m.cfg.source_key]))
    with torch.no_grad():  # the step logs the error of the weights before its update
        want = (m(batch[0]).x_hat - batch[0]).pow(2).sum(1).mean()
    metrics = trainer.train_step({m.cfg.source_key: batch})
    assert metrics["m/mse"] == pytest.approx(float(want), rel=1e-5)
    assert metrics["m/prefix"] > 0


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
    # the package defaults: optimizer 'auto', LR and warmup from its rules (benchmarks/RESULTS_defaults.md)
    train_dictionary(m, x, epochs=6, lr=0.0, warmup_steps=-1, out_dir=str(tmp_path), dead_tokens=20_000)
    score = mean_max_cosine(m.W_dec, atoms)
    assert score >= 0.95, f"mean max cosine {score:.3f} < 0.95"
