"""CPU (numba) kernels against their plain-torch references: exact selection, tight fp32 bounds."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import encode_inputs, err_ratio
from sparsedict.kernels import normalised_adam_step, sparse_cpu, sparse_decode, topk_cpu, topk_encode
from sparsedict.kernels.normalised_update import normalised_adam_update_numba, normalised_adam_update_ref

pytestmark = pytest.mark.skipif(not topk_cpu.numba_available(), reason="numba not installed")


def _brute(pre: torch.Tensor, k: int):
    vals, idx = pre.sort(dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def _hard_rows(B: int, n: int, seed: int) -> torch.Tensor:
    """Continuous rows plus rows made to break a threshold-then-select: ties across the k-th value, an
    all-equal row (every entry a candidate: the fallback), -inf entries, a row sorted ascending."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, n, generator=g)
    pre[:6] = (pre[:6] * 2).round()  # few levels: ties everywhere
    pre[6] = 0.0
    pre[7, : n // 2] = float("-inf")
    pre[8] = torch.arange(n, dtype=torch.float32)
    pre[9, n // 3 :] = pre[9, : n - n // 3].clone()  # duplicated values at other indices
    pre[10] = pre[10].abs() * 1e-30  # tiny magnitudes, denormals in bf16
    return pre


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(97, 1), (97, 32), (600, 5), (4608, 32), (5000, 64), (1031, 128)])
def test_threshold_select_equals_stable_sort(dtype, n, k):
    """Threshold-then-select (and its heap fallback) == the first k of a stable descending sort, ties ->
    lower index, on fp32 and bf16 rows (n=97 and k=128 at n=1031 take the heap path: rows under 2·max(256, 2k))."""
    pre = _hard_rows(40, n, seed=n + k).to(dtype)
    v, i = topk_cpu.select_topk_cpu(pre, k)
    bv, bi = _brute(pre, k)
    assert v.dtype == dtype and torch.equal(i, bi) and torch.equal(v, bv)
    hv, hi = topk_cpu.select_topk_cpu(pre, k, lanes=0)  # the whole-row heap scan alone
    assert torch.equal(hi, bi) and torch.equal(hv, bv)


@pytest.mark.parametrize("distinct", [True, False])
def test_threshold_select_with_more_than_2k_candidates(distinct):
    """Rows whose threshold admits between 2k and the buffer's capacity of candidates (3 large entries in
    each of k columns: 3k candidates) take the heap over the candidates, not the rank count; the result
    is still a stable sort's first k, with distinct values and with all large entries tied."""
    B, n, k, W = 6, 4608, 32, topk_cpu.default_lanes(4608, 32)
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(B, n, generator=g)
    for b in range(B):
        cols = torch.randperm(W, generator=g)[:k]
        for r, c in enumerate(cols.tolist()):
            for s in range(3):
                j = c + W * int(torch.randint(0, n // W, (1,), generator=g)) if s else c + W * (b + 1)
                pre[b, j] = 5.0 + (1e-3 * r + 1e-4 * s if distinct else 0.0)
    t = pre.view(B, n // W, W).amax(1).topk(k).values[:, -1:]  # the threshold pass's t
    assert ((2 * k < (pre >= t).sum(1)) & ((pre >= t).sum(1) <= 4 * k)).all()  # heap path, within capacity
    v, i = topk_cpu.select_topk_cpu(pre, k)
    bv, bi = _brute(pre, k)
    assert torch.equal(i, bi) and torch.equal(v, bv)


def test_select_counts_fallback_rows_on_ties():
    """An all-equal row overflows the candidate buffer; the result is still the lowest k indices."""
    pre = torch.zeros(3, 4608)
    pre[1, 100] = 1.0
    _, i = topk_cpu.select_topk_cpu(pre, 32)
    assert torch.equal(i[0], torch.arange(32)) and torch.equal(i[2], torch.arange(32))
    assert i[1, 0] == 100 and torch.equal(i[1, 1:], torch.arange(31))


@pytest.mark.parametrize("chunk", [7, 256, 10_000])
def test_topk_encode_cpu_equals_reference(chunk, monkeypatch):
    """Chunked GEMM + selection: indices identical to the reference; values bitwise equal when the GEMM
    is one call like the reference's (chunk >= B), else within 1e-6 (the BLAS may block a 7-row GEMM
    differently, so the last bits of a pre-activation can differ); gradients to 1e-6 (fp32 sums in another
    order), with and without a gradient for x."""
    monkeypatch.setattr(sparse_cpu, "ENCODE_CHUNK", chunk)
    x, W, b = encode_inputs(600, 40, 700, torch.float32, "dupcols", seed=3)
    g = torch.randn(600, 16, generator=torch.Generator().manual_seed(4))
    got = {}
    for backend in ("cpu", "ref"):
        v, i = topk_encode(x, W, b, 16, backend=backend)
        (v * g).sum().backward()
        got[backend] = (v.detach(), i, [t.grad.clone() for t in (x, W, b)])
        for t in (x, W, b):
            t.grad = None
    (v1, i1, g1), (v2, i2, g2) = got["cpu"], got["ref"]
    assert torch.equal(i1, i2) and (torch.equal(v1, v2) if chunk >= 600 else err_ratio(v1, v2) < 1e-6)
    for a, r in zip(g1, g2, strict=True):
        assert err_ratio(a, r) < 1e-6


def test_topk_encode_cpu_bf16_autocast_bound():
    """Under CPU bf16 autocast the GEMM runs in bf16. Bound on the selected values against the fp32
    pre-activation: x and W are rounded to bf16 (relative 2^-9 each, so each product is off by at most
    2^-8 + 2^-18 of |x_i w_i|), products are summed in fp32 (error ~d·2^-24, negligible) and the output is
    rounded to bf16 (2^-9 of |pre|): |v − pre| <= 2^-7 (Σ_i |x_i W_i| + |b|). On inputs exactly
    representable in bf16 with exact sums ('grid') the selection equals the fp32 reference exactly."""
    x, W, b = encode_inputs(50, 64, 600, torch.float32, "randn", seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v, i = topk_encode(x, W, b, 24, backend="cpu")
    assert v.dtype == torch.float32
    pre = (x @ W + b).detach()
    scale = (x.abs() @ W.abs() + b.abs()).detach()
    assert ((v - pre.gather(1, i).relu()).abs() <= 2**-7 * scale.gather(1, i)).all()
    x, W, b = encode_inputs(50, 64, 600, torch.float32, "grid", seed=6)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v, i = topk_encode(x, W, b, 24, backend="cpu")
        rv, ri = topk_encode(x, W, b, 24, backend="ref")
    assert torch.equal(i, ri) and torch.equal(v, rv)


def test_sparse_decode_cpu_equals_reference():
    g = torch.Generator().manual_seed(0)
    B, n, d, k = 90, 300, 33, 12
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    val = torch.randn(B, k, generator=g)
    val[:5, :3] = 0.0  # zero entries are skipped: the result must not change
    val.requires_grad_()
    W = torch.randn(n, d, generator=g, requires_grad=True)
    b = torch.randn(d, generator=g, requires_grad=True)
    up = torch.randn(B, d, generator=g)
    got = {}
    for backend in ("cpu", "ref"):
        out = sparse_decode(idx, val, W, b, backend=backend)
        out.backward(up)
        got[backend] = (out.detach(), [t.grad.clone() for t in (val, W, b)])
        for t in (val, W, b):
            t.grad = None
    assert err_ratio(got["cpu"][0], got["ref"][0]) < 1e-6
    for a, r in zip(got["cpu"][1], got["ref"][1], strict=True):
        assert err_ratio(a, r) < 1e-6
    # int32 indices and no bias take the same path
    out = sparse_decode(idx.int(), val.detach(), W.detach(), backend="cpu")
    assert err_ratio(out, sparse_decode(idx, val.detach(), W.detach(), backend="ref")) < 1e-6


def test_grouped_sum_and_counting_sort_against_index_add():
    """Stable counting sort by latent; grouped sums ([n, d] and transposed [d, n]) == fp64 index_add."""
    g = torch.Generator().manual_seed(2)
    B, n, d, k = 200, 77, 21, 9
    idx = torch.randint(0, n - 7, (B, k), generator=g)  # the last latents never appear: exact zeros
    coef = torch.randn(B, k, generator=g)
    X = torch.randn(B, d, generator=g)
    offsets, order = sparse_cpu.group_by_latent(idx, n)
    flat = idx.reshape(-1)
    assert torch.equal(order, torch.sort(flat, stable=True).indices)
    assert torch.equal(offsets[1:] - offsets[:-1], torch.bincount(flat, minlength=n))
    ref = torch.zeros(n, d, dtype=torch.float64)
    for j in range(k):
        ref.index_add_(0, idx[:, j], coef[:, j : j + 1].double() * X.double())
    ref_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, flat, coef.reshape(-1).double())
    out, s = sparse_cpu.grouped_sum(idx, coef, X, n, with_sum=True)
    outT, _ = sparse_cpu.grouped_sum(idx, coef, X, n, transpose=True)
    assert err_ratio(out, ref) < 1e-6 and err_ratio(s, ref_sum) < 1e-6
    assert torch.equal(outT, out.T) and (out[n - 7 :] == 0).all()


def test_numba_normalised_adam_equals_reference_and_fp64():
    """One-pass numba update == the unfused torch reference (fp32, 1e-6 over 5 steps) and is as close to
    an fp64 run of the same reference."""
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(70, 33, generator=g)
    W0 /= W0.norm(dim=1, keepdim=True)
    runs = {name: [W0.clone().to(dt), torch.zeros(70, 33, dtype=dt), torch.zeros(70, 33, dtype=dt)]
            for name, dt in (("numba", torch.float32), ("ref", torch.float32), ("fp64", torch.float64))}  # fmt: skip
    for step in range(1, 6):
        G = torch.randn(70, 33, generator=g)
        for name, (W, m, v) in runs.items():
            fn = normalised_adam_update_numba if name == "numba" else normalised_adam_update_ref
            fn(W, G.clone().to(W.dtype), m, v, step, 3e-3, (0.9, 0.99), 1e-7, 0.01)
    for i in range(3):
        e_numba = err_ratio(runs["numba"][i], runs["fp64"][i])
        e_ref = err_ratio(runs["ref"][i], runs["fp64"][i])
        assert err_ratio(runs["numba"][i], runs["ref"][i]) < 1e-6
        assert e_numba < max(2 * e_ref, 1e-7)
    # the dispatch picks it on CPU and keeps torch.optim.Adam's state layout
    W = W0.clone().requires_grad_()
    W.grad = torch.randn_like(W)
    state: dict = {}
    normalised_adam_step(W, state, lr=1e-3)
    assert float(state["step"]) == 1.0 and state["exp_avg"].shape == W.shape
    assert torch.allclose(W.detach().norm(dim=1), torch.ones(70), atol=1e-6)


def test_cpu_backend_refuses_what_it_cannot_take():
    x, W, b = encode_inputs(4, 8, 20, torch.float64, "randn")
    with pytest.raises(RuntimeError, match="backend='cpu' takes CPU tensors"):
        topk_encode(x, W, b, 3, backend="cpu")
    v, _ = topk_encode(x, W, b, 3)  # auto: float64 goes to the reference
    assert v.dtype == torch.float64
