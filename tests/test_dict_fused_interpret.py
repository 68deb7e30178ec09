"""BatchTopK and Matryoshka on the fused kernels (Triton's CPU interpreter) against their reference paths.

``SPARSEDICT_FORCE_TRITON=1`` with ``TRITON_INTERPRET=1`` makes :func:`sparsedict.kernels.use_triton` true on
CPU tensors, so the dictionaries take exactly the code path they take on CUDA: fused ``topk_encode`` (per-row
candidates for BatchTopK) and fused ``sparse_decode`` (all Matryoshka prefixes). The same model with the
variable unset runs the plain-torch reference (dense batch top-k, reference decode). Losses, reconstructions,
codes and every parameter gradient must agree (relative error ≤ 1e-5, fp32). Shapes are tiny and off the
kernels' tile sizes. The interpreter must be on when ``triton`` is first imported; as in
``test_kernels_interpret.py``, the file reruns itself in a fresh process when Triton was imported earlier.
"""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_helpers import triton_interpreter_module

if torch.cuda.is_available():
    pytest.skip(
        "a GPU is present: the compiled kernels are tested in test_kernels_gpu.py", allow_module_level=True
    )

test_interpreter_in_fresh_process, _interpret = triton_interpreter_module(
    __file__, ("SPARSEDICT_DISABLE_TRITON", "SPARSEDICT_FORCE_TRITON")
)
pytest.importorskip("triton")

from sparsedict.dictionaries import build  # noqa: E402
from sparsedict.dictionaries.batchtopk import BatchTopKConfig, batch_topk  # noqa: E402
from sparsedict.dictionaries.matryoshka import MatryoshkaConfig  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make(cfg, d: int, seed: int = 0):
    torch.manual_seed(seed)
    m = build(cfg.resolved(d))
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        m.b_dec.normal_(0, 0.1)
    return m


def run(m, x: torch.Tensor, fused: bool, monkeypatch, dead: torch.Tensor | None = None):
    """Forward + backward of the summed losses; returns (output, {param: grad}). The reference is the dense
    torch path (the CPU sparse step has its own equivalence tests: test_dict_active.py)."""
    monkeypatch.setenv("SPARSEDICT_DENSE_CODES", "1")
    if fused:
        monkeypatch.setenv("SPARSEDICT_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("SPARSEDICT_FORCE_TRITON", raising=False)
    m.zero_grad()
    m.set_dead_mask(dead)
    out = m(x)
    sum(out.losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out, grads


def compare(m, x, monkeypatch, dead=None):
    ref = copy.deepcopy(m)
    out_f, g_f = run(m, x, True, monkeypatch, dead)
    out_r, g_r = run(ref, x, False, monkeypatch, dead)
    torch.testing.assert_close(out_f.code.to_dense(), out_r.code.to_dense(), atol=1e-5, rtol=1e-5)
    assert rel(out_f.x_hat, out_r.x_hat) < 1e-5
    assert out_f.losses.keys() == out_r.losses.keys()
    for key in out_r.losses:
        assert rel(out_f.losses[key].detach(), out_r.losses[key].detach()) < 1e-5, key
    assert g_f.keys() == g_r.keys() and {"W_enc", "b_enc", "W_dec", "b_dec"} <= g_f.keys()
    for name in g_r:
        assert rel(g_f[name], g_r[name]) < 1e-5, name
    return out_f, out_r


@pytest.mark.parametrize("selection", ["topk", "batchtopk"])
def test_matryoshka_fused_equals_reference(monkeypatch, selection):
    cfg = MatryoshkaConfig(d_in=24, n_latents=100, k=5, selection=selection, group_fractions=(0.2, 0.3, 0.5))
    m = make(cfg, 24)
    x = torch.randn(37, 24)
    dead = torch.zeros(100, dtype=torch.bool)
    dead[::7] = True  # AuxK on
    out_f, out_r = compare(m, x, monkeypatch, dead)
    assert out_f.code.indices is not None  # the fused path produced a sparse code
    assert "prefix" in out_f.losses and "auxk" in out_f.losses
    if selection == "topk":
        assert out_r.code.indices is not None  # both sparse: fused vs reference topk_encode/sparse_decode


def test_batchtopk_fused_candidates_equal_dense_batch_topk(monkeypatch):
    cfg = BatchTopKConfig(d_in=24, n_latents=100, k=5)
    m = make(cfg, 24, seed=1)
    x = torch.randn(37, 24)
    out_f, out_r = compare(m, x, monkeypatch)
    assert out_f.code.indices is not None and out_f.code.values.shape == (37, 20)  # k_c = 4k candidates
    assert out_r.code.indices is None  # the reference is the dense batch top-k
    acts = m._x_in(x) @ m.W_enc + m.b_enc
    torch.testing.assert_close(
        out_f.code.to_dense(), batch_topk(acts.relu(), 5).detach(), atol=1e-5, rtol=1e-5
    )
    # per-token L0 varies (batch selection), the batch total is exactly k·B
    assert int(out_f.code.l0().sum()) == 5 * 37 and len(set(out_f.code.l0().tolist())) > 1


def test_batchtopk_falls_back_to_dense_when_a_row_could_hold_more_winners(monkeypatch):
    """A row 50x larger than the rest wins all its k_c candidates: the candidate selection cannot be
    trusted, so the step must use the dense path (and still equal the reference)."""
    cfg = BatchTopKConfig(d_in=24, n_latents=100, k=5)
    m = make(cfg, 24, seed=2)
    x = torch.randn(37, 24)
    x[3] *= 50
    monkeypatch.setenv("SPARSEDICT_FORCE_TRITON", "1")
    assert m.fused_batch_topk(m._x_in(x)) is None
    out_f, _ = compare(m, x, monkeypatch)
    assert out_f.code.indices is None
    assert int(out_f.code.l0()[3]) > 20  # the big row really holds more than k_c of the batch winners


def test_batchtopk_complete_candidates_when_4k_covers_the_row(monkeypatch):
    cfg = BatchTopKConfig(d_in=12, n_latents=16, k=5)  # k_c = min(20, 16) = n: whole rows, always exact
    m = make(cfg, 12, seed=3)
    x = torch.randn(9, 12)
    x[0] *= 50
    out_f, _ = compare(m, x, monkeypatch)
    assert out_f.code.indices is not None and out_f.code.values.shape == (9, 16)
