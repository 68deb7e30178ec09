"""SAELens format: checkpoints written here from the format description, loaded, compared with a hand-written
SAELens forward pass, and exported back. Checkpoints written by SAELens itself are in test_formats_peers.py.

Format (SAELens ≥ 6.0): ``cfg.json`` {architecture, d_in, d_sae, dtype, apply_b_dec_to_input,
normalize_activations, metadata{model_name, hook_name, sae_lens_version}, k (topk), d_out (transcoders)};
``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``, jumprelu ``threshold [d_sae]``, gated ``b_gate, b_mag, r_mag [d_sae]`` (no b_enc),
skip transcoder ``W_skip [d_out, d_in]``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sparsedict.dictionaries import from_pretrained
from sparsedict.formats import FormatError, detect_format
from sparsedict.formats.saelens import save_saelens

D, N, D_OUT, B = 12, 40, 9, 64


def write(path, arch: str, tensors: dict, **cfg_extra):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": arch,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post",
            "sae_lens_version": "6.18.0",
        },
    }
    cfg.update(cfg_extra)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def rand_weights(d_out: int = D, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, N, generator=g) / D**0.5,
        "b_enc": torch.randn(N, generator=g) * 0.3,
        "W_dec": torch.randn(N, d_out, generator=g) * 0.4,
        "b_dec": torch.randn(d_out, generator=g),
    }


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed)) * 2


# --- hand-written SAELens forward (sae_lens/saes/*.py semantics) ---------------------------------------------
def ref_pre(w, x, apply_b_dec: bool):
    sae_in = x - w["b_dec"] if apply_b_dec else x
    return sae_in @ w["W_enc"] + w["b_enc"]


def ref_standard(w, x, apply_b_dec=True):
    return torch.relu(ref_pre(w, x, apply_b_dec))


def ref_topk(w, x, k):
    pre = ref_pre(w, x, True)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def ref_jumprelu(w, x, apply_b_dec=False):
    pre = ref_pre(w, x, apply_b_dec)
    return torch.relu(pre) * (pre > w["threshold"])


def ref_gated(w, x):
    sae_in = x - w["b_dec"]
    gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
    mag = torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    return gate * mag


def ref_decode(w, f, x=None):
    out = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w and x is not None:
        out = out + x @ w["W_skip"].T
    return out


def check(model, w, f_ref, x, atol=1e-5):
    code = model.encode(x)
    torch.testing.assert_close(code.to_dense(), f_ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(model.decode(code, x), ref_decode(w, f_ref, x), atol=atol, rtol=1e-5)
    assert (f_ref != 0).any() and (f_ref == 0).any(), "test inputs must activate some latents, not all"


# --- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_standard(tmp_path, apply_b_dec):
    w = rand_weights()
    path = write(tmp_path / "sae", "standard", w, apply_b_dec_to_input=apply_b_dec)
    assert detect_format(path) == "saelens"
    model = from_pretrained(path)
    assert model.architecture == "relu" and model.cfg.hookpoint == "resid_post.3"
    assert model.meta["source_hookpoint"] == "blocks.3.hook_resid_post" and model.meta["model"] == "gpt2"
    x = inputs()
    check(model, w, ref_standard(w, x, apply_b_dec), x)


def test_topk(tmp_path):
    w = rand_weights()
    model = from_pretrained(write(tmp_path / "sae", "topk", w, k=5))
    assert model.architecture == "topk" and model.cfg.k == 5
    x = inputs()
    check(model, w, ref_topk(w, x, 5), x)


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    w = rand_weights()
    path = write(tmp_path / "sae", "topk", w, k=4, rescale_acts_by_decoder_norm=True)
    model = from_pretrained(path)
    x = inputs()
    # SAELens: hidden_pre scaled by ‖W_dec[i]‖ before TopK, codes divided by it before decoding.
    s = w["W_dec"].norm(dim=1)
    pre = ref_pre(w, x, True) * s
    top = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    x_hat = (f / s) @ w["W_dec"] + w["b_dec"]
    code = model.encode(x)
    torch.testing.assert_close(code.to_dense(), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(code), x_hat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_jumprelu(tmp_path, arch):
    w = rand_weights()
    w["threshold"] = torch.rand(N, generator=torch.Generator().manual_seed(3)) * 0.8
    w["threshold"][:3] = 0.0  # θ = 0 behaves as ReLU
    model = from_pretrained(write(tmp_path / "sae", arch, w, apply_b_dec_to_input=False))
    assert model.architecture == "jumprelu"
    x = inputs()
    check(model, w, ref_jumprelu(w, x), x)


def test_jumprelu_log_threshold(tmp_path):
    """Older JumpReLU training checkpoints store ``log_threshold``; SAELens loads them as ``threshold = exp(·)``."""
    w = rand_weights()
    theta = torch.rand(N, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.05
    model = from_pretrained(
        write(tmp_path / "sae", "jumprelu", dict(w, log_threshold=theta.log()), apply_b_dec_to_input=False)
    )
    x = inputs()
    check(model, w, ref_jumprelu(dict(w, threshold=theta), x), x)


def test_gated(tmp_path):
    w = rand_weights()
    del w["b_enc"]
    g = torch.Generator().manual_seed(4)
    w.update(b_gate=torch.randn(N, generator=g) * 0.3, b_mag=torch.randn(N, generator=g) * 0.3)
    w["r_mag"] = torch.randn(N, generator=g) * 0.2
    model = from_pretrained(write(tmp_path / "sae", "gated", w))
    assert model.architecture == "gated"
    x = inputs()
    check(model, w, ref_gated(w, x), x)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_transcoders(tmp_path, arch):
    w = rand_weights(d_out=D_OUT)
    if arch == "skip_transcoder":
        w["W_skip"] = torch.randn(D_OUT, D, generator=torch.Generator().manual_seed(5)) * 0.1
    meta = {
        "model_name": "gpt2",
        "hook_name": "blocks.2.ln2.hook_normalized",
        "hook_name_out": "blocks.2.hook_mlp_out",
    }
    meta["sae_lens_version"] = "6.18.0"
    path = write(tmp_path / "tc", arch, w, d_out=D_OUT, apply_b_dec_to_input=False, metadata=meta)
    model = from_pretrained(path)
    assert (model.cfg.hookpoint, model.cfg.target) == ("mlp_in.2", "mlp_out.2")
    assert (
        model.cfg.is_transcoder
        and model.d_out == D_OUT
        and (model.W_skip is not None) == (arch != "transcoder")
    )
    x = inputs()
    check(model, w, ref_standard(w, x, apply_b_dec=False), x)


def test_export_roundtrip_topk(tmp_path):
    w = rand_weights()
    model = from_pretrained(write(tmp_path / "sae", "topk", w, k=6))
    out = save_saelens(model, tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0" and cfg["architecture"] == "topk" and cfg["k"] == 6
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    back = from_pretrained(out)
    x = inputs()
    check(back, w, ref_topk(w, x, 6), x)


def test_export_batchtopk_as_jumprelu(tmp_path):
    from sparsedict.dictionaries import build, lookup

    _, cfg_cls = lookup("batchtopk")
    model = build(cfg_cls(d_in=D, n_latents=N, k=4, hookpoint="resid_post.1")).eval()
    model.threshold.fill_(0.35)
    out = save_saelens(model, tmp_path / "out")
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "jumprelu"
    back = from_pretrained(out)
    x = inputs()
    with torch.no_grad():
        a, b = model.encode(x).to_dense(), back.encode(x).to_dense()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(model.decode(model.encode(x)), back.decode(back.encode(x)))


def test_errors(tmp_path):
    w = rand_weights()
    bad = dict(w, W_enc=w["W_enc"][:, :-1])
    with pytest.raises(FormatError, match=r"W_enc has shape \[12, 39\].*implies \[12, 40\]"):
        from_pretrained(write(tmp_path / "shape", "standard", bad))
    missing = {k: v for k, v in w.items() if k != "b_enc"}
    with pytest.raises(FormatError, match=r"missing tensors \['b_enc'\]"):
        from_pretrained(write(tmp_path / "missing", "topk", missing, k=3))
    with pytest.raises(FormatError, match="constant_norm_rescale"):
        from_pretrained(
            write(tmp_path / "norm", "topk", w, k=3, normalize_activations="constant_norm_rescale")
        )
    with pytest.raises(FormatError, match="'temporal' cannot be loaded"):
        from_pretrained(write(tmp_path / "arch", "temporal", w))


def _native(hookpoint: str, d: int = D, **fields):
    from sparsedict.dictionaries import build, lookup

    arch = fields.pop("arch", "topk")
    _, cfg_cls = lookup(arch)
    fields = {"k": 4, **fields} if arch == "topk" else fields
    return build(cfg_cls(d_in=d, n_latents=N, hookpoint=hookpoint, **fields).resolved(d)).eval()


@pytest.mark.parametrize(
    ("hookpoint", "hook_name", "head", "reshape"),
    [
        ("resid_post.3", "blocks.3.hook_resid_post", None, "none"),
        ("resid_pre.0", "blocks.0.hook_resid_pre", None, "none"),
        ("attn_out.2", "blocks.2.hook_attn_out", None, "none"),
        ("mlp_out.5", "blocks.5.hook_mlp_out", None, "none"),
        ("mlp_hidden.5", "blocks.5.mlp.hook_post", None, "none"),
        ("attn_z.4", "blocks.4.attn.hook_z", None, "hook_z"),
        ("attn_z.4.h2", "blocks.4.attn.hook_z", 2, "none"),
        ("model.layers.6", "blocks.6.hook_resid_post", None, "none"),
        ("transformer.h.6:in", "blocks.6.hook_resid_pre", None, "none"),
    ],
)
def test_export_writes_transformerlens_hook_names(tmp_path, hookpoint, hook_name, head, reshape):
    """F11: SAELens and SAEBench hook ``metadata.hook_name`` on a HookedTransformer; ours stays in metadata and
    the export reads back at the same hookpoint."""
    model = _native(hookpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact equivalent: no warning
        out = save_saelens(model, tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]
    got = (meta["hook_name"], meta["hook_head_index"], cfg["reshape_activations"])
    assert got == (hook_name, head, reshape)
    assert meta["sparsedict_hookpoint"] == hookpoint and meta["model_class_name"] == "HookedTransformer"
    raw = hookpoint.startswith(("model.", "transformer."))
    assert meta["hf_hook_name"] == (hookpoint if raw else None)  # an alias names no module without the model
    back = from_pretrained(out)
    assert back.cfg.hookpoint == {"model.layers.6": "resid_post.6", "transformer.h.6:in": "resid_pre.6"}.get(
        hookpoint, hookpoint
    )
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x)), model.decode(model.encode(x)))


def test_export_of_mlp_in_and_unmapped_paths_warns(tmp_path):
    """No TransformerLens hook holds the MLP input after ln2's weight, nor a raw path inside a block: say so."""
    tc = _native("mlp_in.2", arch="relu", target="mlp_out.2", d_out=D_OUT)
    with pytest.warns(UserWarning, match=r"'mlp_in.2' is exported with hook_name 'blocks.2.ln2.hook_normalized'.*"
                      r"before ln2's weight"):  # fmt: skip
        out = save_saelens(tc, tmp_path / "tc")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert (
        meta["hook_name"] == "blocks.2.ln2.hook_normalized"
        and meta["hook_name_out"] == "blocks.2.hook_mlp_out"
    )
    assert (meta["sparsedict_hookpoint"], meta["sparsedict_target"]) == ("mlp_in.2", "mlp_out.2")
    raw = _native("model.layers.6.mlp.act_fn")
    with pytest.warns(UserWarning, match="'model.layers.6.mlp.act_fn' has no TransformerLens equivalent"):
        out = save_saelens(raw, tmp_path / "raw")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == meta["hf_hook_name"] == "model.layers.6.mlp.act_fn"


def test_export_uses_recorded_module_path_and_keeps_a_saelens_hook(tmp_path):
    model = _native("resid_post.3")
    model.meta = {"model": "smollm2-135m", "hookpoint_paths": {"resid_post.3": "model.layers.3"}}
    meta = json.loads((save_saelens(model, tmp_path / "a") / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hf_hook_name"]) == ("smollm2-135m", "model.layers.3")
    # a dictionary from another format keeps its own name in source_hookpoint: that is no SAELens hook name
    model.meta = {"source_format": "sparsify", "source_hookpoint": "layers.3"}
    meta = json.loads((save_saelens(model, tmp_path / "b") / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post"


def test_export_jumprelu_skip_transcoder(tmp_path):
    """SAELens has a jumprelu skip transcoder (our loader reads it), so the export writes one."""
    tc = _native("resid_pre.2", arch="jumprelu", target="resid_post.2", skip=True)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1)
        tc.threshold.uniform_(0.05, 0.3)
    out = save_saelens(tc, tmp_path / "tc")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.hook_resid_post"
    back = from_pretrained(out)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, tc(x).x_hat)
