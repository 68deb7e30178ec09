"""The replacement model on the real SmolLM2: every MLP output of a layer range replaced at once by a cross-layer
transcoder's (or a transcoder set's) output, beside per-layer splicing.

- the replacement model of a CLT over blocks 1-2 (block 2's MLP reads an input computed from block 1's replaced
  output) and each per-layer splice equal a plain reference written with forward hooks on the Hugging Face MLP
  modules and the CLT's maths from its parameters; ``error_term`` reproduces the clean model;
- a CLT that writes only its ``b_dec`` = the mean-ablation values equals the all-at-once mean-ablation baseline;
- a transcoder set's per-layer rows equal ``evaluate_splicing`` of each member alone (the single-dictionary
  path, tested on its own), and its replacement row is not one of them;
- ``sparsedict eval`` on a saved CLT and a saved set writes the replacement and per-layer metrics, and the
  per-layer FVU equals a plain computation on the held-out rows.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import small_cache

from sparsedict.cache import ActivationStore
from sparsedict.cli import main
from sparsedict.dictionaries import CLTConfig, LayeredAttachment, TranscoderSet, build
from sparsedict.dictionaries.relu import ReLUConfig
from sparsedict.eval.evaluate import cache_contexts
from sparsedict.eval.splice import evaluate_replacement, evaluate_splicing
from sparsedict.metrics import token_ce, token_kl

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = [1, 2]
INS, OUTS = [f"mlp_in.{i}" for i in LAYERS], [f"mlp_out.{i}" for i in LAYERS]
SPLICE = 240  # kept tokens spliced


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("replacement")
    kw = dict(context_length=48)
    return {
        "train": small_cache(root / "train", INS + OUTS, 300, split="train", **kw),
        "test": small_cache(root / "test", INS + OUTS, 600, split="test", **kw),
    }


@pytest.fixture(scope="module")
def clt(caches):
    """A jumprelu CLT over blocks 1-2 initialised from the training rows (b_dec = mean, θ at L0 ≈ 24 per
    layer), with decoders small enough that the replaced model stays near the clean one."""
    x, y = ActivationStore(caches["train"], INS, target=OUTS).rows()
    torch.manual_seed(0)
    cfg = CLTConfig(layers=LAYERS, activation="jumprelu", n_latents=256, k=24)
    m = build(cfg.resolved(x.shape[-1], y.shape[-1]))
    m.init_from_data(x, y)
    with torch.no_grad():
        for w in m.W_dec:
            w.mul_(0.05)
    return m.eval()


def reference_logp(model, m, ids, attn, keep, pos, replace: list[int]):
    """Log-probabilities with the outputs of layer positions ``replace`` replaced at the kept positions, written
    with plain forward hooks on ``model.model.layers[l].mlp``: ``z = x W_enc + b_enc``, ``f = z·1[z > θ]``,
    ``ŷ_j = Σ_{i ≤ j} f_i W_dec[i][:, j − i] + b_dec[j]``."""
    codes, handles = {}, []
    for i, layer in enumerate(m.layers):

        def hook(mod, args, out, i=i):
            x = args[0][keep].float()
            z = x @ m.W_enc[i] + m.b_enc[i]
            codes[i] = z * (z > m.threshold[i])
            if i not in replace:
                return out
            y = m.b_dec[i] + sum(codes[s] @ m.W_dec[s][:, i - s] for s in range(i + 1))
            out = out.clone()
            out[keep] = y.to(out)
            return out

        handles.append(model.model.layers[layer].mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return torch.log_softmax(logits[:, :-1][pos].float(), -1)


def test_replacement_model_equals_a_plain_reference(smollm2, caches, clt):
    model, _ = smollm2
    ctx = cache_contexts(caches["test"], SPLICE)
    stats = evaluate_replacement(model, {"clt": clt}, ctx, batch_size=4, mean_ablation=False)["clt"]
    assert set(stats) == {"replacement", "layer1", "layer2"}
    want = {v: [0.0, 0.0, 0] for v in stats}  # CE sum, KL sum, tokens
    with torch.no_grad():
        for ids, attn, keep in ctx.batches(4):
            pos = keep[:, :-1] & attn[:, 1:]
            labels = ids[:, 1:][pos]
            clean = reference_logp(model, clt, ids, attn, keep, pos, [])
            for variant, replace in (("replacement", [0, 1]), ("layer1", [0]), ("layer2", [1])):
                lp = reference_logp(model, clt, ids, attn, keep, pos, replace)
                want[variant][0] += float(token_ce(lp, labels).double().sum())
                want[variant][1] += float(token_kl(clean, lp).double().sum())
                want[variant][2] += int(labels.numel())
            # the error term gives back the clean model (up to the rounding of ŷ + (y − ŷ))
            with LayeredAttachment(clt, model, "splice", keep=keep, error_term=True):
                logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits
            got = torch.log_softmax(logits[:, :-1][pos].float(), -1)
            torch.testing.assert_close(got, clean, atol=1e-4, rtol=1e-4)
    for variant, s in stats.items():
        assert s.tokens == want[variant][2] > 100
        assert s.ce_spliced == pytest.approx(want[variant][0], rel=1e-5), variant
        assert s.kl_spliced == pytest.approx(want[variant][1], rel=1e-4, abs=1e-6), variant
        assert s.kl_spliced > 1e-3 * s.tokens  # the splice changed the model
    # the replacement compounds: block 2's MLP reads the input that block 1's replaced output produced
    assert stats["replacement"].kl_spliced > max(stats["layer1"].kl_spliced, stats["layer2"].kl_spliced)


def test_bias_only_clt_is_the_all_at_once_mean_ablation(smollm2, caches, clt):
    model, _ = smollm2
    ctx = cache_contexts(caches["test"], 120)
    bias = copy.deepcopy(clt)
    with torch.no_grad():
        for w in bias.W_dec:
            w.zero_()
    means = {h: bias.b_dec[j].detach().clone() for j, h in enumerate(OUTS)}
    s = evaluate_replacement(model, {"b": bias}, ctx, batch_size=4, means=means, per_layer=False)["b"]
    summary = s["replacement"]
    assert summary.ce_spliced == pytest.approx(summary.ce_mean, rel=1e-6)
    assert summary.kl_spliced == pytest.approx(summary.kl_mean, rel=1e-5)
    assert summary.ce_zero > summary.ce_clean and summary.kl_mean > 0


def test_transcoder_set_layers_equal_single_splices(smollm2, caches):
    model, _ = smollm2
    x, y = ActivationStore(caches["train"], INS, target=OUTS).rows()
    torch.manual_seed(0)
    tset = TranscoderSet(ReLUConfig(layers=LAYERS, hookpoint="mlp_in", target="mlp_out", n_latents=256)
                         .resolved(x.shape[-1], y.shape[-1]))  # fmt: skip
    for i, (_, m) in enumerate(tset.items()):
        m.init_from_data(x[:, i], y[:, i])
        with torch.no_grad():
            m.W_dec.mul_(0.05)
    tset.eval()
    ctx = cache_contexts(caches["test"], 120)
    means = {h: y[:, j].mean(0) for j, h in enumerate(OUTS)}
    got = evaluate_replacement(model, {"set": tset}, ctx, batch_size=4, means=means)["set"]
    single, _ = evaluate_splicing(
        model, {f"layer{layer}": m for layer, m in tset.items()}, ctx, batch_size=4, means=means
    )
    for layer in LAYERS:
        a, b = got[f"layer{layer}"].summary(), single[f"layer{layer}"].summary()
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "kl", "ce_recovered"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (layer, key)
    whole = got["replacement"].summary()
    assert all(whole["kl"] != pytest.approx(single[f"layer{v}"].summary()["kl"], rel=1e-3) for v in LAYERS)


def test_eval_cli_reports_the_replacement_model(caches, clt, tmp_path, capsys):
    x, y = ActivationStore(caches["train"], INS, target=OUTS).rows()
    clt.save_pretrained(tmp_path / "clt", {"cache": str(caches["train"])})
    tset = TranscoderSet(ReLUConfig(layers=LAYERS, hookpoint="mlp_in", target="mlp_out", n_latents=128)
                         .resolved(x.shape[-1], y.shape[-1]))  # fmt: skip
    for i, (_, m) in enumerate(tset.items()):
        m.init_from_data(x[:, i], y[:, i])
    tset.save_pretrained(tmp_path / "set", {"cache": str(caches["train"])})
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tmp_path / "clt"), str(tmp_path / "set"), "--cache", str(caches["test"]),
               "--splice_tokens", "100", "--threads", "1", "--json_out", str(out)])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "per layer" in table and "clt" in table and "set" in table
    records = {r["checkpoint"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())}
    xt, yt = ActivationStore(caches["test"], INS, target=OUTS).rows()
    for name, r in records.items():
        m = r["metrics"]
        assert r["layers"] == LAYERS and "replacement model" in r["data"]["splice"]
        for key in ("ce_recovered", "kl", "layer1/ce_recovered", "layer2/kl", "layer1/fvu", "layer2/l0"):
            assert key in m and m[key] == m[key], (name, key)  # present and not NaN
        model = clt if name == "clt" else TranscoderSet.from_pretrained(tmp_path / "set")
        with torch.no_grad():
            y_hat = model.decode(model.encode(xt), xt).double()
        for j, layer in enumerate(LAYERS):
            e = yt[:, j].double()
            want = float(((e - y_hat[:, j]) ** 2).sum() / ((e - e.mean(0)) ** 2).sum())
            assert m[f"layer{layer}/fvu"] == pytest.approx(want, rel=1e-5), (name, layer)
        assert m["l0"] == pytest.approx(m["layer1/l0"] + m["layer2/l0"], rel=1e-9)
