"""Every metric in sparsedict.metrics against an independent numpy computation with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsedict.dictionaries.base import SparseCode
from sparsedict.metrics import ReconstructionStats, SpliceStats, fvu, token_ce, token_kl


def _data(seed: int = 0, t: int = 500, d: int = 16, offset: float = 5.0):
    g = np.random.default_rng(seed)
    y = g.normal(size=(t, d)) * g.uniform(0.5, 2.0, size=d) + offset  # non-zero per-dim mean
    y_hat = y + 0.3 * g.normal(size=(t, d))
    return y, y_hat


def _np_fvu(y: np.ndarray, y_hat: np.ndarray) -> float:
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_fvu_matches_numpy_with_nonzero_mean():
    y, y_hat = _data()
    got = fvu(torch.tensor(y), torch.tensor(y_hat))
    want = _np_fvu(y, y_hat)
    assert got == pytest.approx(want, rel=1e-10)
    # The "around zero" bug (variance measured as E‖y‖²) would give a much smaller FVU here.
    around_zero = float(((y - y_hat) ** 2).sum() / (y**2).sum())
    assert abs(got - around_zero) > 0.5 * want
    # Mean of per-token ratios (the SAELens legacy definition) also differs.
    per_token = float(np.mean(((y - y_hat) ** 2).sum(1) / ((y - y.mean(0)) ** 2).sum(1)))
    assert abs(got - per_token) > 1e-3


def test_mean_predictor_fvu_one_perfect_zero():
    y, _ = _data(1)
    yt = torch.tensor(y)
    mean = yt.mean(0, keepdim=True).expand_as(yt)
    assert fvu(yt, mean) == pytest.approx(1.0, abs=1e-12)
    assert fvu(yt, yt.clone()) == 0.0
    stats = ReconstructionStats()
    stats.update(yt, mean)
    assert stats.explained_variance == pytest.approx(0.0, abs=1e-12)


def test_batch_split_invariance_and_merge():
    y, y_hat = _data(2, t=997)
    yt, ht = torch.tensor(y, dtype=torch.float32), torch.tensor(y_hat, dtype=torch.float32)
    whole = ReconstructionStats()
    whole.update(yt, ht)
    split = ReconstructionStats()
    for a, b in [(0, 1), (1, 100), (100, 613), (613, 997)]:
        split.update(yt[a:b], ht[a:b])
    left, right = ReconstructionStats(), ReconstructionStats()
    left.update(yt[:400], ht[:400])
    right.update(yt[400:], ht[400:])
    merged = left.merge(right)
    for other in (split, merged):
        for key, value in whole.summary().items():
            assert other.summary()[key] == pytest.approx(value, rel=1e-9), key


def test_mse_cosine_shrinkage_l2_ratio_against_numpy():
    y, y_hat = _data(3, t=300, d=8)
    stats = ReconstructionStats()
    stats.update(torch.tensor(y), torch.tensor(y_hat))
    t, d = y.shape
    sse = ((y - y_hat) ** 2).sum()
    assert stats.mse == pytest.approx(sse / (t * d), rel=1e-10)
    assert stats.sse_per_token == pytest.approx(sse / t, rel=1e-10)
    cos = (y * y_hat).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(y_hat, axis=1))
    assert stats.cosine == pytest.approx(cos.mean(), rel=1e-10)
    assert stats.shrinkage == pytest.approx((y_hat**2).sum() / (y * y_hat).sum(), rel=1e-10)
    assert stats.l2_ratio == pytest.approx(
        np.linalg.norm(y_hat, axis=1).sum() / np.linalg.norm(y, axis=1).sum()
    )
    # A reconstruction shrunk by 0.5 has gamma = 0.5 exactly.
    half = ReconstructionStats()
    half.update(torch.tensor(y), torch.tensor(0.5 * y))
    assert half.shrinkage == pytest.approx(0.5, rel=1e-12)


def _codes(seed: int = 4, t: int = 400, n: int = 50):
    """A sparse code with variable L0 per token; latent 0 never fires, latent 1 fires on every token."""
    g = np.random.default_rng(seed)
    dense = np.zeros((t, n))
    l0 = g.integers(1, 12, size=t)
    for i in range(t):
        idx = g.choice(np.arange(2, n), size=l0[i] - 1, replace=False)
        dense[i, idx] = g.uniform(0.1, 1.0, size=idx.size)
        dense[i, 1] = 1.0
    dense[:, 40:] *= g.uniform(size=(t, 1)) < 0.02  # rare latents
    return dense


@pytest.mark.parametrize("sparse", [False, True])
def test_l0_dead_dense_and_distributions(sparse: bool):
    dense = _codes()
    t, n = dense.shape
    if sparse:
        k = int((dense != 0).sum(1).max()) + 2  # padded with zero entries
        idx = np.zeros((t, k), dtype=np.int64)
        val = np.zeros((t, k))
        for i in range(t):
            nz = np.flatnonzero(dense[i])
            idx[i, : nz.size], val[i, : nz.size] = nz, dense[i, nz]
        code = SparseCode(torch.tensor(val), torch.tensor(idx), n)
    else:
        code = SparseCode(torch.tensor(dense), None, n)
    y = torch.zeros(t, 3)
    stats = ReconstructionStats(n)
    stats.update(
        y[:150], y[:150], SparseCode(code.values[:150], None if not sparse else code.indices[:150], n)
    )
    stats.update(
        y[150:], y[150:], SparseCode(code.values[150:], None if not sparse else code.indices[150:], n)
    )
    l0 = (dense != 0).sum(1)
    freq = (dense != 0).mean(0)
    assert stats.l0 == pytest.approx(l0.mean(), rel=1e-12)
    assert stats.l0_std == pytest.approx(l0.std(), rel=1e-9)
    assert stats.dead_fraction == pytest.approx((freq == 0).mean())
    assert stats.dead_fraction > 0  # latent 0 at least
    assert stats.dense_fraction == pytest.approx((freq > 0.1).mean())
    q = stats.l0_quantiles((0.1, 0.5, 0.9))
    for name, qq in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        assert q[name] == int(np.quantile(l0, qq, method="inverted_cdf")), name
    assert q["max"] == l0.max()
    hist = stats.firing_histogram(decades=4)
    alive = freq[freq > 0]
    want, _ = np.histogram(np.clip(np.log10(alive), -4, 0), bins=4, range=(-4, 0))
    assert hist["counts"] == want.tolist()
    assert hist["dead"] == int((freq == 0).sum())


def test_token_ce_and_kl_against_numpy():
    g = np.random.default_rng(5)
    logits = g.normal(size=(7, 11)) * 3
    other = logits + g.normal(size=(7, 11))
    target = g.integers(0, 11, size=7)

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    lp, lq = log_softmax(logits), log_softmax(other)
    ce = token_ce(torch.tensor(logits), torch.tensor(target))
    np.testing.assert_allclose(ce.numpy(), -lp[np.arange(7), target], rtol=1e-5)
    kl = token_kl(torch.tensor(lp), torch.tensor(lq))
    np.testing.assert_allclose(kl.numpy(), (np.exp(lp) * (lp - lq)).sum(1), rtol=1e-10)
    assert float(token_kl(torch.tensor(lp), torch.tensor(lp)).abs().max()) == 0.0


def test_token_kl_with_masked_vocabulary_is_finite():
    """Entries the clean model masks with −inf (p = 0) add 0, not NaN; the KL equals the sum over the rest."""
    logits = torch.tensor(
        [[2.0, 0.5, -1.0, float("-inf")], [0.0, float("-inf"), 1.0, 3.0]], dtype=torch.float64
    )
    other = torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.2, -2.0, 1.5, 2.0]], dtype=torch.float64)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(other, -1)
    kl = token_kl(lp, lq)
    finite = torch.isfinite(lp)
    ref = [float((lp[i][finite[i]].exp() * (lp[i][finite[i]] - lq[i][finite[i]])).sum()) for i in range(2)]
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert float(token_kl(lp, lp).abs().max()) == 0.0
    forbidden = lq.clone()
    forbidden[0, 0] = float("-inf")  # the other model forbids a token the clean model allows: infinite KL
    assert token_kl(lp, forbidden)[0] == float("inf")


def test_splice_stats_formulas():
    ce_clean = torch.tensor([2.0, 3.0, 1.0])
    ce_spliced = torch.tensor([2.5, 3.5, 1.5])
    ce_zero = torch.tensor([6.0, 7.0, 5.0])
    ce_mean = torch.tensor([4.0, 5.0, 3.0])
    kl_s, kl_z = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 2.0, 3.0])
    a, b = SpliceStats(), SpliceStats()
    a.update(ce_clean[:1], ce_spliced[:1], ce_zero[:1], kl_s[:1], kl_z[:1], ce_mean[:1], kl_z[:1])
    b.update(ce_clean[1:], ce_spliced[1:], ce_zero[1:], kl_s[1:], kl_z[1:], ce_mean[1:], kl_z[1:])
    s = a.merge(b).summary()
    assert s["ce_clean"] == pytest.approx(2.0)
    assert s["ce_spliced"] == pytest.approx(2.5)
    assert s["delta_lm_loss"] == pytest.approx(0.5)
    assert s["ce_recovered"] == pytest.approx((6.0 - 2.5) / (6.0 - 2.0))
    assert s["ce_recovered_mean_ablation"] == pytest.approx((4.0 - 2.5) / (4.0 - 2.0))
    assert s["kl"] == pytest.approx(0.2)
    assert s["kl_div_score"] == pytest.approx((6.0 - 0.6) / 6.0)


def test_reconstruct_compares_at_activation_scale():
    """A dictionary with input_scale c and its folded copy give the same ŷ on raw activations."""
    import copy

    from sparsedict.dictionaries import build, reconstruct
    from sparsedict.dictionaries.topk import TopKConfig
    from sparsedict.eval import reconstruction_stats

    torch.manual_seed(0)
    model = build(TopKConfig(d_in=12, n_latents=40, k=5).resolved(12))
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(0, 0.1)
    model.input_scale.fill_(3.0)
    folded = copy.deepcopy(model)
    folded.fold_scaling()
    x = torch.randn(64, 12) * 2 + 1
    y_hat, code = reconstruct(model, x)
    y_hat2, code2 = reconstruct(folded, x)
    torch.testing.assert_close(y_hat, y_hat2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(code.values, code2.values, rtol=1e-5, atol=1e-5)
    direct = (model(x * 3.0).x_hat / 3.0).detach()
    torch.testing.assert_close(y_hat, direct)
    stats = reconstruction_stats(model, [(x[:30], None), (x[30:], None)])
    assert stats.fvu == pytest.approx(fvu(x, y_hat), rel=1e-6)
