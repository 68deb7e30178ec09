"""ActivationStore on a real SmolLM2 cache of the shipped corpus sample: values, sharding, shuffling, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import small_cache

from sparsedict.cache import ActivationStore, digest
from sparsedict.cache.store import RAM_FIXED

N_TOKENS = 1500


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    hps = ["resid_post.5", "mlp_hidden.2"]
    return small_cache(tmp_path_factory.mktemp("c"), hps, N_TOKENS, shard_rows=400, batch_size=8)


def _row_ids(store: ActivationStore) -> dict[bytes, int]:
    x = store.rows()
    ids = {x[i].numpy().tobytes(): i for i in range(len(x))}
    assert len(ids) == len(x), "rows are not unique; cannot identify them"
    return ids


def test_manifest_records_everything(cache):
    m = json.loads((cache / "manifest.json").read_text())
    assert m["status"] == "complete" and m["n_rows"] == N_TOKENS
    assert sum(s["rows"] for s in m["shards"]) == N_TOKENS and m["n_shards"] == len(m["shards"]) >= 3
    hp = m["hookpoints"]["mlp_hidden.2"]
    assert hp["path"] == "model.layers.2.mlp.down_proj:in" and hp["d"] == 1536 and hp["dtype"] == "float32"
    dropped = m["exclusions"]["dropped"]
    # one BOS and one position-1 row per context; pads only in each document's last context
    assert dropped["bos"] == dropped["first_n"] == m["n_contexts"]
    assert m["n_tokens_seen"] == N_TOKENS + dropped["bos"] + dropped["first_n"] + dropped["special"]
    for s in m["shards"]:
        assert len(s["files"]["tokens"]["xxh3_128"]) == 32 and s["status"] == "complete"


def test_values_equal_direct_forward(cache, smollm2):
    """Rows read back == hidden_states of a plain HF forward (and a raw hook) on the stored contexts."""
    model = smollm2[0]
    store = ActivationStore(cache, "resid_post.5", target="mlp_hidden.2", loop=False)
    tok = store.tokens()
    ids, attn, keep = tok["token_ids"].long(), tok["attention_mask"], tok["keep"]
    assert ids[:, 0].eq(1).all(), "contexts start with BOS (id 1)"
    assert not keep[:, :2].any() and keep.sum() == store.n_rows
    captured = []
    handle = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn.long(), output_hidden_states=True)
    handle.remove()
    x, y = store.rows()
    torch.testing.assert_close(x, out.hidden_states[6][keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, captured[0][keep], rtol=1e-4, atol=1e-4)
    # row_context / row_position index the same positions
    torch.testing.assert_close(ids[tok["row_context"], tok["row_position"].long()], ids[keep])


@pytest.mark.parametrize("shuffle", ["global", "window"])  # window: the order live training reads
def test_exactly_once_across_two_ranks(cache, shuffle):
    stores = [ActivationStore(cache, "resid_post.5", batch_size=64, rank=r, world_size=2, shuffle_buffer_rows=300,
                              block_rows=50, drop_last=False, loop=False, seed=3, shuffle=shuffle)
              for r in range(2)]  # fmt: skip
    ids = _row_ids(stores[0])
    seen = [[ids[row.numpy().tobytes()] for x, _ in s for row in x] for s in stores]
    assert len(seen[0]) == len(seen[1]) == N_TOKENS // 2
    union = seen[0] + seen[1]
    assert len(set(union)) == len(union) == N_TOKENS, "a row was served twice or skipped"
    if shuffle == "window":  # each rank reads its contiguous half of the cache, permuted
        assert sorted(seen[0]) == list(range(N_TOKENS // 2)) and seen[0] != sorted(seen[0])
    # a second epoch is reshuffled but again exactly once
    seen2 = [[ids[row.numpy().tobytes()] for x, _ in s for row in x] for s in stores]
    assert sorted(seen2[0] + seen2[1]) == list(range(N_TOKENS)) and seen2[0] != seen[0]


def test_shuffle_deterministic_and_mixed(cache):
    def batches(seed):
        s = ActivationStore(
            cache, "resid_post.5", batch_size=100, seed=seed, shuffle_buffer_rows=600, loop=False
        )
        return [x for x, _ in s]

    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    ids = _row_ids(ActivationStore(cache, "resid_post.5"))
    first = sorted(ids[r.numpy().tobytes()] for r in a[0])
    assert first != list(range(first[0], first[0] + 100)), "batch is a contiguous run of rows"
    assert np.ptp(first) > 600, "a batch should mix rows from far apart in the cache"


def test_resume_exact(cache):
    kw = dict(batch_size=96, seed=7, shuffle_buffer_rows=500, block_rows=64)
    full = ActivationStore(cache, "resid_post.5", target="mlp_hidden.2", **kw)
    it = iter(full)
    ref = [next(it) for _ in range(30)]  # crosses windows and an epoch boundary (15 batches / epoch)
    part = ActivationStore(cache, "resid_post.5", target="mlp_hidden.2", **kw)
    it = iter(part)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))
    resumed = ActivationStore(cache, "model.layers.5", target="model.layers.2.mlp.down_proj:in", **kw)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for x_ref, y_ref in ref[11:]:
        x, y = next(it)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert resumed.epoch == 1 and full.batches_per_epoch == N_TOKENS // 96


def test_ram_bound_sets_window(cache, monkeypatch):
    """The bound sizes the window (the served rows are unchanged); a bound below one batch is refused.
    Peak RSS under the bound is measured in test_cache_ram.py."""
    # leaves ~300 rows of window after the fixed, digest-window and batch-sized allowances
    bound = RAM_FIXED + digest.WINDOW + 1_500_000
    store = ActivationStore(cache, "resid_post.5", batch_size=32, max_ram_bytes=bound, loop=False)
    assert 32 <= store.shuffle_buffer_rows < 400
    sizes = []
    orig = ActivationStore._fill

    def spy(self, plan, epoch, k, bufs):
        n, pieces = orig(self, plan, epoch, k, bufs)
        sizes.append(n)
        assert len(bufs[0]) <= store.shuffle_buffer_rows
        return n, pieces

    monkeypatch.setattr(ActivationStore, "_fill", spy)
    n = sum(len(x) for x, _ in store)
    assert n == (N_TOKENS // 32) * 32 and max(sizes) <= store.shuffle_buffer_rows and len(sizes) > 3
    with pytest.raises(ValueError, match="max_ram_bytes=1000000 is too small for batch_size=32"):
        ActivationStore(cache, "resid_post.5", batch_size=32, max_ram_bytes=1_000_000)


def test_norm_stats(cache):
    store = ActivationStore(cache, "resid_post.5")
    x = store.rows().double()
    stats = store.norm_stats()
    torch.testing.assert_close(stats["mean"].double(), x.mean(0), rtol=1e-5, atol=1e-5)
    assert stats["mean_sq_norm"] == pytest.approx(float((x * x).sum(1).mean()), rel=1e-9)
    assert "resid_post.5" in json.loads((cache / "manifest.json").read_text())["stats"]


def test_sample_rows_come_from_cache(cache):
    store = ActivationStore(cache, "resid_post.5", target="mlp_hidden.2")
    x, y = store.sample(200, seed=1)
    _, ys = store.rows()
    ids = _row_ids(ActivationStore(cache, "resid_post.5"))
    idx = [ids[r.numpy().tobytes()] for r in x]
    assert len(set(idx)) == 200 and torch.equal(ys[idx], y)
    assert torch.equal(store.sample(200, seed=1)[0], x)


def test_default_window_follows_host_memory(cache, monkeypatch):
    """With no bound given, the window is the largest under half the host's available memory shared by the local
    ranks and the stores a rank opens (the same window an explicit bound of that size gives), at most
    DEFAULT_WINDOW_ROWS; a share below MIN_WINDOW_BATCHES batches is refused, naming the fix."""
    import types

    import psutil

    from sparsedict.cache.store import DEFAULT_WINDOW_ROWS, MIN_WINDOW_BATCHES

    def host(available: int, ranks: int) -> None:
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))

    kw = dict(batch_size=32, loop=False)
    host(1 << 40, 1)  # 1 TiB: the cap
    big = ActivationStore(cache, "resid_post.5", **kw)
    assert big.shuffle_buffer_rows == DEFAULT_WINDOW_ROWS and "the default cap" in big.window_summary()
    assert f"shuffle window {N_TOKENS:,} rows" in big.window_summary()  # never more than the rank's rows
    share = RAM_FIXED + digest.WINDOW + 12_000_000  # about 4,400 rows of d = 576 after the allowances
    explicit = ActivationStore(cache, "resid_post.5", max_ram_bytes=share, **kw).shuffle_buffer_rows
    assert MIN_WINDOW_BATCHES * 32 <= explicit < DEFAULT_WINDOW_ROWS
    for available, ranks, sources in [(2 * share, 1, 1), (8 * share, 4, 1), (4 * share, 1, 2)]:
        host(available, ranks)
        store = ActivationStore(cache, "resid_post.5", ram_sources=sources, **kw)
        assert store.shuffle_buffer_rows == explicit, (available, ranks, sources)
        assert f"{ranks} local rank(s)" in store.window_summary()
    assert sum(len(x) for x, _ in store) == (N_TOKENS // 32) * 32
    host(2 * (RAM_FIXED + digest.WINDOW + 1_500_000), 1)  # ~300 rows: under 16 batches of 32
    with pytest.raises(ValueError, match="below the floor of 16 batches of 32: free host memory"):
        ActivationStore(cache, "resid_post.5", **kw)


@pytest.mark.parametrize("shuffle", ["global", "window"])
def test_hold_out_rows_never_served(cache, shuffle):
    """hold_out takes whole blocks drawn from the whole cache out of every epoch (the same rows on each rank),
    returns them with their targets, and the ranks' epochs then serve every other row exactly once."""
    kw = dict(batch_size=50, shuffle_buffer_rows=300, block_rows=50, drop_last=False, loop=False, seed=3,
              shuffle=shuffle)  # fmt: skip
    stores = [ActivationStore(cache, "resid_post.5", target="mlp_hidden.2", rank=r, world_size=2, **kw)
              for r in range(2)]  # fmt: skip
    ids = _row_ids(ActivationStore(cache, "resid_post.5"))
    held = [s.hold_out(120, seed=5) for s in stores]
    assert torch.equal(held[0][0], held[1][0]) and torch.equal(held[0][1], held[1][1])
    x_held, y_held = held[0]
    held_ids = [ids[r.numpy().tobytes()] for r in x_held]
    assert len(held_ids) == stores[0].held_rows >= 120  # whole blocks: at least the rows asked for
    assert np.ptp(held_ids) + 1 > len(held_ids) and min(held_ids) > 0, "drawn blocks, not the cache's head"
    torch.testing.assert_close(y_held, stores[0].rows()[1][held_ids])  # the targets of the same rows
    for epoch in range(2):
        seen = [ids[row.numpy().tobytes()] for s in stores for x, _ in s for row in x]
        assert len(seen) == len(set(seen)) == N_TOKENS - len(held_ids), (
            f"epoch {epoch}: a row twice or skipped"
        )
        assert not set(seen) & set(held_ids), f"epoch {epoch}: a held-out row was served"
    again = ActivationStore(cache, "resid_post.5", target="mlp_hidden.2", rank=0, world_size=2, **kw)
    assert torch.equal(again.hold_out(120, seed=5)[0], x_held)  # fixed by the seed
    other = ActivationStore(cache, "resid_post.5", target="mlp_hidden.2", **kw)
    assert not torch.equal(other.hold_out(120, seed=6)[0][:100], x_held[:100])


def test_hold_out_is_part_of_the_resume_check(cache):
    kw = dict(batch_size=64, seed=1, block_rows=50)
    a = ActivationStore(cache, "resid_post.5", **kw)
    a.hold_out(100, seed=0)
    next(iter(a))
    state = a.state_dict()
    plain = ActivationStore(cache, "resid_post.5", **kw)
    with pytest.raises(ValueError, match=f"held_rows={a.held_rows} but this store has 0"):
        plain.load_state_dict(state)
    with pytest.raises(RuntimeError, match="before the first batch"):
        a.hold_out(100, seed=0)
