"""The sparse CPU training step of ReLU, JumpReLU and Gated against their dense path: selection kernel ==
its torch reference; forward values, every loss term and every parameter gradient equal the dense step's
(fp32 summation order only), on both sides of the dense fallback's boundary, for SAEs, b_dec-free
encoders, skip transcoders and bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_dict
from sparsedict.kernels import active_cpu, sparse_cpu, topk_cpu

from sparsedict.dictionaries import active

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not topk_cpu.numba_available(), reason="numba not installed"),
]


@pytest.mark.parametrize("with_shift", [False, True])
def test_select_active_equals_reference(with_shift):
    """Active entries per row in latent order (CSR) == the torch reference, and the cap's None, on rows with
    ties at the boundary, an empty row, a full row and -inf entries."""
    g = torch.Generator().manual_seed(1)
    B, n = 50, 300
    z = torch.randn(B, n, generator=g)
    z[:5] = z[:5].round()  # exact zeros and ties with -shift
    z[5] = -1.0  # no active entry
    z[6, :100] = float("-inf")
    z[7] = 5.0  # every entry active
    shift = (torch.randn(n, generator=g) * 0.5).round() if with_shift else None
    nnz = int(((z + (0 if shift is None else shift)) > 0).sum())
    got, ref = active_cpu.select_active(z, shift, nnz), active_cpu.select_active_ref(z, shift, nnz)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert got[1].numel() == nnz and int(got[0][8] - got[0][7]) == n
    assert active_cpu.select_active(z, shift, nnz - 1) is None
    assert active_cpu.select_active_ref(z, shift, nnz - 1) is None


def test_csr_decode_equals_embedding_bag():
    """The CSR decode and its backward (values, W_dec, b_dec) == torch's embedding_bag with offsets."""
    g = torch.Generator().manual_seed(2)
    B, n, d = 30, 200, 24
    counts = torch.randint(0, 40, (B,), generator=g)
    counts[3] = 0
    rowptr = torch.zeros(B + 1, dtype=torch.int64)
    rowptr[1:] = counts.cumsum(0)
    idx = torch.randint(0, n, (int(rowptr[-1]),), generator=g)
    rows = sparse_cpu.row_of_slots(rowptr)
    val = torch.randn(idx.numel(), generator=g).requires_grad_()
    W = torch.randn(n, d, generator=g).requires_grad_()
    b = torch.randn(d, generator=g).requires_grad_()
    up = torch.randn(B, d, generator=g)
    out = sparse_cpu.CSRDecodeCPUFn.apply(rowptr, idx, rows, val, W, b)
    grads = torch.autograd.grad((out * up).sum(), (val, W, b))
    ref = torch.nn.functional.embedding_bag(idx, W, rowptr[:-1], mode="sum", per_sample_weights=val) + b
    ref_grads = torch.autograd.grad((ref * up).sum(), (val, W, b))
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r)


def _sparsify(m, arch: str, x: torch.Tensor) -> None:
    """Weights under which about 5 % of the latents fire on ``x`` (a trained model's regime, not init's
    ~50 %): each latent's bias at minus the 95th percentile of its bias-free pre-activations."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.b_dec.normal_(generator=g)
        if m.W_skip is not None:
            m.W_skip.normal_(generator=g).mul_(0.1)
        z0 = m._x_in(x) @ m.W_enc
        bias = -z0.quantile(0.95, dim=0)
        if arch == "gated":
            m.b_gate.copy_(bias)
            m.r_mag.normal_(generator=g).mul_(0.3)
            m.b_mag.normal_(generator=g).mul_(0.1)
        else:
            m.b_enc.copy_(bias)
        if arch == "jumprelu":
            m.b_enc.add_(0.3)
            m.threshold.copy_(torch.rand(m.n_latents, generator=g) * 0.3 * z0.std())


def _step(m, x, y, monkeypatch, dense: bool, autocast: bool = False, step: int = 50):
    if dense:
        monkeypatch.setenv("SPARSEDICT_DISABLE_CPU_KERNELS", "1")
    else:
        monkeypatch.delenv("SPARSEDICT_DISABLE_CPU_KERNELS", raising=False)
    m.zero_grad(set_to_none=True)
    m.on_step(step, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(x, y)
    sum(out.losses.values()).backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    return out, grads


CASES = [
    ("relu", {}),
    ("relu", {"apply_b_dec_to_input": False}),
    ("jumprelu", {"bandwidth": 0.2}),
    ("jumprelu", {"bandwidth": 0.05, "apply_b_dec_to_input": True}),
    ("gated", {}),
    ("relu", {"skip": True, "d_out": 12}),
    ("gated", {"skip": True, "d_out": 12}),
]


@pytest.mark.parametrize(("arch", "fields"), CASES)
def test_sparse_step_equals_dense_step(arch, fields, monkeypatch):
    d, n, B = 16, 256, 64
    d_out = fields.pop("d_out", None)
    m = make_dict(arch, d, n, d_out=d_out, **fields)
    m.train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, d, generator=g) * 2
    y = torch.randn(B, d_out, generator=g) if d_out else None
    _sparsify(m, arch, x)
    monkeypatch.setattr(active, "MAX_ACTIVE_FRACTION", 0.5)
    ref_out, ref_g = _step(copy.deepcopy(m), x, y, monkeypatch, dense=True)
    out, grads = _step(m, x, y, monkeypatch, dense=False)
    assert ref_out.code.indices is None and out.code.indices is not None  # the two paths did run
    assert out.code.values.shape[1] < n // 4  # sparse regime
    assert torch.equal(out.code.to_dense(), ref_out.code.values)  # the same pre-activations, bit for bit
    torch.testing.assert_close(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    assert out.losses.keys() == ref_out.losses.keys()
    for k in ref_out.losses:
        torch.testing.assert_close(out.losses[k], ref_out.losses[k], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_g.keys()
    for k in ref_g:
        assert float(ref_g[k].abs().max()) > 0, k  # every gradient is exercised
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-4, atol=1e-5, msg=k)
    if arch == "jumprelu":  # some window entries lie below θ: the support alone would miss their gradient
        z = m.pre_acts(x)
        th = m.theta(z.dtype)
        assert bool(((z <= th) & ((z - th).abs() < m.cfg.bandwidth / 2)).any())


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_fallback_boundary(arch, monkeypatch):
    """A cap equal to the number of selected entries keeps the sparse step, one less runs the dense one;
    both give the dense step's values and gradients."""
    d, n, B = 16, 256, 64
    m = make_dict(arch, d, n, **({"bandwidth": 0.2} if arch == "jumprelu" else {}))
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(6)) * 2
    _sparsify(m, arch, x)
    ref_out, ref_g = _step(copy.deepcopy(m), x, None, monkeypatch, dense=True)
    sizes = []
    encode = active.encode_active

    def recording(*args):
        sel = encode(*args)
        sizes.append(None if sel is None else sel[0].numel())
        return sel

    monkeypatch.setattr(active, "encode_active", recording)
    monkeypatch.setattr(active, "MAX_ACTIVE_FRACTION", 1.0)
    _step(copy.deepcopy(m), x, None, monkeypatch, dense=False)
    nnz = sizes[-1]
    for cap, sparse in ((nnz, True), (nnz - 1, False)):
        monkeypatch.setattr(active, "MAX_ACTIVE_FRACTION", (cap + 0.5) / (B * n))
        out, grads = _step(copy.deepcopy(m), x, None, monkeypatch, dense=False)
        assert (out.code.indices is not None) == sparse
        torch.testing.assert_close(out.code.to_dense(), ref_out.code.values, rtol=1e-5, atol=1e-5)
        for k in ref_g:
            torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_sparse_step_under_bf16_autocast(arch, monkeypatch):
    """Under bf16 autocast the encoder GEMM runs in bf16 in both paths; the steps agree to bf16 rounding."""
    d, n, B = 16, 256, 64
    m = make_dict(arch, d, n)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(7)) * 2
    _sparsify(m, arch, x)
    monkeypatch.setattr(active, "MAX_ACTIVE_FRACTION", 0.5)
    ref_out, ref_g = _step(copy.deepcopy(m), x, None, monkeypatch, dense=True, autocast=True)
    out, grads = _step(m, x, None, monkeypatch, dense=False, autocast=True)
    assert out.code.indices is not None
    torch.testing.assert_close(out.code.to_dense(), ref_out.code.values.float(), rtol=2e-2, atol=2e-2)
    for k in ref_g:
        assert float((grads[k] - ref_g[k]).norm() / ref_g[k].norm()) < 2e-2, k


def test_eval_and_no_grad_stay_dense(monkeypatch):
    monkeypatch.delenv("SPARSEDICT_DISABLE_CPU_KERNELS", raising=False)
    m = make_dict("relu", 16, 256)
    x = torch.randn(8, 16)
    _sparsify(m, "relu", x)
    with torch.no_grad():
        assert m(x).code.indices is None
    m.eval()
    assert m(x).code.indices is None


@pytest.mark.parametrize("stride", [17, 1000])
def test_select_batch_topk_equals_flat_topk(stride):
    """The sampled-bound selection == the top k·B of the flattened batch (torch.topk), also when the sample
    is too sparse to bound it (stride 1000: the whole-batch search) and when fewer than k·B are positive."""
    g = torch.Generator().manual_seed(4)
    B, n, k = 64, 512, 8
    z = torch.randn(B, n, generator=g) * (1 + 3 * torch.rand(B, 1, generator=g))  # rows of unequal scale
    for zz, count in ((z, k * B), (z - 3.2, k * B), (z, 1)):
        rowptr, idx, vals = active_cpu.select_batch_topk(zz, count, 10**9, stride)
        rows = sparse_cpu.row_of_slots(rowptr)
        got = torch.zeros(B, n)
        got[rows, idx] = vals
        flat = zz.relu().reshape(-1)
        ref = torch.zeros_like(flat).scatter(0, flat.topk(count).indices, flat.topk(count).values).view(B, n)
        assert torch.equal(got, ref)
        assert bool((rowptr.diff() >= 0).all()) and int(rowptr[-1]) == idx.numel()
    assert active_cpu.select_batch_topk(z, k * B, k * B - 1) is None


def test_batchtopk_sparse_step_equals_dense_step(monkeypatch):
    """BatchTopK's CPU step on the batch top-k entries == its dense step: code, losses (AuxK included, with
    dead latents), gradients; and θ's update and the calibration rows see the same batch."""
    from sparsedict.dictionaries.batchtopk import BatchTopK

    d, n, B = 16, 256, 64
    m = make_dict("batchtopk", d, n, k=6, threshold_calibration_rows=1024)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, d, generator=g) * (1 + 2 * torch.rand(B, 1, generator=g))
    m.set_dead_mask(torch.rand(n, generator=g) < 0.2)
    ref_m = copy.deepcopy(m)
    ref_out, ref_g = _step(ref_m, x, None, monkeypatch, dense=True, step=90)  # inside θ's estimate phase
    out, grads = _step(m, x, None, monkeypatch, dense=False, step=90)
    assert isinstance(m, BatchTopK) and ref_out.code.indices is None and out.code.indices is not None
    assert torch.equal(out.code.to_dense(), ref_out.code.values)
    assert out.losses.keys() == ref_out.losses.keys() == {"mse", "auxk"}
    for k in ref_out.losses:
        torch.testing.assert_close(out.losses[k], ref_out.losses[k], rtol=1e-5, atol=1e-6)
    for k in ref_g:
        assert float(ref_g[k].abs().max()) > 0, k
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-4, atol=1e-5, msg=k)
    m.after_step(out)
    ref_m.after_step(ref_out)
    assert float(m.threshold) == float(ref_m.threshold) > 0
    assert len(m._recent) == len(ref_m._recent) == 1 and torch.equal(m._recent[0], ref_m._recent[0])


@pytest.mark.parametrize("fields", [{}, {"group_sizes": (1, 7, 48, 200)}, {"skip": True, "d_out": 12}])
def test_matryoshka_sparse_step_equals_dense_step(fields, monkeypatch):
    """Matryoshka (batch selection) on the batch top-k entries, all prefixes from one CSR decode == its dense
    step of G block GEMMs: code, the prefix loss, the logged mse, AuxK, every gradient."""
    d, n, B = 16, 256, 64
    fields = dict(fields)
    d_out = fields.pop("d_out", None)
    m = make_dict("matryoshka", d, n, d_out=d_out, k=6, **fields)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, d, generator=g) * (1 + 2 * torch.rand(B, 1, generator=g))
    y = torch.randn(B, d_out, generator=g) if d_out else None
    if m.W_skip is not None:
        with torch.no_grad():
            m.W_skip.normal_(generator=g).mul_(0.1)
    m.set_dead_mask(torch.rand(n, generator=g) < 0.2)
    ref_out, ref_g = _step(copy.deepcopy(m), x, y, monkeypatch, dense=True)
    out, grads = _step(m, x, y, monkeypatch, dense=False)
    assert ref_out.code.indices is None and out.code.indices is not None
    assert torch.equal(out.code.to_dense(), ref_out.code.values)
    torch.testing.assert_close(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    for k in ("prefix", "auxk"):
        torch.testing.assert_close(out.losses[k], ref_out.losses[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logs["mse"], ref_out.logs["mse"], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_g.keys()
    for k in ref_g:
        assert float(ref_g[k].abs().max()) > 0, k
        torch.testing.assert_close(grads[k], ref_g[k], rtol=1e-4, atol=1e-5, msg=k)
