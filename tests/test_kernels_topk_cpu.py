"""The CPU fast paths of a TopK training step give the same results as the plain versions they replace."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import err_ratio
from sparsedict.kernels import topk_cpu, topk_encode
from sparsedict.kernels.topk_encode import select_topk, sparse_encoder_backward_ref

from sparsedict.dictionaries import build
from sparsedict.dictionaries.topk import TopKConfig


def _brute(pre: torch.Tensor, k: int):
    vals, idx = pre.sort(dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 32, 97])
def test_numba_topk_equals_stable_sort_with_ties(dtype, k):
    g = torch.Generator().manual_seed(k)
    pre = torch.randn(50, 97, generator=g)
    pre[:10] = pre[:10].round()  # many ties, also across the k-th boundary
    pre[10, :] = 0.0
    pre[11, 40:] = pre[11, :57].clone()
    pre = pre.to(dtype)
    assert topk_cpu.supported(pre, k)
    v, i = topk_cpu.select_topk_cpu(pre, k)
    bv, bi = _brute(pre, k)
    assert v.dtype == dtype and torch.equal(i, bi) and torch.equal(v, bv)


def test_torch_path_tie_check_without_dense_pass(monkeypatch):
    """The torch path (GPU / no numba) finds the tied rows from the (k+1)-th value alone."""
    monkeypatch.setattr(topk_cpu, "supported", lambda pre, k: False)
    g = torch.Generator().manual_seed(0)
    for k in (1, 8, 40):
        pre = (torch.randn(64, 40, generator=g) * 2).round()
        v, i = select_topk(pre, k)
        bv, bi = _brute(pre, k)
        assert torch.equal(i, bi) and torch.equal(v, bv)


def test_grouped_encoder_backward_equals_index_add():
    """gW_enc as an embedding bag grouped by latent == the per-slot index_add it replaced; gx likewise."""
    g = torch.Generator().manual_seed(1)
    B, d, n, k = 300, 24, 77, 9
    x, W = torch.randn(B, d, generator=g), torch.randn(d, n, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    gp = torch.randn(B, k, generator=g)
    gx, gW, gb = sparse_encoder_backward_ref(x, W, gp, idx, (True, True, True))
    ref_W = torch.zeros(n, d, dtype=torch.float64)
    ref_x = torch.zeros(B, d, dtype=torch.float64)
    for j in range(k):
        ref_W.index_add_(0, idx[:, j], gp[:, j : j + 1].double() * x.double())
        ref_x += gp[:, j : j + 1].double() * W.double().T[idx[:, j]]
    ref_b = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.reshape(-1), gp.reshape(-1).double())
    assert err_ratio(gW, ref_W.T) < 1e-6 and err_ratio(gx, ref_x) < 1e-6 and err_ratio(gb, ref_b) < 1e-6


def test_topk_bdec_gradient_trick_is_exact():
    """TopK.encode folds b_dec's encoder gradient into a bias term: same values, same gradients."""
    torch.manual_seed(0)
    model = build(TopKConfig(d_in=20, n_latents=64, k=5, aux_alpha=0).resolved(20))
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    x = torch.randn(40, 20) + 2.0
    g = torch.randn(40, 5)
    code = model.encode(x)
    (code.values * g).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    v, i = topk_encode(x - model.b_dec, model.W_enc, model.b_enc, 5)  # the plain formulation
    (v * g).sum().backward()
    assert torch.equal(code.indices, i) and torch.equal(code.values, v)
    for n, p in model.named_parameters():
        if n in got:
            assert err_ratio(got[n], p.grad) < 1e-6, n
    assert got["b_dec"].abs().sum() > 0
