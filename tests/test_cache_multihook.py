"""Several hookpoints in one batch: an ActivationStore opened with lists of hookpoints serves the same rows of
each, stacked ``[B, L, d]``, from one shuffle (the data of a cross-layer transcoder or a transcoder set).

Checked against single-hookpoint stores of the same cache and seed: every batch, ``sample`` and ``rows`` is
theirs stacked; an exact resume continues with the same batch; hookpoints of different widths are refused.
"""

from __future__ import annotations

import pytest
import torch
from helpers import small_cache

from sparsedict.cache import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")
INS, OUTS = ["mlp_in.1", "mlp_in.2"], ["mlp_out.1", "mlp_out.2"]
KW = dict(batch_size=32, seed=3, shuffle_buffer_rows=100, loop=False)  # several windows and a tail per epoch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return small_cache(
        tmp_path_factory.mktemp("multi"), [*INS, *OUTS, "mlp_hidden.1"], 300, context_length=48
    )


def test_listed_hookpoints_are_the_rows_of_each_stacked(cache):
    multi = ActivationStore(cache, INS, target=OUTS, **KW)
    singles = [ActivationStore(cache, h, target=t, **KW) for h, t in zip(INS, OUTS)]
    d = singles[0].d_in
    assert (multi.x_shape, multi.y_shape, multi.d_in, multi.d_out) == ((2, d), (2, d), d, d)
    assert singles[0].x_shape == (d,) and multi.hookpoint == INS and multi.n_rows == singles[0].n_rows
    its = [iter(s) for s in singles]
    batches = 0
    for x, y in multi:
        assert x.shape == y.shape == (32, 2, d)
        for i, it in enumerate(its):
            xs, ys = next(it)
            assert torch.equal(x[:, i], xs) and torch.equal(y[:, i], ys)
        batches += 1
    assert batches == multi.batches_per_epoch == singles[0].batches_per_epoch >= 5
    for it in its:  # the single stores end with it
        assert next(it, None) is None
    x, y = multi.sample(40, seed=1)
    for i, s in enumerate(singles):
        xs, ys = s.sample(40, seed=1)
        assert torch.equal(x[:, i], xs) and torch.equal(y[:, i], ys)
    xr, yr = multi.rows(10, 50)
    assert torch.equal(xr[:, 1], singles[1].rows(10, 50)[0]) and torch.equal(
        yr[:, 0], singles[0].rows(10, 50)[1]
    )
    assert not torch.equal(xr[:, 0], xr[:, 1])  # two different hookpoints, not one served twice


def test_an_input_list_without_targets_and_exact_resume(cache):
    store = ActivationStore(cache, INS, **KW)
    it = iter(store)
    for _ in range(3):
        next(it)
    state = store.state_dict()
    want, y = next(it)
    assert y is None and want.shape == (32, 2, store.d_in)
    again = ActivationStore(cache, INS, **KW)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))[0], want)


def test_hookpoints_of_different_widths_are_refused(cache):
    with pytest.raises(ValueError, match=r"different widths.*\[B, L, d\]"):
        ActivationStore(cache, ["mlp_in.1", "mlp_hidden.1"])
    with pytest.raises(ValueError, match="empty list"):
        ActivationStore(cache, INS, target=[])
    with pytest.raises(ValueError, match="name one with hookpoint"):
        ActivationStore(cache, INS).norm_stats()
