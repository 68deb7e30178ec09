"""SNMF: NNLS encode, the paper's full-batch solver, the streaming solver, recovery, persistence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import mean_max_cosine

from sparsedict.dictionaries import build, from_pretrained
from sparsedict.dictionaries.snmf import SNMF, SNMFConfig, nnls, snmf_full_batch
from sparsedict.metrics import fvu


def semi_nmf_data(d=48, k_true=24, n=3000, density=0.3, noise=0.02, seed=0):
    """``X = G Fᵀ + noise`` with sparse mixed-sign unit features ``F [d, k_true]`` and codes ``G ≥ 0``."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(d, k_true, generator=g) * (torch.rand(d, k_true, generator=g) < 0.25)
    F = F / F.norm(dim=0).clamp_min(1e-12)
    G = torch.rand(n, k_true, generator=g) * (torch.rand(n, k_true, generator=g) < density)
    return G @ F.T + noise * torch.randn(n, d, generator=g), F


def stream(model: SNMF, X: torch.Tensor, epochs: int, batch: int, seed: int = 0) -> dict:
    """Streaming fit_step over ``epochs`` shuffled passes; the last batch's FVU (before its update)."""
    g = torch.Generator().manual_seed(seed)
    metrics = {}
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0] - batch + 1, batch):
            x = X[perm[i : i + batch]]
            metrics = {"fvu": fvu(x, model.fit_step(x).x_hat)}
    return metrics


def rel_err(model: SNMF, X: torch.Tensor) -> float:
    return float((X - model.decode(model.encode(X))).pow(2).sum() / X.pow(2).sum())


def test_nnls_satisfies_kkt_within_100_iterations():
    """Optimality certificate (independent of the solver): g ≥ 0, ∇ ≥ 0 where g = 0, ∇ = 0 where g > 0."""
    torch.manual_seed(1)
    W = torch.randn(20, 32, dtype=torch.float64)
    x = torch.randn(50, 32, dtype=torch.float64) + 0.3 * torch.randn(50, 20, dtype=torch.float64) @ W
    g, iters = nnls(x, W, iters=100, tol=1e-10)
    grad = g @ (W @ W.T) - x @ W.T
    scale = float((x @ W.T).abs().max())
    assert bool((g >= 0).all())
    assert float(grad[g == 0].min()) >= -1e-5 * scale
    assert float(grad[g > 0].abs().max()) <= 1e-5 * scale
    assert iters <= 100
    scipy_opt = pytest.importorskip("scipy.optimize")
    ref = torch.stack([torch.from_numpy(scipy_opt.nnls(W.T.numpy(), xi.numpy())[0]) for xi in x])
    torch.testing.assert_close(g, ref, atol=1e-6 * scale, rtol=0)


def test_codes_are_exactly_nonnegative_and_decode_matches():
    model = build(SNMFConfig(d_in=32, n_latents=12, sparsity=0.2).resolved(32))
    with torch.no_grad():
        model.W_dec.normal_()
    x = torch.randn(64, 32) * 3 - 1  # mixed-sign inputs: the unconstrained solution has negative entries
    code = model.encode(x)
    assert code.indices is None and code.values.shape == (64, 12)
    assert bool((code.values >= 0).all())
    assert int((code.values == 0).sum()) > 0  # the constraint is active somewhere
    torch.testing.assert_close(model.decode(code), code.values @ model.W_dec)


def test_full_batch_semi_nmf_loss_is_monotone_and_wta_keeps_ceil_s_d():
    X, _ = semi_nmf_data(n=800)
    X = X.double()
    plain = snmf_full_batch(X, 12, sparsity=None, iters=60, seed=0)
    L = plain.losses
    # Ding–Li–Jordan: the F step is exact and the multiplicative G step never increases the loss.
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(L)), L
    assert L[-1] < 0.5 * L[0]
    wta = snmf_full_batch(X, 12, sparsity=0.1, iters=60, seed=0)
    nnz = (wta.F != 0).sum(0)
    assert bool((nnz == math.ceil(0.1 * 48)).all())
    assert bool((wta.G >= 0).all())
    assert wta.losses[wta.best_iter] == min(wta.losses)


def test_streaming_within_2_percent_of_full_batch():
    """Same in-memory data, K below the true rank (error is not at the noise floor).

    Comparison: relative reconstruction error ``‖X − X̂‖²/‖X‖²`` of the streaming dictionary must be at
    most 1.02 × that of the full-batch solver's best iterate, both encoded with the same NNLS on X.
    """
    X, _ = semi_nmf_data(n=3000)
    full = snmf_full_batch(X, 12, sparsity=0.25, iters=400, patience=100, seed=0)
    cfg = SNMFConfig(d_in=48, n_latents=12, sparsity=0.25, memory_tokens=3000)
    full_model = SNMF.from_factors(full.F, cfg)
    torch.manual_seed(0)
    model = SNMF(cfg.resolved(48))
    model.init_from_data(X)
    stream(model, X, epochs=15, batch=250)
    e_stream, e_full = rel_err(model, X), rel_err(full_model, X)
    full_own = full.losses[full.best_iter] / float(X.pow(2).sum())
    assert e_stream <= 1.02 * min(e_full, full_own), (e_stream, e_full, full_own)


def test_planted_recovery_streaming():
    """Streaming SNMF with K = true rank recovers the planted features: mean max |cos| ≥ 0.95."""
    X, F = semi_nmf_data(k_true=16, n=6000, noise=0.01)
    torch.manual_seed(0)
    model = SNMF(SNMFConfig(d_in=48, n_latents=16, sparsity=0.25, memory_tokens=3000).resolved(48))
    model.init_from_data(X)
    metrics = stream(model, X, epochs=10, batch=500)
    assert metrics["fvu"] < 0.05
    assert mean_max_cosine(model.W_dec, F.T) >= 0.95


def test_trainer_fit_step_and_checkpoint_resume(tmp_path):
    """Through the Trainer: fit_step is used; a resumed run ends with the same dictionary."""
    from sparsedict.train import TensorSource, TrainConfig, Trainer

    X, _ = semi_nmf_data(n=2000)
    cfg = SNMFConfig(d_in=48, n_latents=8, sparsity=0.25).resolved(48)

    def run(out, max_steps, resume):
        torch.manual_seed(0)
        model = build(cfg)
        tc = TrainConfig(
            batch_size=200, max_steps=max_steps, out_dir=str(out), init_rows=1000, log_every=1000
        )
        tr = Trainer({"snmf": model}, {("", ""): TensorSource(X, batch_size=200)}, tc)
        tr.fit(resume=resume)
        tr.save_checkpoint()
        return model, tr

    full, _ = run(tmp_path / "a", 12, False)
    run(tmp_path / "b", 5, False)
    resumed, tr = run(tmp_path / "b", 12, True)
    assert tr.step == 12
    torch.testing.assert_close(resumed.W_dec, full.W_dec)
    torch.testing.assert_close(resumed.stat_C, full.stat_C)


def test_save_from_pretrained_round_trip(tmp_path):
    X, _ = semi_nmf_data(n=1000)
    model = SNMF(SNMFConfig(d_in=48, n_latents=8, sparsity=0.25).resolved(48))
    model.init_from_data(X)
    stream(model, X, epochs=1, batch=250)
    model.save_pretrained(tmp_path / "snmf")
    loaded = from_pretrained(tmp_path / "snmf")
    assert type(loaded) is SNMF
    a, b = model.encode(X[:100]), loaded.encode(X[:100])
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    torch.testing.assert_close(model.decode(a), loaded.decode(b), atol=0, rtol=0)


def test_transcoder_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="transcoder"):
        build(SNMFConfig(hookpoint="mlp_in.3", target="mlp_out.3", d_in=16, d_out=16).resolved(16))


@pytest.mark.usefixtures("one_thread")
def test_fold_scaling_keeps_penalised_codes(tmp_path):
    """With ``code_l1 > 0`` and ``input_scale`` c ≠ 1 the saved dictionary gives the trained model's codes on raw
    inputs: the fold divides λ by c² along with W_dec by c (codes minimise ``½‖c·x − gW‖² + λΣg``)."""
    X, _ = semi_nmf_data(n=1000)
    model = SNMF(SNMFConfig(d_in=48, n_latents=8, sparsity=0.25, code_l1=0.05, encode_tol=0.0,
                            encode_iters=1000).resolved(48))  # fmt: skip
    model.init_from_data(X)
    stream(model, X, epochs=1, batch=250)
    c = 0.25
    model.input_scale.fill_(c)
    x = X[:100]
    trained = model.encode(c * x).values  # what the model computes on the inputs it was trained on
    loaded = from_pretrained(model.save_pretrained(tmp_path / "snmf"))
    assert loaded.cfg.code_l1 == pytest.approx(0.05 / c**2) and float(loaded.input_scale) == 1.0
    assert model.cfg.code_l1 == 0.05  # the fold acts on the saved copy only
    assert bool((trained == 0).any()), "λ should switch some codes off"
    torch.testing.assert_close(loaded.encode(x).values, trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), model.decode(model.encode(c * x)) / c,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
