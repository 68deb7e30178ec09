"""Splicing on the real embedded SmolLM2 (a few short contexts of the shipped corpus sample)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import identity_dict

from sparsedict.cache import hooks
from sparsedict.cache.config import CacheConfig
from sparsedict.cache.tokens import ContextBuilder
from sparsedict.data import CORPUS_SAMPLE
from sparsedict.dictionaries import build
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.eval.splice import Contexts, ablate, evaluate_splicing, splice

HP = "resid_post.3"


pytestmark = pytest.mark.usefixtures("one_thread")  # thread barriers dominate small ops on a shared machine


@pytest.fixture(scope="module")
def lm(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def contexts(lm) -> Contexts:
    _, tok = lm
    cfg = CacheConfig(context_length=24, exclude_first_n=2)
    builder = ContextBuilder(cfg, tok)
    docs = [json.loads(line)["text"] for line in CORPUS_SAMPLE.read_text().splitlines()[:3]]
    ctx = []
    for text in docs:
        ctx += builder.contexts(tok(text, add_special_tokens=False)["input_ids"])[:1]
    ctx.append(ctx[0][:15])  # a short context: right padding
    ids, attn, keep, _ = builder.masks(ctx)
    return Contexts(torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(keep))


def _zero(d: int, hookpoint: str = HP, **kw):
    model = build(TopKConfig(hookpoint=hookpoint, d_in=d, n_latents=64, k=4, **kw).resolved(d))
    with torch.no_grad():
        model.W_dec.zero_()
        model.b_dec.zero_()
    return model


def _clean_ce(model, c: Contexts) -> tuple[float, int]:
    logits = model(input_ids=c.token_ids, attention_mask=c.attention_mask.long()).logits
    pos = c.keep[:, :-1] & c.attention_mask[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][pos], c.token_ids[:, 1:][pos])
    return float(ce), int(pos.sum())


def test_identity_recovers_everything_and_zero_equals_zero_ablation(lm, contexts):
    model, _ = lm
    d = model.config.hidden_size
    dicts = {"identity": identity_dict(d, HP), "zero": _zero(d)}
    stats, recon = evaluate_splicing(model, dicts, contexts, batch_size=3)
    ident, zero = stats["identity"].summary(), stats["zero"].summary()
    want_ce, n_pos = _clean_ce(model, contexts)
    assert ident["splice_tokens"] == n_pos  # excluded and last/padded positions dropped from the means
    assert ident["ce_clean"] == pytest.approx(want_ce, rel=1e-5)
    assert ident["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert ident["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ident["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5)
    assert ident["ce_zero_ablation"] > ident["ce_clean"] + 0.5  # zeroing resid_post.3 hurts a lot
    assert ident["ce_mean_ablation"] > ident["ce_clean"]
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablation"], rel=1e-6)
    assert zero["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl"] == pytest.approx(zero["kl_zero_ablation"], rel=1e-6)
    # Reconstruction metrics over exactly the kept positions.
    assert recon["identity"].tokens == int(contexts.keep.sum())
    assert recon["identity"].fvu == pytest.approx(0.0, abs=1e-10)
    assert recon["zero"].l2_ratio == 0.0


def test_excluded_positions_keep_their_activations(lm, contexts):
    model, _ = lm
    ids, attn, keep = contexts.token_ids, contexts.attention_mask, contexts.keep
    clean = hooks.record(model, [HP], ids, attention_mask=attn.long())[HP]
    with ablate(model, HP, keep):
        seen = hooks.record(model, [HP], ids, attention_mask=attn.long())[HP]
    assert bool((seen[keep] == 0).all())
    assert torch.equal(seen[~keep], clean[~keep])
    assert int((~keep & attn).sum()) >= 2 * len(contexts)  # BOS and position 1 of every context excluded


def test_error_term_splice_reproduces_clean_logits(lm, contexts):
    model, _ = lm
    torch.manual_seed(1)
    d = model.config.hidden_size
    sae = build(TopKConfig(hookpoint=HP, d_in=d, n_latents=256, k=8).resolved(d))
    ids, attn, keep = contexts.token_ids, contexts.attention_mask.long(), contexts.keep
    clean = model(input_ids=ids, attention_mask=attn).logits
    with splice(model, sae, keep, error_term=True):
        err = model(input_ids=ids, attention_mask=attn).logits
    with splice(model, sae, keep):
        plain = model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(err, clean, rtol=1e-4, atol=1e-3)
    assert float((plain - clean).abs().max()) > 1.0  # the random SAE itself changes the logits


def test_transcoder_splices_target_with_input(lm, contexts):
    model, _ = lm
    d = model.config.hidden_size
    src, tgt = "mlp_in.2", "mlp_out.2"
    cfg = TopKConfig(hookpoint=src, target=tgt, d_in=d, d_out=d, n_latents=128, k=8).resolved(d, d)
    tc = build(cfg)
    zero_tc = _zero(d, hookpoint=src, target=tgt)
    ids, attn, keep = contexts.token_ids, contexts.attention_mask.long(), contexts.keep
    acts = hooks.record(model, [src, tgt], ids, attention_mask=attn)
    seen = {}

    def on_output(y, y_hat, code):
        seen.update(y=y, y_hat=y_hat)

    with splice(model, tc, keep, on_output=on_output):
        model(input_ids=ids, attention_mask=attn)
    torch.testing.assert_close(seen["y"], acts[tgt][keep])
    want = tc.decode(tc.encode(acts[src][keep]), acts[src][keep])
    torch.testing.assert_close(seen["y_hat"], want, rtol=1e-5, atol=1e-5)
    stats, _ = evaluate_splicing(
        model, {"tc": tc, "zero": zero_tc}, contexts, batch_size=4, mean_ablation=False
    )
    z = stats["zero"].summary()
    assert z["ce_spliced"] == pytest.approx(z["ce_zero_ablation"], rel=1e-6)
    assert "ce_mean_ablation" not in z


def test_saelens_zero_baseline_zeroes_every_position(lm, contexts):
    """SAELens' ce_loss_score baseline zeroes the hookpoint at every position (BOS and sinks too); ours zeroes
    only the kept positions. ``zero_all`` adds SAELens' one, checked against a raw forward hook."""
    model, _ = lm
    d = model.config.hidden_size
    stats, _ = evaluate_splicing(model, {"id": identity_dict(d, HP)}, contexts, batch_size=3, mean_ablation=False,
                                 zero_all=True)  # fmt: skip
    s = stats["id"].summary()
    handle = model.model.layers[3].register_forward_hook(
        lambda mod, args, out: (
            (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
        )
    )
    try:
        with torch.no_grad():
            want, _ = _clean_ce(model, contexts)
    finally:
        handle.remove()
    assert s["ce_zero_ablation_all"] == pytest.approx(want, rel=1e-5)
    assert abs(s["ce_zero_ablation_all"] - s["ce_zero_ablation"]) > 1e-3  # the two baselines differ
    gap = s["ce_zero_ablation_all"] - s["ce_clean"]
    assert s["ce_recovered_zero_all"] == pytest.approx((s["ce_zero_ablation_all"] - s["ce_spliced"]) / gap)
    assert "ce_zero_ablation_all" not in evaluate_splicing(model, {"id": identity_dict(d, HP)}, contexts,
                                                          mean_ablation=False)[0]["id"].summary()  # fmt: skip
