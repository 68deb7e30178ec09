"""Plain-torch kernel references and dispatch rules (fast; no Triton involved)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import encode_inputs, err_ratio
from sparsedict.kernels import normalised_adam_step, sparse_decode, topk_encode
from sparsedict.kernels.topk_encode import select_topk


def brute_topk(pre: torch.Tensor, k: int):
    """Independent top-k: full stable sort by (value desc, index asc)."""
    vals, idx = pre.sort(dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


@pytest.mark.parametrize("kind", ["randn", "grid", "dupcols"])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_select_topk_matches_stable_sort(kind, k):
    x, W, b = encode_inputs(19, 24, 64, torch.float32, kind)
    pre = (x @ W + b).detach()
    v, i = select_topk(pre, k)
    bv, bi = brute_topk(pre, k)
    assert torch.equal(i, bi) and torch.equal(v, bv)


@pytest.mark.parametrize("k", [3, 16])
def test_topk_encode_ref_values_and_grads_vs_dense_autograd(k):
    """Sparse backward of the reference equals dense autograd through topk + ReLU."""
    x, W, b = encode_inputs(23, 40, 130, torch.float32, "randn", seed=1)
    g = torch.randn(23, k, generator=torch.Generator().manual_seed(2))
    v, i = topk_encode(x, W, b, k, backend="ref")
    v.backward(g)
    got = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    pre = x @ W + b
    dense_v = pre.gather(1, i).relu()
    dense_v.backward(g)
    assert torch.equal(v, dense_v.detach())
    for a, r in zip(got, (x.grad, W.grad, b.grad)):
        assert err_ratio(a, r) < 1e-6


def test_sparse_decode_ref_vs_dense():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (11, 6), generator=g)
    val = torch.randn(11, 6, generator=g)
    W = torch.randn(50, 20, generator=g)
    b = torch.randn(20, generator=g)
    dense = torch.zeros(11, 50).scatter_add_(1, idx, val)
    assert err_ratio(sparse_decode(idx, val, W, b, backend="ref"), dense @ W + b) < 1e-6


def test_normalised_adam_ref_equals_torch_adam_sequence():
    """Fused-update reference == remove-parallel-grad + torch.optim.Adam + renormalise (the unfused trainer)."""
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(30, 17, generator=g)
    W0 /= W0.norm(dim=1, keepdim=True)
    W1 = W0.clone().requires_grad_()
    W2 = W0.clone().requires_grad_()
    opt = torch.optim.Adam([W2], lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.01)
    state: dict = {}
    for _ in range(4):
        G = torch.randn(30, 17, generator=g)
        W1.grad = G.clone()
        normalised_adam_step(
            W1, state, lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.01, backend="ref"
        )
        W2.grad = G.clone()
        with torch.no_grad():
            w = W2 / (W2.norm(dim=1, keepdim=True) + 1e-8)
            W2.grad.sub_((W2.grad * w).sum(1, keepdim=True) * w)
        opt.step()
        with torch.no_grad():
            W2.div_(W2.norm(dim=1, keepdim=True) + 1e-8)
    assert err_ratio(W1, W2) < 1e-6
    assert err_ratio(state["exp_avg_sq"], opt.state[W2]["exp_avg_sq"]) < 1e-6
    assert float(state["step"]) == 4.0
    assert torch.allclose(W1.norm(dim=1), torch.ones(30), atol=1e-6)


def test_dispatch_errors():
    x, W, b = encode_inputs(4, 8, 20, torch.float32, "randn")
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_encode(x, W, b, 3, backend="cuda")
    with pytest.raises(ValueError, match=r"k=21 must be in 1\.\.n=20"):
        topk_encode(x, W, b, 21)
    with pytest.raises(ValueError, match="do not match"):
        topk_encode(x.T, W, b, 3)
    with pytest.raises(ValueError, match="b_enc"):
        topk_encode(x, W, b[:5], 3)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        topk_encode(x, W, b, 3, algorithm="heap")
    with pytest.raises(ValueError, match=r"must both be \[B, k\]"):
        sparse_decode(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2), W.T)
    from sparsedict.kernels.topk_encode import ALGORITHMS, DEFAULT_ALGORITHM, default_filter_config

    assert DEFAULT_ALGORITHM in ALGORITHMS
    # the benchmark shape: k·S = 256 candidates (S=8 was the fastest on an H100), C = 2·k·S slots
    cfg = default_filter_config(32, 32768, torch.bfloat16)
    assert cfg["S"] == 8 and cfg["C"] == 512
    assert default_filter_config(5, 100, torch.float32)["S"] * 4 * 5 <= 100  # sample at least 4k wide
    with pytest.raises(KeyError, match="exp_avg"):
        W.grad = torch.zeros_like(W)
        normalised_adam_step(W, {"step": torch.tensor(0.0)}, lr=1e-3)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, b = encode_inputs(4, 8, 20, torch.float32, "randn")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        topk_encode(x, W, b, 3, backend="triton")


def test_auto_backend_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("SPARSEDICT_FORCE_TRITON", raising=False)
    from sparsedict.kernels import use_triton

    assert not use_triton(torch.zeros(1))
