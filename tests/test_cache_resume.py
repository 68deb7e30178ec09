"""kill -9 of a real `sparsedict cache` subprocess mid-run, then resume == an uninterrupted run; and
2-process gloo caching under torch.distributed.run == a single-process cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparsedict.cache import CacheConfig, cache_activations

# short contexts and one context per shard: ~40 shards, so the kill lands mid-run even on a quiet machine
# (with 128-token contexts the 1,200 rows were 5 shards, done before the kill)
ARGS = ["--dataset", "embedded-sample", "--hookpoints", "resid_post.2", "mlp_out.1", "--max_tokens", "1200",
        "--context_length", "32", "--shard_rows", "30", "--batch_size", "4", "--num_threads", "1",
        "--progress", "false"]  # fmt: skip


def _cfg(out: Path) -> CacheConfig:
    return CacheConfig(dataset="embedded-sample", hookpoints=["resid_post.2", "mlp_out.1"], max_tokens=1200,
                       context_length=32, shard_rows=30, batch_size=4, num_threads=1, progress=False,
                       out_dir=str(out))  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return cache_activations(_cfg(tmp_path_factory.mktemp("ref") / "c"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _assert_same(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert mb["status"] == "complete" and ma["n_rows"] == mb["n_rows"] == 1200
    assert ma["exclusions"] == mb["exclusions"] and ma["n_shards"] == mb["n_shards"]
    for sa, sb in zip(ma["shards"], mb["shards"]):
        for kind in ("tokens", "resid_post.2", "mlp_out.1"):
            ta, tb = load_file(a / sa["files"][kind]["file"]), load_file(b / sb["files"][kind]["file"])
            assert ta.keys() == tb.keys()
            for key in ta:
                assert (ta[key] == tb[key]).all(), (sa["index"], kind, key)


def test_kill9_then_resume_is_exact(tmp_path, reference):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "sparsedict", "cache", *ARGS, "--out_dir", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    receipts = out / "shards" / "_receipts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(receipts.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # land somewhere inside the next shard's forward or write
    assert proc.poll() is None, (
        "the cache finished before it could be killed: " + proc.stdout.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(receipts.glob("*.json")))
    n_shards = json.loads((reference / "manifest.json").read_text())["n_shards"]
    assert n_shards >= 20 and 2 <= done < n_shards, f"{done} of {n_shards} shards done when killed"
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cached 1,200 rows" in res.stdout
    assert not list(out.glob("shards/**/.*tmp*"))
    _assert_same(reference, out)


def test_two_rank_gloo_cache_equals_single_process(tmp_path, reference):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sparsedict", "cache", *ARGS, "--out_dir", str(out)]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert [s["rank"] for s in manifest["shards"]] == [i % 2 for i in range(manifest["n_shards"])]
    _assert_same(reference, out)
