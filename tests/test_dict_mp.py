"""MP-SAE: pursuit and gradients against a plain step-by-step reference, monotone residual, recovery, I/O."""

from __future__ import annotations

import pytest
import torch
from helpers import mean_max_cosine, planted_data

from sparsedict.dictionaries import build, from_pretrained
from sparsedict.dictionaries.mp import MPConfig

BACKENDS = ["torch", "numba"]


def reference_mp(x, D, b, T, absolute=False):
    """Textbook matching pursuit, one full correlation GEMM per step, differentiable by autograd.

    Returns ``(x_hat [B, d], dense codes [B, n], indices [B, T], coefficients [B, T], residual norms [B, T+1])``.
    """
    r = x - b
    codes = torch.zeros(x.shape[0], D.shape[0], dtype=x.dtype)
    idx, coef, norms = [], [], [r.norm(dim=1)]
    for _ in range(T):
        c = r @ D.T
        j = (c.abs() if absolute else c).argmax(1)
        a = c.gather(1, j[:, None]).squeeze(1)
        r = r - a[:, None] * D[j]
        codes = codes.scatter_add(1, j[:, None], a[:, None])
        idx.append(j)
        coef.append(a)
        norms.append(r.norm(dim=1))
    return codes @ D + b, codes, torch.stack(idx, 1), torch.stack(coef, 1), torch.stack(norms, 1)


def small_model(backend, absolute=False, steps=7, n=40, d=16, seed=0):
    torch.manual_seed(seed)
    cfg = MPConfig(d_in=d, n_latents=n, steps=steps, backend=backend, absolute=absolute, dtype="float64")
    model = build(cfg.resolved(d))
    with torch.no_grad():
        model.b_dec.normal_()
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("absolute", [False, True])
def test_pursuit_and_gradients_match_reference(backend, absolute):
    model = small_model(backend, absolute)
    x = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    x_ref, codes_ref, idx_ref, _, _ = reference_mp(x, model.W_dec, model.b_dec, 7, absolute)
    assert torch.equal(out.code.indices, idx_ref)
    torch.testing.assert_close(out.code.to_dense(), codes_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.x_hat, x_ref, atol=1e-12, rtol=0)
    # gradients of a random linear functional of x̂ (selection held fixed, as autograd does)
    w = torch.randn_like(x_ref)
    grads = torch.autograd.grad((out.x_hat * w).sum(), (model.W_dec, model.b_dec, x))
    grads_ref = torch.autograd.grad((x_ref * w).sum(), (model.W_dec, model.b_dec, x))
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-11, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_norm_non_increasing_and_duplicates_counted_once(backend):
    model = small_model(backend, steps=24, n=20, d=8)  # more steps than dimensions: atoms get re-picked
    x = torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():
        code, rT, _ = model.pursue(x)
    _, _, idx, coef, norms = reference_mp(x, model.W_dec, model.b_dec, 24)
    assert bool((norms[:, 1:] <= norms[:, :-1] + 1e-12).all())
    # ‖r_t‖² = ‖r_{t−1}‖² − a_t² for unit atoms
    torch.testing.assert_close(norms[:, :-1] ** 2 - norms[:, 1:] ** 2, coef**2, atol=1e-10, rtol=0)
    torch.testing.assert_close(rT.norm(dim=1), norms[:, -1], atol=1e-10, rtol=0)
    unique = torch.tensor([len(set(row.tolist())) for row in idx])
    assert bool((unique < 24).any()), "the test needs repeated atoms"
    assert torch.equal(code.l0(), unique)


def test_numba_and_torch_backends_agree_in_fp32():
    torch.manual_seed(0)
    cfg = MPConfig(d_in=24, n_latents=100, steps=12)
    a = build(cfg.resolved(24))
    b = build(MPConfig(d_in=24, n_latents=100, steps=12, backend="torch").resolved(24))
    b.load_state_dict(a.state_dict())
    x = torch.randn(50, 24)
    ca, cb = a.encode(x), b.encode(x)
    assert (ca.indices == cb.indices).float().mean() > 0.99  # fp32 near-ties may differ
    torch.testing.assert_close(a.decode(ca), b.decode(cb), atol=1e-3, rtol=0)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("n", [64, 333, 1000, 1024])
def test_numba_pursuit_kernel_matches_torch_loop(n, absolute):
    """The numba kernel's blocked argmax (integer-key block maxima, then one block) against the torch loop's.

    n = 64 is one partial block, 333 and 1000 span several blocks and end in a partial one; fp64, so there
    are no near-ties.
    """
    from sparsedict.kernels.pursuit import numba_available, pursuit_forward

    if not numba_available():
        pytest.skip("numba not installed")
    torch.manual_seed(n)
    d, B, T = 24, 40, 30
    D = torch.randn(n, d, dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    r0 = torch.randn(B, d, dtype=torch.float64)
    G = D @ D.T
    c_nb, c_pt = r0 @ D.T, r0 @ D.T
    out_nb = pursuit_forward(r0, D, c_nb, G, T, absolute, True)
    out_pt = pursuit_forward(r0, D, c_pt, G, T, absolute, False)
    assert out_nb[4] is c_nb and out_pt[4] is c_pt  # cT: c itself, updated in place
    assert torch.equal(out_nb[1], out_pt[1])  # selected atoms
    assert torch.equal(out_nb[2], out_pt[2])  # first occurrences
    torch.testing.assert_close(out_nb[0], out_pt[0], atol=1e-12, rtol=0)  # coefficients
    torch.testing.assert_close(out_nb[3], out_pt[3], atol=1e-12, rtol=0)  # final residuals
    torch.testing.assert_close(c_nb, c_pt, atol=1e-12, rtol=0)  # final correlations (updated in place)
    torch.testing.assert_close(c_nb, out_nb[3] @ D.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("absolute", [False, True])
def test_numba_pursuit_reads_bf16_correlations_and_gram_exactly(absolute):
    """bf16 ``c``/``G`` (what bf16 GEMMs return) read by the kernel equal their fp32 copies, bit for bit."""
    from sparsedict.kernels.pursuit import numba_available, pursuit_forward

    if not numba_available():
        pytest.skip("numba not installed")
    torch.manual_seed(1)
    n, d, B, T = 700, 32, 50, 20
    D = torch.randn(n, d)
    D /= D.norm(dim=1, keepdim=True)
    r0 = torch.randn(B, d)
    c16, G16 = (r0.bfloat16() @ D.bfloat16().T), (D.bfloat16() @ D.bfloat16().T)
    c32 = c16.float()
    wide = pursuit_forward(r0, D, c16, G16, T, absolute, True)
    fp32 = pursuit_forward(r0, D, c32, G16.float(), T, absolute, True)
    for got, want in zip(wide, fp32, strict=True):
        assert torch.equal(got, want)
    assert wide[4].dtype == torch.float32 and torch.equal(fp32[4], c32)  # cT: a new fp32 tensor / c in place
    torch_loop = pursuit_forward(r0, D, c16.clone(), G16, T, absolute, False)  # the torch path widens first
    assert (torch_loop[1] == wide[1]).float().mean() > 0.99  # fp32 near-ties may differ


@torch.no_grad()
def test_omp_least_squares_on_support():
    torch.manual_seed(0)
    cfg = MPConfig(d_in=16, n_latents=40, steps=6, orthogonal=True, dtype="float64")
    model = build(cfg.resolved(16))
    mp_model = build(MPConfig(d_in=16, n_latents=40, steps=6, dtype="float64").resolved(16))
    mp_model.load_state_dict(model.state_dict())
    x = torch.randn(20, 16, dtype=torch.float64)
    with torch.no_grad():
        code, rT, _ = model.pursue(x)
        mp_rT = mp_model.pursue(x)[1]
    # no atom twice, and the residual is orthogonal to every selected atom
    assert all(len(set(row.tolist())) == 6 for row in code.indices)
    assert float((torch.einsum("btd,bd->bt", model.W_dec[code.indices], rT)).abs().max()) < 1e-8
    torch.testing.assert_close(model.decode(code), x - rT)
    assert bool((rT.norm(dim=1) <= mp_rT.norm(dim=1) + 1e-10).all())


def test_planted_recovery():
    """Unit-norm planted atoms (d=64, 256 atoms, 6 active, noise 0.01, offset 0.5), width 512, T=6.

    Threshold: mean max-cosine ≥ 0.95 (measured ≈ 0.999 with 60k rows × 8 epochs; this test uses less data).
    """
    from sparsedict.train import TensorSource, TrainConfig, Trainer

    x, atoms = planted_data(d=64, n_atoms=256, k_active=6, n_rows=20_000, seed=0)
    cfg = MPConfig(d_in=64, n_latents=512, steps=6)
    model = build(cfg.resolved(64))
    tc = TrainConfig(
        batch_size=256,
        epochs=3,
        lr=2e-3,
        warmup_steps=50,
        out_dir="/tmp/sd_mp_planted",
        dead_tokens=20_000,
        log_every=10_000,
    )
    last = Trainer({"mp": model}, {("", ""): TensorSource(x, batch_size=256)}, tc).fit(resume=False)
    assert last["mp/fvu"] < 0.1
    assert mean_max_cosine(model.W_dec, atoms) >= 0.95


def test_save_from_pretrained_round_trip_with_folded_scale(tmp_path):
    torch.manual_seed(0)
    model = build(MPConfig(d_in=16, n_latents=48, steps=5).resolved(16))
    x = torch.randn(40, 16) * 3 + 1
    model.init_from_data(x)
    model.input_scale.fill_(0.5)
    model.save_pretrained(tmp_path / "mp")
    loaded = from_pretrained(tmp_path / "mp")
    with torch.no_grad():
        ref = model(x * 0.5).x_hat / 0.5  # what the trainer-side model computes, back in raw units
        out = loaded(x)
    torch.testing.assert_close(out.x_hat, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(loaded.encode(x).indices, model.encode(x * 0.5).indices)
    again = from_pretrained(tmp_path / "mp")
    assert torch.equal(again.encode(x).values, loaded.encode(x).values)


def test_transcoder_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="transcoder"):
        build(MPConfig(hookpoint="mlp_in.3", target="mlp_out.3", d_in=16, d_out=16).resolved(16))
