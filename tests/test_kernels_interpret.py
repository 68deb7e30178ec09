"""Every Triton kernel against its reference under ``TRITON_INTERPRET=1`` on CPU (these run in CI).

The kernels are wrapped in ``LazyJit``, which decorates them at launch according to ``TRITON_INTERPRET``
at that moment, so setting it per test (monkeypatch) is enough and does not leak into other test files.
Shapes are tiny and deliberately off the tile sizes (the interpreter is slow). Bounds are error ratios
(relative RMS): fp32 1e-5, bf16 2e-2 (bf16 rounding of outputs and gradients only: the 'grid' inputs make
every pre-activation exact, so the selected indices must agree exactly in both dtypes).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import encode_inputs, err_ratio, triton_interpreter_module

if torch.cuda.is_available():
    pytest.skip("a GPU is present: test_kernels_gpu.py runs the compiled kernels", allow_module_level=True)

# Triton's interpreter must be on when ``triton`` is first imported (its standard library, tl.min/tl.sort,
# is decorated then). If another test already imported it compiled, rerun this file in a fresh process.
test_interpreter_in_fresh_process, _interpret = triton_interpreter_module(__file__)
pytest.importorskip("triton")

from sparsedict.kernels import normalised_adam_step, sparse_decode, topk_encode  # noqa: E402
from sparsedict.kernels.sparse_decode import segment_sum  # noqa: E402
from sparsedict.kernels.topk_encode import topk_encode_fwd  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

ENCODE_CASES = [
    # B, d, n, k, dtype, kind
    (13, 24, 100, 5, torch.float32, "randn"),
    (9, 30, 257, 1, torch.float32, "randn"),
    (5, 24, 40, 40, torch.float32, "randn"),  # k = n
    (9, 40, 130, 33, torch.float32, "dupcols"),  # exact ties between columns
    (11, 36, 150, 12, torch.bfloat16, "grid"),  # bf16 with many exact ties
    (5, 26, 90, 70, torch.float32, "grid"),  # k in the 64 < k <= 128 tile config
]


def _id(c):
    B, d, n, k, dt, kind = c
    return f"B{B}-d{d}-n{n}-k{k}-{str(dt)[6:]}-{kind}"


@pytest.mark.parametrize("algorithm", ["merge", "filter"])
@pytest.mark.parametrize("case", ENCODE_CASES, ids=_id)
def test_topk_encode_forward_and_grads(case, algorithm):
    B, d, n, k, dtype, kind = case
    x, W, b = encode_inputs(B, d, n, dtype, kind, seed=B)
    g = torch.randn(B, k, generator=torch.Generator().manual_seed(1)).to(dtype) * torch.linspace(
        0.1, 2, k
    ).to(dtype)
    v_ref, i_ref = topk_encode(x, W, b, k, backend="ref")
    v_ref.backward(g)
    grads_ref = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    v, i = topk_encode(x, W, b, k, backend="triton", algorithm=algorithm)
    v.backward(g)
    assert i.dtype == torch.int64 and v.dtype == dtype
    # same set, same order (value descending, ties by lower index)
    assert torch.equal(i, i_ref), "selected indices differ from the reference"
    assert err_ratio(v, v_ref) <= TOL[dtype] * 0.01  # values are the same fp32 numbers, cast once
    for name, t, r in zip(("x", "W_enc", "b_enc"), (x, W, b), grads_ref):
        assert err_ratio(t.grad, r) < TOL[dtype], f"grad {name}"


def test_topk_encode_split_merge_exact():
    """Latent axis split 4 ways with 32-wide tiles: the merge of per-split candidates is exact."""
    x, W, b = encode_inputs(10, 20, 230, torch.float32, "dupcols", seed=5)
    with torch.no_grad():
        v_ref, i_ref = topk_encode(x, W, b, 9, backend="ref")
        for splits in (1, 2, 4):
            v, i = topk_encode_fwd(
                x, W, b, 9, splits=splits, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
            )
            assert torch.equal(i, i_ref), f"splits={splits}"
            assert err_ratio(v, v_ref) < 1e-6


def test_topk_encode_negative_preacts_relu():
    """Rows whose selected pre-activations are negative return zeros (ReLU) and zero gradients. Grid inputs:
    every pre-activation is exact, so the values agree bit for bit whatever order either GEMM sums in (with
    continuous inputs a multi-threaded reference GEMM can round differently)."""
    x, W, b = encode_inputs(6, 16, 90, torch.float32, "grid", seed=2)
    with torch.no_grad():
        b.sub_(10.0)
        b[:3].add_(20.0)  # three live latents
    v, i = topk_encode(x, W, b, 5, backend="triton")
    v_ref, i_ref = topk_encode(x, W, b, 5, backend="ref")
    assert torch.equal(i, i_ref) and torch.equal(v, v_ref)
    assert (v[:, 3:] == 0).all() and (v[:, :3] > 0).all()
    v.sum().backward()
    assert (b.grad[3:] == 0).all()


# Filter path with small tiles so that every shape spans several row and latent tiles (B, n, d off the tiles;
# d = 20 is not a multiple of BLOCK_K = 16, d = 32 is: both K-loop variants).
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
FILTER_CASES = [
    # B, d, n, k, dtype, kind, S, slots
    (37, 20, 230, 7, torch.float32, "dupcols", 4, "atomic"),
    (29, 32, 197, 16, torch.bfloat16, "grid", 4, "atomic"),  # bf16, many exact ties
    (21, 20, 161, 3, torch.float32, "grid", 16, "scan"),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: _id(c[:6]) + f"-S{c[6]}-{c[7]}")
def test_topk_encode_filter_multi_tile(case):
    B, d, n, k, dtype, kind, S, slots = case
    x, W, b = encode_inputs(B, d, n, dtype, kind, seed=n)
    stats: dict = {}
    cfg = {**SMALL_TILES, "S": S, "slots": slots}
    with torch.no_grad():
        v_ref, i_ref = topk_encode(x, W, b, k, backend="ref")
        v, i = topk_encode_fwd(x, W, b, k, algorithm="filter", config=cfg, stats=stats)
    assert torch.equal(i, i_ref)
    assert err_ratio(v, v_ref) <= TOL[dtype] * 0.01
    counts, C = stats["counts"], stats["config"]["C"]
    assert ((counts >= k) & (counts <= C)).all(), "no row should need the fallback here"
    assert counts.sum() < B * n / 2, "the threshold should discard most entries"


def test_topk_encode_filter_fallback_exact():
    """Rows the filter cannot finish — list overflow (tiny C) or a threshold above the k-th value (margin
    pushed negative) — are redone by the masked merge kernels; every row still equals the reference."""
    B, d, n, k = 24, 20, 200, 6
    x, W, b = encode_inputs(B, d, n, torch.float32, "dupcols", seed=3)
    with torch.no_grad():
        v_ref, i_ref = topk_encode(x, W, b, k, backend="ref")
        for cfg, kind in (({"C": 40, "S": 8}, "overflow"), ({"margin": -1.0, "S": 8}, "under")):
            stats: dict = {}
            v, i = topk_encode_fwd(x, W, b, k, algorithm="filter", config={**SMALL_TILES, **cfg}, stats=stats)
            counts, C = stats["counts"], stats["config"]["C"]
            bad = (counts > C) if kind == "overflow" else (counts < k)
            assert 0 < bad.sum() < B, (
                f"{kind}: want a mix of fallback and filtered rows, counts {counts.tolist()}"
            )
            assert torch.equal(i, i_ref), kind
            assert err_ratio(v, v_ref) < 1e-7, kind  # fp32 dot vs torch GEMM: summation order only
        # stage C with torch.topk on the keys, fallback rows overwritten after it
        v, i = topk_encode_fwd(
            x, W, b, k, algorithm="filter", config={**SMALL_TILES, "C": 40, "select": "torch"}
        )
        assert torch.equal(i, i_ref) and err_ratio(v, v_ref) < 1e-7
        # every row on the fallback (C < k)
        v, i = topk_encode_fwd(x, W, b, k, algorithm="filter", config={**SMALL_TILES, "C": k - 1})
        assert torch.equal(i, i_ref) and err_ratio(v, v_ref) < 1e-7


def test_topk_encode_filter_all_equal_rows():
    """Rows whose pre-activations are all equal (x = 0, constant bias) tie everywhere: the list overflows and
    the fallback returns the k lowest indices; a zero-row batch returns empty outputs. Grid inputs, so every
    pre-activation is exact (see test_topk_encode_negative_preacts_relu)."""
    x, W, b = encode_inputs(9, 16, 70, torch.float32, "grid", seed=4)
    with torch.no_grad():
        x[2:5] = 0
        b.fill_(0.25)
        v, i = topk_encode_fwd(x, W, b, 4, algorithm="filter", config=SMALL_TILES)
        v_ref, i_ref = topk_encode(x, W, b, 4, backend="ref")
        assert torch.equal(i, i_ref) and torch.equal(v, v_ref)
        assert torch.equal(i[2:5], torch.arange(4).expand(3, 4))
        v0, i0 = topk_encode_fwd(x[:0], W, b, 4, algorithm="filter")
        assert v0.shape == (0, 4) and i0.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["tiled", "torch"])
def test_segment_sum_impls(dtype, impl):
    """Grouped sums (W gradients): both implementations, [n, d] and transposed [d, n] outputs, bias sums,
    latents used many times and unused latents, several latent blocks and d-blocks."""
    B, k, n, d = 19, 6, 75, 37
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(0, n, (B, k), generator=gen)
    idx[:, 0] = 3  # one latent in every row: a run longer than BLOCK_E
    coef = torch.randn(B, k, generator=gen).to(dtype).float()
    x = torch.randn(B, d, generator=gen).to(dtype)
    ref = torch.zeros(n, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), coef.reshape(-1, 1).double() * x.double().repeat_interleave(k, 0)
    )
    ref_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.reshape(-1), coef.reshape(-1).double())
    cfg = {"LAT_BLOCK": 16, "BLOCK_E": 16, "BLOCK_D": 16}
    out, s = segment_sum(idx, coef, x, n, with_sum=True, impl=impl, config=cfg)
    assert out.shape == (n, d) and out.dtype == torch.float32
    assert err_ratio(out, ref) < 1e-6 and err_ratio(s, ref_sum) < 1e-6
    outT, _ = segment_sum(idx, coef, x, n, out_dtype=dtype, transpose_out=True, impl=impl, config=cfg)
    assert outT.shape == (d, n) and outT.is_contiguous() and outT.dtype == dtype
    assert err_ratio(outT.T, ref) < TOL[dtype] * 0.5
    unused = torch.ones(n, dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert (out[unused] == 0).all() and (s[unused] == 0).all()


DECODE_CASES = [
    (13, 5, 37, 29, torch.float32, True),
    (21, 33, 70, 50, torch.float32, False),
    (9, 7, 40, 72, torch.bfloat16, True),
]


@pytest.mark.parametrize(
    "case", DECODE_CASES, ids=lambda c: f"B{c[0]}-k{c[1]}-n{c[2]}-d{c[3]}-{str(c[4])[6:]}-bias{c[5]}"
)
def test_sparse_decode_forward_and_grads(case):
    B, k, n, d, dtype, bias = case
    gen = torch.Generator().manual_seed(k)
    idx = torch.randint(0, n, (B, k), generator=gen)  # duplicates within a row allowed
    idx[0, : min(k, 3)] = n - 1  # a latent used several times, and the last row of W_dec
    val = torch.randn(B, k, generator=gen).to(dtype).requires_grad_()
    W = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(d, generator=gen).to(dtype).requires_grad_() if bias else None
    g = (torch.randn(B, d, generator=gen) * torch.rand(B, 1, generator=gen) * 3).to(dtype)
    leaves = [t for t in (val, W, b) if t is not None]
    out_ref = sparse_decode(idx, val, W, b, backend="ref")
    out_ref.backward(g)
    grads_ref = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    out = sparse_decode(idx, val, W, b, backend="triton")
    out.backward(g)
    assert out.dtype == dtype
    assert err_ratio(out, out_ref) < TOL[dtype]
    for t, r in zip(leaves, grads_ref):
        assert err_ratio(t.grad, r) < TOL[dtype]
    unused = torch.ones(n, dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert (W.grad[unused] == 0).all()


@pytest.mark.parametrize("d", [29, 64])
def test_normalised_adam_triton_vs_ref(d):
    gen = torch.Generator().manual_seed(d)
    W0 = torch.randn(37, d, generator=gen)
    W0 /= W0.norm(dim=1, keepdim=True)
    W1, W2 = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    s1: dict = {}
    s2: dict = {}
    for _ in range(3):
        G = torch.randn(37, d, generator=gen) * torch.rand(37, 1, generator=gen)
        W1.grad, W2.grad = G.clone(), G.clone()
        normalised_adam_step(W1, s1, 1e-2, (0.9, 0.999), 1e-8, weight_decay=0.1, backend="ref")
        normalised_adam_step(W2, s2, 1e-2, (0.9, 0.999), 1e-8, weight_decay=0.1, backend="triton")
    assert err_ratio(W2, W1) < 1e-6
    assert err_ratio(s2["exp_avg"], s1["exp_avg"]) < 1e-6
    assert err_ratio(s2["exp_avg_sq"], s1["exp_avg_sq"]) < 1e-6
    assert torch.allclose(W2.detach().norm(dim=1), torch.ones(37), atol=1e-6)


def test_topk_training_steps_fused_vs_reference(monkeypatch):
    """A TopK SAE trained 4 steps (Adam + decoder-normalised update) with the kernels equals the reference.

    Tolerance: parameters agree to an error ratio of 1e-4 after 4 steps (fp32; only summation order differs).
    """
    from sparsedict.dictionaries import build
    from sparsedict.dictionaries.topk import TopKConfig

    def run(force: bool) -> dict[str, torch.Tensor]:
        if force:
            monkeypatch.setenv("SPARSEDICT_FORCE_TRITON", "1")
        else:
            monkeypatch.delenv("SPARSEDICT_FORCE_TRITON", raising=False)
        torch.manual_seed(0)
        model = build(TopKConfig(d_in=24, n_latents=96, k=6, aux_alpha=0.0, b_dec_init="zero"))
        data = torch.randn(4, 32, 24, generator=torch.Generator().manual_seed(7))
        others = [p for n_, p in model.named_parameters() if n_ != "W_dec"]
        opt = torch.optim.Adam(others, lr=3e-3)
        dec_state: dict = {}
        for x in data:
            out = model(x)
            loss = sum(out.losses.values())
            opt.zero_grad()
            model.W_dec.grad = None
            loss.backward()
            opt.step()
            normalised_adam_step(model.W_dec, dec_state, lr=3e-3)
        return {n_: p.detach().clone() for n_, p in model.named_parameters()}

    ref, fused = run(False), run(True)
    for name in ref:
        assert err_ratio(fused[name], ref[name]) < 1e-4, name
