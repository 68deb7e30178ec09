"""LiveSource serves bitwise the batches of ``ActivationStore(..., shuffle="window")`` over the disk cache of the
same config: the same rows in the same order, per rank, after a resume, and the same ``sample``, for one hookpoint
and for lists of them (``[B, L, d]`` batches); views of one stream share its forwards, and a view read out of
lockstep still gets its own batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsedict.cache import ActivationStore, CacheConfig, cache_activations
from sparsedict.cache.live import LiveSource, LiveStream

HP, TARGET = "resid_post.3", "mlp_hidden.3"
INS, OUTS = ["mlp_in.1", "mlp_in.3"], ["mlp_out.1", "mlp_out.3"]  # a cross-layer transcoder's layers


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> CacheConfig:
    cfg = CacheConfig(dataset="embedded-sample", hookpoints=[HP, TARGET, *INS, *OUTS], max_tokens=700, context_length=40,
                      shard_rows=200, out_dir=str(tmp_path_factory.mktemp("c")), progress=False, num_threads=1)  # fmt: skip
    cache_activations(cfg)
    return cfg


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and (ya is None) == (yb is None) and (ya is None or torch.equal(ya, yb))
        for (xa, ya), (xb, yb) in zip(a, b)
    )


@pytest.mark.parametrize(("world", "window", "start"), [(1, 250, 0), (1, 250, 5), (2, 150, 0), (2, 150, 3)])
def test_live_batches_equal_the_window_store(cache, smollm2, world, window, start):
    model, tok = smollm2
    kw = dict(target=TARGET, batch_size=48, seed=2, world_size=world, shuffle_buffer_rows=window)
    for rank in range(world):
        store = ActivationStore(cache.out_dir, HP, rank=rank, shuffle="window", **kw)
        live = LiveSource(cache, HP, rank=rank, model=model, tokenizer=tok, **kw)
        assert (live.d_in, live.d_out, live.n_rows) == (576, 1536, 700)
        for src in (store, live):
            src.load_state_dict({"epoch": 0, "batch": start, "seed": 2})
        n = 2 * len(store) - start  # the rest of epoch 0 and all of epoch 1 (other permutations)
        want = list(itertools.islice(iter(store), n))
        assert _equal(list(itertools.islice(iter(live), n)), want), (rank, world, window, start)
        assert live.state_dict()["epoch"] == store.state_dict()["epoch"] == 1
    x, y = store.sample(300, seed=4)
    lx, ly = live.sample(300, seed=4)
    assert torch.equal(x, lx) and torch.equal(y, ly)


@pytest.mark.parametrize(("world", "start"), [(1, 0), (1, 5), (2, 3)])
def test_live_stacked_batches_equal_the_window_store(cache, smollm2, world, start):
    """Lists of hookpoints: ``[B, L, d]`` batches of the same rows, bitwise the multi-hookpoint store's, per rank,
    from a resumed position, into a second epoch; a resume from a live state continues with the next batch."""
    model, tok = smollm2
    kw = dict(target=OUTS, batch_size=48, seed=2, world_size=world, shuffle_buffer_rows=150 * world)
    for rank in range(world):
        store = ActivationStore(cache.out_dir, INS, rank=rank, shuffle="window", **kw)
        live = LiveSource(cache, INS, rank=rank, model=model, tokenizer=tok, **kw)
        assert (live.x_shape, live.y_shape, live.hookpoint, live.target) == ((2, 576), (2, 576), INS, OUTS)
        for src in (store, live):
            src.load_state_dict({"epoch": 0, "batch": start, "seed": 2})
        n = 2 * len(store) - start
        want = list(itertools.islice(iter(store), n))
        assert want[0][0].shape == want[0][1].shape == (48, 2, 576)
        assert not torch.equal(want[0][0][:, 0], want[0][0][:, 1])  # two layers, not one served twice
        it = iter(live)
        got = list(itertools.islice(it, 3))
        again = LiveSource(cache, INS, rank=rank, model=model, tokenizer=tok, **kw)
        again.load_state_dict(
            live.state_dict()
        )  # stopped after 3 batches: resumes at the 4th, none lost or repeated
        got += list(itertools.islice(iter(again), n - 3))
        assert _equal(got, want), (rank, world, start)
        assert again.state_dict()["epoch"] == store.state_dict()["epoch"] == 1
    x, y = store.sample(300, seed=4)
    lx, ly = live.sample(300, seed=4)
    assert torch.equal(x, lx) and torch.equal(y, ly)


def test_stacked_and_single_views_share_one_stream(cache, smollm2):
    """A stacked view and single views of one stream read the same rows; widths must match; names must be known."""
    model, tok = smollm2
    stream = LiveStream(cache, [tuple(INS), tuple(OUTS), HP], batch_size=64, model=model, tokenizer=tok)
    views = stream.sources([(tuple(INS), tuple(OUTS)), (INS[1], ""), (tuple(INS), "")], loop=False)
    for (x, y), (x1, none), (xs, none2) in zip(*(iter(v) for v in views.values())):
        assert (
            torch.equal(x[:, 1], x1) and torch.equal(x, xs) and none is none2 is None and y.shape == x.shape
        )
    with pytest.raises(ValueError, match=r"different widths \[576, 1536\].*\[B, L, d\]"):
        LiveSource(cache, [HP, TARGET], model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="empty list"):
        LiveSource.view(stream, INS, [])
    with pytest.raises(KeyError, match="not computed by this live stream"):
        LiveSource.view(stream, [INS[0], "mlp_in.2"])


def test_window_order_shuffles_within_windows_only(cache):
    store = ActivationStore(
        cache.out_dir, HP, batch_size=50, shuffle="window", shuffle_buffer_rows=200, loop=False
    )
    rows = store.rows()
    batches = [x for x, _ in store]
    assert len(batches) == 14  # windows of 200, 200, 200 and 100 rows: 4 + 4 + 4 + 2 batches
    for k in range(4):  # window k's batches hold exactly rows [200k, 200(k+1)) of the cache, permuted
        got = torch.cat(batches[4 * k : 4 * k + 4])
        want = rows[200 * k : 200 * (k + 1)]
        assert sorted(r.numpy().tobytes() for r in got) == sorted(r.numpy().tobytes() for r in want)
        assert not torch.equal(got, want)


def test_views_of_one_stream_share_its_forwards(cache, smollm2):
    model, tok = smollm2
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        alone = LiveSource(cache, HP, batch_size=64, model=model, tokenizer=tok, loop=False)
        calls.clear()
        want = list(alone)
        one = len(calls)
        stream = LiveStream(cache, [HP, TARGET], batch_size=64, model=model, tokenizer=tok)
        views = stream.sources([(HP, ""), (HP, TARGET), (TARGET, "")], loop=False)
        calls.clear()
        got = {key: [] for key in views}
        for batches in zip(*(iter(v) for v in views.values())):  # lockstep, as the trainer reads
            for key, b in zip(views, batches):
                got[key].append(b)
        assert len(calls) == one  # three views, one forward per batch of contexts
        assert _equal(got[(HP, "")], want)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got[(HP, TARGET)], want))
        assert all(torch.equal(a[1], b[0]) for a, b in zip(got[(HP, TARGET)], got[(TARGET, "")]))

        ahead = stream.sources(
            [(HP, ""), (TARGET, "")], loop=False
        )  # out of lockstep: recomputes, still right
        first = list(ahead[(HP, "")])
        second = list(ahead[(TARGET, "")])
        assert _equal(first, want) and _equal(second, got[(TARGET, "")])
    finally:
        handle.remove()


def test_resume_across_sources_only_in_the_same_order(cache, smollm2):
    model, tok = smollm2
    kw = dict(batch_size=64, seed=1, shuffle_buffer_rows=300)
    store = ActivationStore(cache.out_dir, HP, shuffle="window", **kw)
    it = iter(store)
    for _ in range(3):
        next(it)
    live = LiveSource(cache, HP, model=model, tokenizer=tok, **kw)
    live.load_state_dict(store.state_dict())  # a cached run in window order resumes live: the same batches
    assert _equal(list(itertools.islice(iter(live), 4)), list(itertools.islice(it, 4)))
    store.load_state_dict(live.state_dict())  # and back

    refused = {
        "shuffle='window'": ActivationStore(cache.out_dir, HP, **kw),  # a store in global order
        "batch_size=64": LiveSource(cache, HP, model=model, tokenizer=tok, **{**kw, "batch_size": 32}),
        "shuffle_buffer_rows=300": LiveSource(
            cache, HP, model=model, tokenizer=tok, **{**kw, "shuffle_buffer_rows": 200}
        ),
    }
    for what, other in refused.items():
        with pytest.raises(ValueError, match=f"{what}.*would read other batches"):
            other.load_state_dict(live.state_dict())
    elsewhere = CacheConfig(**{**cache.__dict__, "exclude_first_n": 3})
    with pytest.raises(ValueError, match="config_hash"):
        LiveSource(elsewhere, HP, model=model, tokenizer=tok, **kw).load_state_dict(live.state_dict())
