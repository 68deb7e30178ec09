"""LiveSource serves the same rows as the disk cache of the same config, shuffled, deterministic, resumable."""

from __future__ import annotations

import torch

from sparsedict.cache import ActivationStore, CacheConfig, LiveSource, cache_activations


def test_live_matches_disk_cache(tmp_path, smollm2):
    cfg = CacheConfig(dataset="embedded-sample", hookpoints=["resid_post.3", "mlp_hidden.3"], max_tokens=700,
                      shard_rows=200, out_dir=str(tmp_path / "c"), progress=False, num_threads=1)  # fmt: skip
    store = ActivationStore(cache_activations(cfg), "resid_post.3", target="mlp_hidden.3")
    xs, ys = store.rows()
    index = {xs[i].numpy().tobytes(): i for i in range(len(xs))}
    model, tok = smollm2
    kw = dict(hookpoint="resid_post.3", target="mlp_hidden.3", batch_size=64, shuffle_buffer_rows=250, loop=False,
              model=model, tokenizer=tok)  # fmt: skip
    live = LiveSource(cfg, **kw)
    assert (live.d_in, live.d_out) == (576, 1536)
    batches = list(live)
    assert len(batches) == 700 // 64 and live.epoch == 1
    seen = []
    for x, y in batches:
        idx = [index[r.numpy().tobytes()] for r in x]  # every row is a cached row (bit-identical)
        assert torch.equal(y, ys[idx])
        seen += idx
    assert len(set(seen)) == len(seen) == 10 * 64
    assert sorted(seen[:64]) != list(range(min(seen[:64]), min(seen[:64]) + 64)), (
        "first batch is not shuffled"
    )
    # deterministic, and resumable mid-epoch
    again = LiveSource(cfg, **kw)
    again.load_state_dict({"epoch": 0, "batch": 5, "seed": 0})
    rest = list(again)
    assert len(rest) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, batches[5:]))
