"""Hookpoint resolution across model families (tiny random configs) and record/replace on the real SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from sparsedict.cache import hooks

TINY = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32),
    "neox": lambda: transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                               intermediate_size=40, vocab_size=64),
    "gemma": lambda: transformers.GemmaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                              num_key_value_heads=1, head_dim=8, intermediate_size=40, vocab_size=64),
    "gemma2": lambda: transformers.Gemma2Config(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                                num_key_value_heads=1, head_dim=8, intermediate_size=40,
                                                vocab_size=64),
}  # fmt: skip

EXPECTED = {
    "gpt2": {"resid_post.1": "transformer.h.1", "resid_pre.0": "transformer.h.0:in",
             "attn_out.1": "transformer.h.1.attn", "attn_z.1": "transformer.h.1.attn.c_proj:in",
             "mlp_in.0": "transformer.h.0.mlp:in", "mlp_hidden.1": "transformer.h.1.mlp.c_proj:in",
             "mlp_out.1": "transformer.h.1.mlp"},
    "neox": {"resid_post.1": "gpt_neox.layers.1", "attn_out.0": "gpt_neox.layers.0.attention",
             "attn_z.1": "gpt_neox.layers.1.attention.dense:in", "mlp_in.1": "gpt_neox.layers.1.mlp:in",
             "mlp_hidden.0": "gpt_neox.layers.0.mlp.dense_4h_to_h:in", "mlp_out.1": "gpt_neox.layers.1.mlp"},
    "gemma": {"resid_post.1": "model.layers.1", "attn_out.1": "model.layers.1.self_attn",
              "attn_z.0": "model.layers.0.self_attn.o_proj:in", "mlp_in.1": "model.layers.1.mlp:in",
              "mlp_hidden.1": "model.layers.1.mlp.down_proj:in", "mlp_out.0": "model.layers.0.mlp"},
    "gemma2": {"resid_post.1": "model.layers.1", "attn_out.1": "model.layers.1.post_attention_layernorm",
               "mlp_hidden.1": "model.layers.1.mlp.down_proj:in",
               "mlp_out.0": "model.layers.0.post_feedforward_layernorm"},
}  # fmt: skip

HIDDEN = {"gpt2": 64, "neox": 40, "gemma": 40, "gemma2": 40}


@pytest.mark.parametrize("family", list(TINY))
def test_aliases_resolve_per_family(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY[family]()).eval()
    for alias, path in EXPECTED[family].items():
        hp = hooks.resolve(model, alias)
        assert hp.path == path, (family, alias, hp)
        assert hp.layer == int(alias.split(".")[1])
    names = list(EXPECTED[family])
    acts = hooks.record(model, names, torch.randint(0, 64, (2, 5)))
    for name in names:
        d = HIDDEN[family] if name.startswith("mlp_hidden") else 16
        assert acts[name].shape == (2, 5, d), (family, name, acts[name].shape)
    # resid_post.L is the block output = hidden_states[L + 1] (tuple outputs handled)
    with torch.no_grad():
        hs = model(torch.randint(0, 64, (1, 4)), output_hidden_states=True).hidden_states
        got = hooks.record(model, ["resid_post.0"], torch.randint(0, 64, (1, 4)))
    assert got["resid_post.0"].shape == hs[1].shape


def test_unknown_and_out_of_range_names(smollm2):
    model, _ = smollm2
    with pytest.raises(KeyError, match=r"resid_post\.3.*Valid names include: resid_pre\.0"):
        hooks.resolve(model, "resid_pst.3")
    with pytest.raises(KeyError, match=r"layer 30 out of range.*30 blocks"):
        hooks.resolve(model, "mlp_out.30")
    with pytest.raises(KeyError, match="unknown hookpoint"):
        hooks.resolve(model, "model.layers.6.mlp:sideways")
    assert "mlp_hidden.29" in hooks.available(model) and "model.layers.6.mlp:in" in hooks.available(model)


def test_record_matches_independent_computation(smollm2):
    model, tok = smollm2
    ids = torch.tensor(
        [[1, *tok("The cat sat on the mat because it was warm.", add_special_tokens=False)["input_ids"]]]
    )
    names = ["resid_post.4", "mlp_in.4", "mlp_hidden.4", "mlp_out.4", "attn_z.4", "attn_out.4", "resid_pre.4"]
    early = hooks.record(model, names, ids, stop_after=True)
    full = hooks.record(model, names, ids, stop_after=False)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    layer = model.model.layers[4]
    for name in names:
        assert torch.equal(early[name], full[name]), name
    torch.testing.assert_close(early["resid_post.4"], hs[5], rtol=0, atol=0)
    torch.testing.assert_close(early["resid_pre.4"], hs[4], rtol=0, atol=0)
    with torch.no_grad():
        mlp = layer.mlp
        hidden = torch.nn.functional.silu(mlp.gate_proj(early["mlp_in.4"])) * mlp.up_proj(early["mlp_in.4"])
        torch.testing.assert_close(early["mlp_hidden.4"], hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(early["mlp_out.4"], mlp.down_proj(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            early["attn_out.4"], layer.self_attn.o_proj(early["attn_z.4"]), rtol=1e-5, atol=1e-5
        )
        # residual decomposition: resid_post = resid_pre + attn_out + mlp_out
        total = early["resid_pre.4"] + early["attn_out.4"] + early["mlp_out.4"]
        torch.testing.assert_close(early["resid_post.4"], total, rtol=1e-5, atol=1e-4)
    assert early["mlp_hidden.4"].shape[-1] == 1536 and early["attn_z.4"].shape[-1] == 576


def test_replace_splices_into_forward(smollm2):
    model, _ = smollm2
    ids = torch.tensor([[1, 504, 2115, 282, 4649, 314]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with hooks.replace(model, "resid_post.3", lambda x: x.clone()):
            same = model(input_ids=ids).logits
        with hooks.replace(model, "mlp_out.3", torch.zeros_like):
            ablated = model(input_ids=ids).logits
        with hooks.replace(model, "mlp_hidden.2", lambda x: 2 * x):
            doubled = model(input_ids=ids).logits
        ref = copy.deepcopy(model)
        ref.model.layers[3].mlp.down_proj.weight.zero_()
        ref.model.layers[2].mlp.down_proj.weight.mul_(2)
        ref_out = ref(input_ids=ids).logits
        ref.model.layers[2].mlp.down_proj.weight.div_(2)
        ref_abl = ref(input_ids=ids).logits
    assert torch.equal(base, same)
    torch.testing.assert_close(ablated, ref_abl, rtol=1e-4, atol=1e-4)
    with (
        torch.no_grad(),
        hooks.replace(model, "mlp_out.3", torch.zeros_like),
        hooks.replace(model, "mlp_hidden.2", lambda x: 2 * x),
    ):
        both = model(input_ids=ids).logits
    torch.testing.assert_close(both, ref_out, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(doubled, base, atol=1e-2)
    with (
        pytest.raises(ValueError, match="fn returned shape"),
        hooks.replace(model, "resid_post.3", lambda x: x[..., :5]),
    ):
        model(input_ids=ids)
    # hooks are removed afterwards
    assert torch.equal(model(input_ids=ids).logits.detach(), base)
