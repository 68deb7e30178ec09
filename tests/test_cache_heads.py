"""Attention z per head (``attn_z.L.hK``) on the real SmolLM2: manifest layout, store values against a direct
hook on o_proj's input, shuffled head batches against the merged ones, splicing one head, clear errors."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import transformers
from helpers import small_cache

from sparsedict.cache import ActivationStore, hooks

N_TOKENS = 400
N_HEADS, D_HEAD = 9, 64  # SmolLM2-135M: 9 query heads of 64 (3 KV heads), o_proj input 576


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    hps = ["attn_z.3", "attn_z.3.h5", "resid_post.3"]
    return small_cache(tmp_path_factory.mktemp("heads"), hps, N_TOKENS, shard_rows=150, batch_size=8)


def test_manifest_records_head_layout(cache):
    hps = json.loads((cache / "manifest.json").read_text())["hookpoints"]
    assert (hps["attn_z.3"]["n_heads"], hps["attn_z.3"]["d_head"], hps["attn_z.3"]["d"]) == (
        N_HEADS,
        D_HEAD,
        576,
    )
    assert hps["attn_z.3.h5"]["head"] == 5 and hps["attn_z.3.h5"]["d"] == D_HEAD
    assert hps["attn_z.3.h5"]["path"] == "model.layers.3.self_attn.o_proj:in.h5"
    assert "n_heads" not in hps["resid_post.3"]


def test_head_rows_equal_direct_hook(cache, smollm2):
    """Every head's rows == o_proj's input, captured by a plain pre-hook, reshaped to heads."""
    model, _ = smollm2
    merged = ActivationStore(cache, "attn_z.3")
    tok = merged.tokens()
    captured = []
    handle = model.model.layers[3].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: captured.append(a[0])
    )
    with torch.no_grad():
        model(input_ids=tok["token_ids"].long(), attention_mask=tok["attention_mask"].long())
    handle.remove()
    ref = captured[0][tok["keep"]].reshape(-1, N_HEADS, D_HEAD)  # [rows, heads, d_head]
    assert (merged.n_heads, merged.d_head, merged.head) == (N_HEADS, D_HEAD, None)
    torch.testing.assert_close(merged.rows().view(-1, N_HEADS, D_HEAD), ref, rtol=1e-4, atol=1e-4)
    for h in (0, 2, 8):
        store = ActivationStore(cache, f"attn_z.3.h{h}")
        assert (store.d_in, store.head, store.hookpoint) == (D_HEAD, h, f"attn_z.3.h{h}")
        torch.testing.assert_close(store.rows(), ref[:, h], rtol=1e-4, atol=1e-4)
    # the head cached directly holds the same values; the raw path with a head suffix works too
    direct = ActivationStore(cache, "attn_z.3.h5", loop=False)
    assert direct.head is None and direct.d_in == D_HEAD
    assert torch.equal(direct.rows(), ActivationStore(cache, "attn_z.3.h5").rows())
    torch.testing.assert_close(direct.rows(), ref[:, 5], rtol=1e-4, atol=1e-4)
    raw = ActivationStore(cache, "model.layers.3.self_attn.o_proj:in.h2")
    assert raw.hookpoint == "attn_z.3.h2" and torch.equal(
        raw.rows(), merged.rows()[:, 2 * D_HEAD : 3 * D_HEAD]
    )


def test_shuffled_head_batches_are_slices_of_merged(cache):
    """The windowed, shuffled path serves exactly the head slice of the merged batches (same seed), also as a
    transcoder pair and with normalisation statistics of the head alone."""
    kw = dict(batch_size=48, seed=4, shuffle_buffer_rows=130, block_rows=32, drop_last=False, loop=False)
    merged = [x for x, _ in ActivationStore(cache, "attn_z.3", **kw)]
    pairs = list(ActivationStore(cache, "attn_z.3.h7", target="resid_post.3", **kw))
    assert len(pairs) == len(merged) == -(-N_TOKENS // 48)
    for m, (x, y) in zip(merged, pairs):
        assert torch.equal(x, m.view(-1, N_HEADS, D_HEAD)[:, 7]) and y.shape == (len(x), 576)
    store = ActivationStore(cache, "attn_z.3.h7")
    stats = store.norm_stats()
    x = store.rows().double()
    torch.testing.assert_close(stats["mean"].double(), x.mean(0), rtol=1e-5, atol=1e-5)
    assert "attn_z.3.h7" in json.loads((cache / "manifest.json").read_text())["stats"]


def test_store_head_errors(cache):
    with pytest.raises(KeyError, match=r"head 9 out of range.*9 heads \(0\.\.8\)"):
        ActivationStore(cache, "attn_z.3.h9")
    with pytest.raises(KeyError, match="no per-head layout"):
        ActivationStore(cache, "resid_post.3.h1")
    with pytest.raises(KeyError, match="not in the cache"):
        ActivationStore(cache, "attn_z.4.h1")


def test_record_and_splice_one_head(smollm2):
    model, _ = smollm2
    ids = torch.tensor([[1, 504, 2115, 282, 4649, 314, 260, 2743]])
    hp = hooks.resolve(model, "attn_z.3.h2")
    assert (hp.head, hp.n_heads, hp.d_head, hp.path) == (
        2,
        N_HEADS,
        D_HEAD,
        "model.layers.3.self_attn.o_proj:in.h2",
    )
    raw = hooks.resolve(model, "model.layers.3.self_attn.o_proj:in.h2")  # raw path + head suffix
    assert (raw.path, raw.head, raw.n_heads, raw.d_head) == (hp.path, 2, N_HEADS, D_HEAD)
    acts = hooks.record(model, ["attn_z.3", "attn_z.3.h2"], ids)
    assert torch.equal(acts["attn_z.3.h2"], acts["attn_z.3"][..., 2 * D_HEAD : 3 * D_HEAD])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with hooks.replace(model, "attn_z.3.h2", lambda z: z.clone()):
            same = model(input_ids=ids).logits
        with hooks.replace(model, "attn_z.3.h2", torch.zeros_like):
            ablated = model(input_ids=ids).logits
        ref = copy.deepcopy(model)  # zeroing head 2 == zeroing its 64 input columns of o_proj
        ref.model.layers[3].self_attn.o_proj.weight[:, 2 * D_HEAD : 3 * D_HEAD] = 0
        ref_ablated = ref(input_ids=ids).logits
    assert torch.equal(base, same)
    torch.testing.assert_close(ablated, ref_ablated, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ablated, base, atol=1e-3)
    with (
        pytest.raises(ValueError, match=r"fn returned shape .*expected \(1, 8, 64\)"),
        hooks.replace(model, "attn_z.3.h2", lambda z: z[..., :5]),
    ):
        model(input_ids=ids)


def test_head_name_errors(smollm2):
    model, _ = smollm2
    with pytest.raises(KeyError, match="head suffix only applies to attention z"):
        hooks.resolve(model, "resid_post.3.h1")
    with pytest.raises(KeyError, match=r"head 9 out of range \(9 heads"):
        hooks.resolve(model, "attn_z.3.h9")


def test_gpt2_head_layout():
    """GPT-2 (Conv1D c_proj, n_head/n_embd config names): the head slice of attn_z is found and recorded."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hp = hooks.resolve(model, "attn_z.1.h3")
    assert (hp.n_heads, hp.d_head, hp.path) == (4, 4, "transformer.h.1.attn.c_proj:in.h3")
    acts = hooks.record(model, ["attn_z.1", "attn_z.1.h3"], torch.randint(0, 64, (2, 5)))
    assert torch.equal(acts["attn_z.1.h3"], acts["attn_z.1"][..., 12:16])


def test_per_head_dictionary_recipe_train_splice(cache, smollm2):
    """A recipe may name a head of a cached attn_z; a TopK on that head takes d_in from the store, trains,
    and splices into the model exactly where a raw o_proj pre-hook would put it."""
    from sparsedict.dictionaries import reconstruct
    from sparsedict.pipeline import build_dictionaries, open_sources
    from sparsedict.train.recipe import parse_recipe

    recipe = parse_recipe({
        "cache": {"hookpoints": ["attn_z.3"], "dataset": "embedded-sample"},
        "dictionaries": [{"architecture": "topk", "hookpoint": "attn_z.3.h2", "k": 4, "expansion": 2}],
        "train": {"seed": 0},
    })  # fmt: skip
    sources = open_sources(recipe, cache, batch_size=64, rank=0, world=1)
    (sae,) = build_dictionaries(recipe, sources).values()
    assert (sae.d_in, sae.n_latents) == (D_HEAD, 2 * D_HEAD)
    sae.init_from_data(*sources[("attn_z.3.h2", "")].sample(200))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for x, _ in itertools.islice(sources[("attn_z.3.h2", "")], 3):  # the store loops forever
        loss = sum(sae(x).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    model, _ = smollm2
    ids = torch.tensor([[1, 504, 2115, 282, 4649, 314, 260, 2743]])
    cols = slice(2 * D_HEAD, 3 * D_HEAD)

    def by_hand(_mod, args):
        z = args[0].clone()
        z[..., cols] = reconstruct(sae, z[0, :, cols])[0].unsqueeze(0)
        return (z,)

    with torch.no_grad():
        with sae.hook(model, "splice"):
            spliced = model(input_ids=ids).logits
        handle = model.model.layers[3].self_attn.o_proj.register_forward_pre_hook(by_hand)
        ref = model(input_ids=ids).logits
        handle.remove()
    torch.testing.assert_close(spliced, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced, model(input_ids=ids).logits.detach(), atol=1e-4)
