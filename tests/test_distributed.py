"""Data-parallel and latent-sharded training under torchrun (gloo, 2 CPU processes) match one process.

Each test launches ``tests/dist_worker.py`` (the real Trainer on a planted-dictionary TensorSource) as
real subprocesses: once in a single process, once under ``torchrun --nproc-per-node 2``, and compares
the per-step loss curve (log.jsonl) and the saved parameters.
"""

from __future__ import annotations

import json

import dist_worker as W
import pytest
import torch

from sparsedict.dictionaries import build
from sparsedict.dictionaries.sharded import ShardedTopK
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.train import TensorSource

TOL = 1e-5  # fp32; measured max |Δ| ≈ 2e-7 for 40 steps (summation order differs across ranks)


def _compare(a: str, b: str) -> None:
    la, lb = W.log(a), W.log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, len(la) + 1))
    for ra, rb in zip(la, lb):
        assert ra["tokens"] == rb["tokens"]
        assert ra["topk/mse"] == pytest.approx(rb["topk/mse"], rel=1e-5), ra["step"]
    pa, pb = W.params(a), W.params(b)
    assert set(pa) == set(pb)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=TOL, rtol=0), (k, (pa[k] - pb[k]).abs().max())
    # training moved the parameters far more than the tolerance (the comparison is not vacuous)
    assert la[-1]["topk/mse"] < 0.5 * la[0]["topk/mse"]


def _assert_group_freed(out_dir: str) -> None:
    """destroy() freed the process group: its gloo threads ran before it and are gone after it. (Threads
    that outlive it race interpreter shutdown and abort a finished rank with SIGABRT.)"""
    with open(f"{out_dir}/done.json") as f:
        done = json.load(f)
    assert done["world"] == 2
    assert done["gloo_threads_before_destroy"], "no gloo threads seen: the check below would be vacuous"
    assert done["gloo_threads_after_destroy"] == []


def test_tensor_source_ranks_partition_the_global_batch():
    x = torch.arange(200.0)[:, None]
    single = iter(TensorSource(x, batch_size=40, seed=3))
    ranks = [iter(TensorSource(x, batch_size=20, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(12):  # crosses two epoch boundaries (5 steps per epoch)
        want, _ = next(single)
        got = torch.cat([next(it)[0] for it in ranks])
        assert torch.equal(got, want)


def test_data_parallel_matches_single_process(tmp_path):
    opts = {"steps": 40, "batch": 128}
    W.run({**opts, "out_dir": str(tmp_path / "one")})
    W.run({**opts, "out_dir": str(tmp_path / "dp")}, nproc=2)
    _compare(str(tmp_path / "one"), str(tmp_path / "dp"))
    _assert_group_freed(str(tmp_path / "dp"))


def test_sharded_latents_match_unsharded(tmp_path):
    # dead_tokens = 3 steps: latents die and revive, so the sharded AuxK path is exercised too
    opts = {"steps": 40, "batch": 128, "n": 128, "dead_tokens": 384}
    W.run({**opts, "out_dir": str(tmp_path / "one")})
    W.run({**opts, "out_dir": str(tmp_path / "tp"), "shard_latents": True}, nproc=2)
    assert any("topk/auxk" in r for r in W.log(str(tmp_path / "tp")))
    _compare(str(tmp_path / "one"), str(tmp_path / "tp"))
    _assert_group_freed(str(tmp_path / "tp"))


def test_sharded_topk_single_rank_equals_topk():
    """In one process a 'shard' is the whole dictionary: outputs, AuxK and gradients must agree."""
    torch.manual_seed(0)
    full = build(TopKConfig(d_in=16, n_latents=64, k=4).resolved(16))
    shard = ShardedTopK(full, 0, 1)
    x = torch.randn(32, 16) + 0.5
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    outs = []
    for m in (full, shard):
        m.set_dead_mask(dead)
        m.train()
        out = m(x)
        sum(out.losses.values()).backward()
        outs.append(out)
    assert "auxk" in outs[1].losses
    torch.testing.assert_close(outs[0].x_hat, outs[1].x_hat)
    for k in outs[0].losses:
        torch.testing.assert_close(outs[0].losses[k], outs[1].losses[k])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(full, name).grad, getattr(shard, name).grad)


def test_shard_latents_rejects_unsupported():
    from sparsedict.train import TrainConfig
    from sparsedict.train.trainer import shard_dictionaries

    full = build(TopKConfig(d_in=16, n_latents=64, k=4).resolved(16))
    with pytest.raises(ValueError, match="grad_clip"):
        shard_dictionaries({"a": full}, TrainConfig(shard_latents=True, grad_clip=1.0), 1)
    with pytest.raises(ValueError, match="k=40"):
        ShardedTopK(build(TopKConfig(d_in=16, n_latents=64, k=40).resolved(16)), 0, 2)
