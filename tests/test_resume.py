"""Exact resume: a training run killed with SIGKILL (or stopped by SIGTERM) and restarted with the same
command ends with the same parameters as an uninterrupted run.

Real subprocesses run ``tests/dist_worker.py`` (the Trainer on a planted-dictionary TensorSource,
checkpointing every 20 steps). Bitwise equality in one CPU process; with 2 gloo ranks under torchrun
the whole process group is killed and the result is compared to tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dist_worker as W
import pytest
import torch

from sparsedict.train import checkpoint as ckpt

OPTS = {"steps": 100, "batch": 128, "checkpoint_every": 20, "step_sleep": 0.01, "dead_tokens": 2000}


def _latest_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / ckpt.LATEST).read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def _log_lines(out: Path) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _start(opts: dict, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        W.command(opts, nproc),
        env=W.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group: killpg takes torchrun and its workers together
    )


def _wait(cond, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the interruption point:\n{proc.communicate()[1][-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("interruption point not reached in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref")
    W.run({**OPTS, "out_dir": str(out)})
    return W.params(str(out))


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k] - want[k]).abs().max())


def test_kill9_then_resume_is_bitwise_identical(tmp_path, reference):
    opts = {**OPTS, "out_dir": str(tmp_path)}
    proc = _start(opts)
    _wait(lambda: _latest_step(tmp_path) >= 40, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at, saved = _log_lines(tmp_path), _latest_step(tmp_path)
    assert 40 <= saved < OPTS["steps"] and not (tmp_path / "done.json").exists()
    W.run(opts)  # the same command again
    assert W.log(str(tmp_path))[killed_at]["step"] == saved + 1  # resumed right after the checkpoint
    _assert_bitwise(W.params(str(tmp_path)), reference)


def test_sigterm_checkpoints_then_resume_is_bitwise_identical(tmp_path, reference):
    opts = {**OPTS, "out_dir": str(tmp_path), "checkpoint_every": 0}  # only the SIGTERM checkpoint
    proc = _start(opts)
    _wait(lambda: _log_lines(tmp_path) >= 30, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err
    stopped = _latest_step(tmp_path)
    assert 30 <= stopped < OPTS["steps"] and stopped == _log_lines(tmp_path)
    W.run(opts)
    assert W.log(str(tmp_path))[stopped]["step"] == stopped + 1  # resumed exactly after the stop
    _assert_bitwise(W.params(str(tmp_path)), reference)


def test_two_ranks_kill9_then_resume(tmp_path, reference):
    opts = {**OPTS, "out_dir": str(tmp_path)}
    proc = _start(opts, nproc=2)
    _wait(lambda: _latest_step(tmp_path) >= 40, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: agent and both ranks
    proc.wait()
    assert not (tmp_path / "done.json").exists()
    # a kill during a save may leave a newer, partial step directory: latest.json must name a complete one
    latest = json.loads((tmp_path / "checkpoint" / "latest.json").read_text())
    committed = tmp_path / "checkpoint" / latest["dir"]
    assert sorted(p.name for p in committed.glob("rank_*")) == ["rank_0", "rank_1"]
    W.run(opts, nproc=2)
    got = W.params(str(tmp_path))
    for k in reference:
        assert torch.allclose(got[k], reference[k], atol=1e-5, rtol=0), (
            k,
            (got[k] - reference[k]).abs().max(),
        )


def test_two_ranks_sigterm_to_torchrun_checkpoints_then_resume(tmp_path, reference):
    opts = {**OPTS, "out_dir": str(tmp_path), "checkpoint_every": 0}
    proc = _start(opts, nproc=2)
    _wait(lambda: _log_lines(tmp_path) >= 30, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    stopped = _latest_step(tmp_path)
    assert 30 <= stopped < OPTS["steps"]
    W.run(opts, nproc=2)
    assert W.log(str(tmp_path))[stopped]["step"] == stopped + 1
    got = W.params(str(tmp_path))
    for k in reference:
        assert torch.allclose(got[k], reference[k], atol=1e-5, rtol=0), (
            k,
            (got[k] - reference[k]).abs().max(),
        )


def test_checkpoint_commit_and_world_size_check(tmp_path):
    state = {"step": 3, "rng": ckpt.rng_state(), "members": {"a": {"w": torch.arange(4.0)}}}
    ckpt.save_checkpoint(tmp_path, state, 3)
    (tmp_path / "step_0000000009" / "rank_0").mkdir(parents=True)  # an uncommitted, partial later step
    got = ckpt.load_checkpoint(tmp_path)
    assert got["step"] == 3 and torch.equal(got["members"]["a"]["w"], torch.arange(4.0))
    (tmp_path / ckpt.LATEST).write_text(json.dumps({"step": 3, "world_size": 2, "dir": "step_0000000003"}))
    with pytest.raises(RuntimeError, match="--nproc-per-node 2"):
        ckpt.load_checkpoint(tmp_path)
