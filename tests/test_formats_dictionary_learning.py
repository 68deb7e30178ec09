"""dictionary_learning format: ``ae.pt`` state dicts written here from the class definitions, loaded with
``weights_only=True``, compared with a hand-written forward of each class (dictionary_learning 0.1.0). Checkpoints
written by dictionary_learning itself are in test_formats_peers.py.

Format (saprmarks/dictionary_learning): ``<dir>/ae.pt`` = ``torch.save(ae.state_dict())`` and
``<dir>/config.json`` = {"trainer": {dict_class, activation_dim, dict_size, k, lm_name, layer, submodule_name},
"buffer": {...}}. ``nn.Linear`` weights are ``[out, in]``: ``encoder.weight [n, d]``, ``decoder.weight [d, n]``.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsedict.dictionaries import from_pretrained
from sparsedict.formats import FormatError, detect_format

D, N, K, B = 10, 40, 5, 64


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def linear_sd(seed=0):
    r = g(seed)
    return {
        "encoder.weight": torch.randn(N, D, generator=r) / D**0.5,
        "encoder.bias": torch.randn(N, generator=r) * 0.3,
        "decoder.weight": torch.randn(D, N, generator=r) * 0.4,
    }


def param_sd(seed=0):
    r = g(seed)
    return {
        "W_enc": torch.randn(D, N, generator=r) / D**0.5,
        "b_enc": torch.randn(N, generator=r) * 0.3,
        "W_dec": torch.randn(N, D, generator=r) * 0.4 * (1 + torch.rand(N, 1, generator=r)),  # non-unit rows
        "b_dec": torch.randn(D, generator=r),
    }


def write(path, dict_class: str, sd: dict, **trainer):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path / "ae.pt")
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": N, "lm_name": "EleutherAI/pythia-70m",
                       "layer": 3, "submodule_name": "resid_post_layer_3", **trainer},
           "buffer": {"d_submodule": D, "io": "out"}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def inputs():
    return torch.randn(B, D, generator=g(9)) * 2


def check(model, x, f_ref, x_hat_ref):
    code = model.encode(x)
    torch.testing.assert_close(code.to_dense(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(code, x), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert (f_ref != 0).any() and (f_ref == 0).any()


def lin(x, sd, prefix):
    return torch.nn.functional.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def test_autoencoder(tmp_path):
    sd = {**linear_sd(), "bias": torch.randn(D, generator=g(1))}
    model = from_pretrained(write(tmp_path / "ae", "AutoEncoder", sd))
    assert detect_format(tmp_path / "ae") == "dictionary_learning"
    assert model.architecture == "relu" and model.cfg.hookpoint == "resid_post.3"
    assert model.meta["model"] == "EleutherAI/pythia-70m"
    x = inputs()
    # AutoEncoder.from_pretrained normalises decoder columns (norms s) into the encoder: codes ReLU(·)·s
    s = sd["decoder.weight"].norm(dim=0)
    f = torch.relu(lin(x - sd["bias"], sd, "encoder")) * s  # encode: ReLU(encoder(x − bias)), times s
    check(model, x, f, lin(f / s, sd, "decoder") + sd["bias"])  # decode: decoder(f) + bias, unchanged


def test_autoencoder_new(tmp_path):
    sd = {**linear_sd(), "decoder.bias": torch.randn(D, generator=g(1))}
    model = from_pretrained(write(tmp_path / "ae", "AutoEncoderNew", sd))
    assert not model.subtracts_b_dec
    x = inputs()
    f = torch.relu(lin(x, sd, "encoder"))  # no pre-bias
    check(model, x, f, lin(f, sd, "decoder"))


def test_autoencoder_topk(tmp_path):
    sd = {
        **linear_sd(),
        "b_dec": torch.randn(D, generator=g(1)),
        "k": torch.tensor(K),
        "threshold": torch.tensor(-1.0),
    }
    model = from_pretrained(write(tmp_path / "ae", "AutoEncoderTopK", sd, k=K))
    assert model.architecture == "topk" and model.cfg.k == K
    x = inputs()
    post = torch.relu(lin(x - sd["b_dec"], sd, "encoder"))
    top = post.topk(K, sorted=False)
    f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    check(model, x, f, lin(f, sd, "decoder") + sd["b_dec"])


@pytest.mark.parametrize("cls", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_batchtopk_family_uses_threshold(tmp_path, cls):
    b_dec = torch.randn(D, generator=g(1))
    if cls == "BatchTopKSAE":
        sd = {**linear_sd(), "b_dec": b_dec}
        w_enc, b_enc, w_dec = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T
    else:
        sd = param_sd()
        sd["group_sizes"] = torch.tensor([8, 12, 20])
        w_enc, b_enc, w_dec, b_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"]
    sd.update(b_dec=b_dec, k=torch.tensor(K, dtype=torch.int), threshold=torch.tensor(0.6))
    model = from_pretrained(write(tmp_path / "ae", cls, sd, k=K))
    x = inputs()
    post = torch.relu((x - b_dec) @ w_enc + b_enc)
    f = post * (post > 0.6)  # encode(use_threshold=True), the inference default
    check(model, x, f, f @ w_dec + b_dec)
    sd["threshold"] = torch.tensor(-1.0)
    with pytest.raises(FormatError, match="threshold is unset"):
        from_pretrained(write(tmp_path / "unset", cls, sd, k=K))


def test_jumprelu_autoencoder(tmp_path):
    sd = param_sd()  # decoder rows of non-unit norm: any norm scaling would show in the codes
    sd["threshold"] = torch.rand(N, generator=g(2)) * 0.5
    model = from_pretrained(write(tmp_path / "ae", "JumpReluAutoEncoder", sd))
    x = inputs()
    pre = x @ sd["W_enc"] + sd["b_enc"]  # apply_b_dec_to_input = False
    f = torch.relu(pre * (pre > sd["threshold"]))  # encode: no decoder-norm scaling
    check(model, x, f, f @ sd["W_dec"] + sd["b_dec"])


def test_gated_autoencoder(tmp_path):
    r = g(3)
    sd = {k: v for k, v in linear_sd().items() if k != "encoder.bias"}
    sd.update(decoder_bias=torch.randn(D, generator=r), r_mag=torch.randn(N, generator=r) * 0.2,
              gate_bias=torch.randn(N, generator=r) * 0.3, mag_bias=torch.randn(N, generator=r) * 0.3)  # fmt: skip
    model = from_pretrained(write(tmp_path / "ae", "GatedAutoEncoder", sd))
    x = inputs()
    x_enc = lin(x - sd["decoder_bias"], sd, "encoder")
    gate = (x_enc + sd["gate_bias"] > 0).float()
    mag = torch.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
    f = gate * mag  # encode(normalize_decoder=False), the default: no decoder-norm scaling
    check(model, x, f, lin(f, sd, "decoder") + sd["decoder_bias"])


def test_errors(tmp_path):
    sd = {**linear_sd(), "b_dec": torch.zeros(D), "k": torch.tensor(K), "threshold": torch.tensor(-1.0)}
    with pytest.raises(FormatError, match=r"trainer.dict_size=41 but the weights .* imply 40"):
        from_pretrained(write(tmp_path / "a", "AutoEncoderTopK", sd, dict_size=N + 1))
    with pytest.raises(FormatError, match=r"missing tensors \['b_dec'\]"):
        from_pretrained(
            write(tmp_path / "b", "AutoEncoderTopK", {k: v for k, v in sd.items() if k != "b_dec"})
        )
    with pytest.raises(FormatError, match="dict_class 'CrossCoder' is not supported"):
        from_pretrained(write(tmp_path / "c", "CrossCoder", sd))
    # A pickled object (not a plain state dict) is refused by weights_only=True, never executed.
    path = write(tmp_path / "d", "AutoEncoderTopK", sd)
    torch.save({"evil": _NotATensor()}, path / "ae.pt")
    with pytest.raises(FormatError, match="weights_only=True"):
        from_pretrained(path)


class _NotATensor:
    pass
