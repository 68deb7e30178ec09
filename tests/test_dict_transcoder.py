"""Transcoders: every architecture that declares ``supports_transcoder`` maps input -> a target of another
dimension (d_out != d_in), with and without a skip connection; round trip; planted skip-transcoder recovery
of the output atoms and of W_skip."""

from __future__ import annotations

import pytest
import torch
from helpers import mean_max_cosine, train_dictionary

from sparsedict.dictionaries import available, build, from_pretrained, lookup

pytestmark = pytest.mark.usefixtures("one_thread")
# multi-layer dictionaries (the CLT) map every layer's input to outputs: tests/test_dict_clt.py
ARCHS = [a for a in available() if lookup(a)[0].supports_transcoder and not lookup(a)[0].layered]


def make(arch, skip=False, d_in=24, d_out=10, n=40):
    _, cls = lookup(arch)
    kw = {"k": 4} if "k" in cls.__dataclass_fields__ else {}
    if arch == "matryoshka":
        kw["group_sizes"] = (8, 32)
    torch.manual_seed(0)
    cfg = cls(
        architecture=arch,
        hookpoint="mlp_in.6",
        target="mlp_out.6",
        d_in=d_in,
        d_out=d_out,
        n_latents=n,
        skip=skip,
        **kw,
    )
    return build(cfg.resolved(d_in, d_out))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_maps_input_to_target_of_other_dimension(arch, skip, tmp_path):
    m = make(arch, skip)
    assert m.cfg.is_transcoder and not m.subtracts_b_dec
    assert m.W_dec.shape == (40, 10) and m.W_enc.shape == (24, 40) and m.b_dec.shape == (10,)
    x, y = torch.randn(32, 24), torch.randn(32, 10)
    if skip:
        assert m.W_skip.shape == (10, 24) and float(m.W_skip.abs().sum()) == 0  # zero-initialised
        with torch.no_grad():
            m.W_skip.normal_(0, 0.1)
    m.train()
    out = m(x, y)
    assert out.x_hat.shape == (32, 10)
    # the reconstruction is decode(code) (+ skip), compared with y, not x
    dense = out.code.to_dense()
    ref = dense @ m.W_dec + m.b_dec + (x @ m.W_skip.T if skip else 0)
    torch.testing.assert_close(out.x_hat, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        {**out.losses, **out.logs}["mse"],  # the logged mse: unweighted for every architecture
        (y - ref).pow(2).sum(1).mean(),
        atol=1e-4,
        rtol=1e-5,
    )
    sum(out.losses.values()).backward()
    assert m.W_dec.grad is not None and float(m.W_dec.grad.abs().sum()) > 0
    if skip and arch != "matryoshka":  # matryoshka: skip enters every prefix loss (see its own test)
        torch.testing.assert_close(m.W_skip.grad, -2 * (y - ref).T @ x / 32, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="expects input of shape"):
        m(y)
    m.eval()
    m.save_pretrained(tmp_path / arch)
    m2 = from_pretrained(tmp_path / arch)
    assert m2.cfg.target == "mlp_out.6" and (m2.W_skip is not None) == skip
    with torch.no_grad():
        torch.testing.assert_close(m2(x, y).x_hat, m(x, y).x_hat, atol=1e-5, rtol=1e-5)


def test_planted_skip_transcoder_recovers_output_atoms(tmp_path):
    """y = c A_out + x Mᵀ with x = c A_in + u: a TopK skip transcoder must recover the output atoms (mean max
    |cos| ≥ 0.95) and the linear part (‖W_skip − M‖ / ‖M‖ < 0.2).

    u ~ N(0, 0.5² I) is a dense part of x that no sparse code explains. Without it the planted decomposition
    is not identifiable: x Mᵀ = c (A_in Mᵀ), so for any Δ, W_skip = M − Δ with atoms A_out + A_in Δᵀ fits y
    exactly. The dense part of y, u Mᵀ, can only be fitted by W_skip = M. The W_skip error plateaus near 0.14
    (the code read from the noisy x is imperfect), hence the bound 0.2 (runs: benchmarks/RESULTS_defaults.md).
    """
    g = torch.Generator().manual_seed(100)  # ≠ the model's seed 0 (same RNG stream otherwise)
    n_atoms, k, N, d_in, d_out = 128, 4, 30_000, 48, 32
    a_in = torch.nn.functional.normalize(torch.randn(n_atoms, d_in, generator=g), dim=1)
    a_out = torch.nn.functional.normalize(torch.randn(n_atoms, d_out, generator=g), dim=1)
    M = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    idx = torch.rand(N, n_atoms, generator=g).argsort(1)[:, :k]
    c = torch.rand(N, k, generator=g) * 2 + 0.5
    x = torch.einsum("nk,nkd->nd", c, a_in[idx]) + 0.5 * torch.randn(N, d_in, generator=g)
    y = torch.einsum("nk,nkd->nd", c, a_out[idx]) + x @ M.T + 0.01 * torch.randn(N, d_out, generator=g)
    from sparsedict.dictionaries.topk import TopKConfig

    torch.manual_seed(0)
    cfg = TopKConfig(hookpoint="a", target="b", d_in=d_in, d_out=d_out, n_latents=256, k=k, skip=True)
    m = build(cfg.resolved(d_in, d_out))
    assert mean_max_cosine(m.W_dec, a_out) < 0.6  # the start is not the answer
    # Plain Adam pinned: the bounds above were measured with it at lr 4e-3.
    last = train_dictionary(
        m, x, y, epochs=20, lr=4e-3, optimizer="adam", out_dir=str(tmp_path), dead_tokens=20_000
    )
    score = mean_max_cosine(m.W_dec, a_out)
    skip_err = float((m.W_skip - M).norm() / M.norm())
    assert score >= 0.95, f"mean max cosine {score:.3f} < 0.95 (last metrics {last})"
    assert skip_err < 0.2, f"W_skip relative error {skip_err:.3f} ≥ 0.2"
