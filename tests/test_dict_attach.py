"""``dictionary.hook(model)`` on the real embedded SmolLM2-135M (a few tokens of English text).

References are independent of ``sparsedict.cache.hooks``: activations come from ``output_hidden_states`` and
the spliced forward is rebuilt with a plain ``register_forward_hook`` on the HF module.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import identity_dict, make_dict
from safetensors.torch import save_file

from sparsedict.dictionaries import from_pretrained

LAYER = 3
TEXT = "The tables are stored in the database, and the planner chooses an index scan."


@pytest.fixture(scope="module")
def lm(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return model, ids, out.logits, out.hidden_states


def random_topk(d: int, hookpoint: str, seed: int = 0):
    return make_dict("topk", d, 4 * d, k=16, hookpoint=hookpoint, seed=seed).eval()


def logits_with_raw_hook(model, module, fn, ids):
    """Reference splice: a plain forward hook on ``module`` whose output becomes ``fn(output)``."""

    def hook(_m, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def test_identity_splice_leaves_logits_unchanged(lm):
    model, ids, logits, _ = lm
    sae = identity_dict(576, f"resid_post.{LAYER}", arch="relu")
    with torch.no_grad(), sae.hook(model, mode="splice") as att:
        spliced = model(input_ids=ids, use_cache=False).logits
    assert att.codes == []  # splice mode keeps no codes
    torch.testing.assert_close(spliced, logits, atol=1e-4, rtol=1e-4)


def test_splice_substitutes_the_reconstruction(lm):
    model, ids, logits, _ = lm
    sae = random_topk(576, f"resid_post.{LAYER}")
    with torch.no_grad(), sae.hook(model) as att:
        spliced = model(input_ids=ids, use_cache=False).logits
    assert (spliced - logits).abs().max() > 1.0  # a random dictionary changes the output

    def recon(h):
        flat = h.reshape(-1, 576)
        return sae.decode(sae.encode(flat), flat).reshape(h.shape)

    ref = logits_with_raw_hook(model, model.model.layers[LAYER], recon, ids)
    torch.testing.assert_close(spliced, ref, atol=1e-4, rtol=1e-4)
    assert att.mode == "splice"
    # exclude_first=1: position 0 keeps the model's activation, so (causally) its logits are the model's own.
    with torch.no_grad(), sae.hook(model, exclude_first=1):
        partial = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(partial[:, 0], logits[:, 0], atol=1e-4, rtol=1e-4)
    assert (partial[:, 1:] - logits[:, 1:]).abs().max() > 1.0


def test_unfolded_input_scale_matches_folded_checkpoint(lm, tmp_path):
    """An in-memory dictionary trained on c·x (input_scale c) splices like its saved, folded checkpoint."""
    model, ids, _, _ = lm
    sae = random_topk(576, f"resid_post.{LAYER}", seed=4)
    sae.input_scale.fill_(0.25)
    sae.save_pretrained(tmp_path / "ckpt")
    folded = from_pretrained(tmp_path / "ckpt")
    assert float(folded.input_scale) == 1.0
    with torch.no_grad(), sae.hook(model, mode="both") as a:
        la = model(input_ids=ids, use_cache=False).logits
    with torch.no_grad(), folded.hook(model, mode="both") as b:
        lb = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.last.to_dense(), b.last.to_dense(), atol=1e-4, rtol=1e-4)


def test_codes_mode_exposes_codes_and_keeps_the_model(lm):
    model, ids, logits, hidden = lm
    sae = random_topk(576, f"resid_post.{LAYER}", seed=1)
    with torch.no_grad(), sae.hook(model, mode="codes") as att:
        out = model(input_ids=ids, use_cache=False).logits
        model(input_ids=ids[:, :4], use_cache=False)
    torch.testing.assert_close(out, logits)
    assert len(att.codes) == 2 and att.shapes == [tuple(ids.shape), (1, 4)]
    acts = hidden[LAYER + 1][0]  # hidden_states[L+1] = output of block L
    expected = sae.encode(acts).to_dense()
    torch.testing.assert_close(att.dense(0)[0], expected)
    torch.testing.assert_close(att.last.to_dense(), expected[:4])
    with torch.no_grad(), sae.hook(model, mode="both") as both:
        spliced = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(both.dense()[0], expected)
    assert (spliced - logits).abs().max() > 1.0


def test_transcoder_reads_input_and_replaces_target(lm):
    model, ids, logits, _ = lm
    torch.manual_seed(2)
    tc = make_dict("relu", 576, 1024, hookpoint=f"mlp_in.{LAYER}", target=f"mlp_out.{LAYER}").eval()
    with torch.no_grad():
        tc.W_dec.mul_(0.05)
    with torch.no_grad(), tc.hook(model, mode="both") as att:
        spliced = model(input_ids=ids, use_cache=False).logits
    mlp = model.model.layers[LAYER].mlp
    seen = {}

    def hook(_m, args, _out):
        x = args[0].reshape(-1, 576)
        seen["x"] = x
        return tc.decode(tc.encode(x), x).reshape(args[0].shape)

    handle = mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(spliced, ref, atol=1e-4, rtol=1e-4)
    assert (spliced - logits).abs().max() > 0.1
    torch.testing.assert_close(att.last.to_dense(), tc.encode(seen["x"]).to_dense())


def test_peer_checkpoint_attaches_at_its_hookpoint(lm, tmp_path):
    """A sparsify checkpoint names its hookpoint relative to the base model ('layers.3')."""
    model, ids, _, hidden = lm
    g = torch.Generator().manual_seed(3)
    n, d = 1152, 576
    save_file({"encoder.weight": torch.randn(n, d, generator=g) / d**0.5, "encoder.bias": torch.zeros(n),
               "W_dec": torch.randn(n, d, generator=g) * 0.1, "b_dec": torch.zeros(d)},
              str(tmp_path / "sae.safetensors"))  # fmt: skip
    (tmp_path / "cfg.json").write_text(
        json.dumps({"activation": "topk", "num_latents": n, "k": 8, "d_in": d})
    )
    sae = from_pretrained(tmp_path)
    sae.cfg.hookpoint = f"layers.{LAYER}"
    with torch.no_grad(), sae.hook(model, mode="codes") as att:
        model(input_ids=ids, use_cache=False)
    assert att.input_point.module_path == f"model.layers.{LAYER}"
    torch.testing.assert_close(att.last.to_dense(), sae.encode(hidden[LAYER + 1][0]).to_dense())


def test_bad_attachments_are_clear_errors(lm):
    model, ids, _, _ = lm
    small = random_topk(64, f"resid_post.{LAYER}")
    small.meta = {"model": "EleutherAI/pythia-70m"}
    with (
        pytest.raises(ValueError, match=r"expects inputs of width 64 .* produces width 576 .*pythia-70m"),
        torch.no_grad(),
        small.hook(model),
    ):
        model(input_ids=ids, use_cache=False)
    # the hook is removed after the failure: the model runs normally again
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        small.hook(model, mode="replace")
    with pytest.raises(KeyError, match="unknown hookpoint"):
        random_topk(576, "resid_post.99x").hook(model)
    nohook = random_topk(576, "")
    with pytest.raises(ValueError, match="has no hookpoint"):
        nohook.hook(model)


def test_splice_defaults_to_the_recorded_exclusion_rules(lm, smollm2):
    """F9: a checkpoint trained on a cache that left out BOS, the first 2 positions and special tokens is spliced
    at exactly the other positions by default; ``exclude_first=0`` splices all of them."""
    from sparsedict.cache.tokens import Exclusions

    model, ids, _, _ = lm
    _, tok = smollm2
    special = sorted(set(tok.all_special_ids) - {tok.bos_token_id})[0]
    ids = torch.cat(
        [torch.tensor([[tok.bos_token_id]]), ids[:, :5], torch.tensor([[special]]), ids[:, 5:]], 1
    )
    sae = random_topk(576, f"resid_post.{LAYER}", seed=5)
    rules = {"prepend_bos": True, "exclude_bos": True, "exclude_first_n": 2, "exclude_special": True}
    sae.meta = {"exclusions": Exclusions.make(rules, tok.bos_token_id, tok.all_special_ids).record()}
    keep = torch.ones(ids.shape, dtype=torch.bool)  # by hand: BOS, positions 0-1 and the special token stay
    keep[:, :2] = False
    keep[:, 6] = False

    def recon(h, keep=keep):
        flat = h.reshape(-1, 576)
        out = sae.decode(sae.encode(flat), flat).reshape(h.shape)
        return torch.where(keep[..., None], out, h)

    ref = logits_with_raw_hook(model, model.model.layers[LAYER], recon, ids)
    with torch.no_grad(), sae.hook(model):
        spliced = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(spliced, ref, atol=1e-4, rtol=1e-4)
    every = logits_with_raw_hook(
        model, model.model.layers[LAYER], lambda h: recon(h, torch.ones_like(keep)), ids
    )
    with torch.no_grad(), sae.hook(model, exclude_first=0):
        spliced_all = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(spliced_all, every, atol=1e-4, rtol=1e-4)
    assert (spliced_all - spliced).abs().max() > 1.0


def test_attach_uses_eval_mode_and_restores_the_mode(lm):
    """F9: a BatchTopK fresh from training (train mode) splices with its threshold θ, not a batch top-k over
    the tokens of the forward, and is back in train mode afterwards."""
    model, ids, _, _ = lm
    sae = make_dict("batchtopk", 576, 2304, k=16, hookpoint=f"resid_post.{LAYER}", seed=6)
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    sae.train()

    def recon(h):
        flat = h.reshape(-1, 576)
        acts = sae.pre_acts(flat).relu()
        return sae.decode(sae.encode(flat).__class__(acts * (acts > 0.5), None, sae.n_latents)).reshape(
            h.shape
        )

    ref = logits_with_raw_hook(model, model.model.layers[LAYER], recon, ids)
    with torch.no_grad(), sae.hook(model) as att:
        assert not sae.training
        spliced = model(input_ids=ids, use_cache=False).logits
    assert sae.training and att.dictionary is sae
    torch.testing.assert_close(spliced, ref, atol=1e-4, rtol=1e-4)
