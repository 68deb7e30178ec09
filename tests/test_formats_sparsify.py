"""sparsify format: per-hookpoint directories written here from the format description, loaded, compared with a
hand-written sparsify forward pass (``SparseCoder.encode/decode``). Checkpoints written by sparsify itself are
in test_formats_peers.py.

Format (EleutherAI/sparsify v1.x): ``<run>/<hookpoint>/cfg.json`` {activation "topk",
expansion_factor, normalize_decoder, num_latents (0 -> d_in·expansion), k, multi_topk, skip_connection, transcode,
d_in} + ``sae.safetensors``: ``encoder.weight [n, d_in]`` (nn.Linear: out × in), ``encoder.bias [n]``,
``W_dec [n, d_in]`` (NOT transposed), ``b_dec [d_in]``, optional ``W_skip [d_in, d_in]`` applied as ``x W_skipᵀ``.
Encode subtracts b_dec unless ``transcode``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sparsedict.dictionaries import from_pretrained
from sparsedict.formats import FormatError, detect_format

D, N, K, B = 10, 48, 6, 64


def write(path, transcode=False, skip=False, num_latents=0, expansion=N // D + 0, seed=0, tensors=None):
    g = torch.Generator().manual_seed(seed)
    n = num_latents or D * expansion
    t = tensors or {
        "encoder.weight": torch.randn(n, D, generator=g) / D**0.5,
        "encoder.bias": torch.randn(n, generator=g) * 0.2,
        "W_dec": torch.randn(n, D, generator=g) * 0.5,
        "b_dec": torch.randn(D, generator=g),
    }
    if skip and tensors is None:
        t["W_skip"] = torch.randn(D, D, generator=g) * 0.1
    cfg = {
        "activation": "topk",
        "expansion_factor": expansion,
        "normalize_decoder": True,
        "num_latents": num_latents,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return t


def ref_sparsify(t, x, transcode):
    """sparsify: pre = ReLU(F.linear(x − b_dec·[not transcode], encoder.weight, encoder.bias)); TopK; decode."""
    sae_in = x if transcode else x - t["b_dec"]
    pre = torch.relu(torch.nn.functional.linear(sae_in, t["encoder.weight"], t["encoder.bias"]))
    acts, idx = pre.topk(K, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, idx, acts)
    out = f @ t["W_dec"] + t["b_dec"]  # decoder_impl(top_indices, top_acts, W_dec.mT) + b_dec
    if "W_skip" in t:
        out = out + x @ t["W_skip"].mT
    return f, out


def inputs():
    return torch.randn(B, D, generator=torch.Generator().manual_seed(7)) * 2


@pytest.mark.parametrize(("transcode", "skip"), [(False, False), (True, False), (True, True)])
def test_forward_matches_reference(tmp_path, transcode, skip):
    t = write(tmp_path / "run" / "layers.4.mlp", transcode=transcode, skip=skip, num_latents=N)
    model = from_pretrained(tmp_path / "run" / "layers.4.mlp")
    assert model.architecture == "topk" and model.cfg.k == K and model.n_latents == N
    assert model.subtracts_b_dec == (not transcode)
    if transcode:
        assert (model.cfg.hookpoint, model.cfg.target) == ("layers.4.mlp:in", "layers.4.mlp:out")
    x = inputs()
    f_ref, out_ref = ref_sparsify(t, x, transcode)
    code = model.encode(x)
    torch.testing.assert_close(code.to_dense(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(code, x), out_ref, atol=1e-5, rtol=1e-5)


def test_decoder_is_not_transposed(tmp_path):
    """d_in ≠ n and a rectangular W_dec: a loader that transposes W_dec would fail the shape check or the numbers."""
    t = write(tmp_path / "h", num_latents=N)
    model = from_pretrained(tmp_path / "h")
    torch.testing.assert_close(model.W_dec.detach(), t["W_dec"])
    torch.testing.assert_close(model.W_enc.detach(), t["encoder.weight"].T)


def test_num_latents_from_expansion_and_bf16(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = D * 3
    t = {
        "encoder.weight": torch.randn(n, D, generator=g).bfloat16(),
        "encoder.bias": torch.zeros(n).bfloat16(),
        "W_dec": torch.randn(n, D, generator=g).bfloat16(),
        "b_dec": torch.zeros(D).bfloat16(),
    }
    write(tmp_path / "h", expansion=3, tensors=t)
    model = from_pretrained(tmp_path / "h")
    assert model.n_latents == n and model.W_dec.dtype == torch.bfloat16  # dtype inferred from the file
    model = from_pretrained(tmp_path / "h", dtype=torch.float32)
    assert model.W_dec.dtype == torch.float32


def test_run_directory_needs_subfolder(tmp_path):
    run = tmp_path / "run"
    write(run / "layers.2", num_latents=N)
    write(run / "layers.5" / "seed1", num_latents=N, seed=3)
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    assert detect_format(run) == "sparsify_run"
    with pytest.raises(FormatError, match=r"choose one with subfolder=.*layers\.2, layers\.5/seed1"):
        from_pretrained(run)
    model = from_pretrained(run, subfolder="layers.2")
    assert model.cfg.hookpoint == "layers.2" and model.meta["model"] == "HuggingFaceTB/SmolLM2-135M"
    seeded = from_pretrained(run, subfolder="layers.5/seed1")
    assert seeded.cfg.hookpoint == "layers.5"


def test_errors(tmp_path):
    t = write(tmp_path / "a", num_latents=N)
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(dict(cfg, num_latents=N + 1)))
    with pytest.raises(
        FormatError, match=r"encoder.weight has shape \[48, 10\] but cfg.json .* implies \[49, 10\]"
    ):
        from_pretrained(tmp_path / "a")
    write(tmp_path / "b", tensors={k: v for k, v in t.items() if k != "b_dec"}, num_latents=N)
    with pytest.raises(FormatError, match=r"missing tensors \['b_dec'\]"):
        from_pretrained(tmp_path / "b")
    write(tmp_path / "c", num_latents=N)
    (tmp_path / "c" / "cfg.json").write_text(json.dumps(dict(cfg, activation="groupmax")))
    with pytest.raises(FormatError, match="groupmax"):
        from_pretrained(tmp_path / "c")
    write(tmp_path / "d", num_latents=N, skip=False)
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(dict(cfg, skip_connection=True)))
    with pytest.raises(FormatError, match="skip_connection=True but W_skip is absent"):
        from_pretrained(tmp_path / "d")
