"""A rank that dies or hangs ends the whole torchrun job with an error in bounded time, never a hang.

Both tests launch ``tests/dist_worker.py`` under ``torchrun --nproc-per-node 2`` (gloo, CPU) with a fault
injected in rank 1 at step 10 of 100.
"""

from __future__ import annotations

import subprocess
import time

import dist_worker as W


def _launch(tmp_path, **fault) -> tuple[subprocess.CompletedProcess, float]:
    opts = {"out_dir": str(tmp_path), "steps": 100, "step_sleep": 0.01, **fault}
    t0 = time.time()
    p = subprocess.run(W.command(opts, 2), env=W.env(), capture_output=True, text=True, timeout=170)
    return p, time.time() - t0


def test_killed_rank_ends_the_job(tmp_path):
    p, elapsed = _launch(tmp_path, kill_rank=1, kill_step=10)
    assert p.returncode != 0
    assert elapsed < 60, f"job took {elapsed:.0f}s to notice a dead rank"
    # torchrun's summary names the failed rank and why
    assert "Root Cause" in p.stderr and "rank      : 1" in p.stderr and "SIGKILL" in p.stderr
    assert not (tmp_path / "done.json").exists()


def test_hung_rank_times_out_with_a_clear_error(tmp_path):
    """Rank 1 stops forever before a collective: rank 0's collective times out (dist_timeout_min = 3 s),
    raises DistributedError, and torchrun tears down rank 1 (SIGTERM, then SIGKILL after its 30 s grace)."""
    p, elapsed = _launch(tmp_path, hang_rank=1, hang_step=10, timeout_min=0.05)
    assert p.returncode != 0
    assert elapsed < 120, f"job took {elapsed:.0f}s to end after a rank hung"
    assert "DistributedError" in p.stderr and "dist_timeout_min=0.05" in p.stderr
    assert "Root Cause" in p.stderr and "rank      : 0" in p.stderr
    assert not (tmp_path / "done.json").exists()
