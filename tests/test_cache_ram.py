"""ActivationStore peak RSS under ``max_ram_bytes`` on caches larger than the bound (float32 and bfloat16).

The cache is synthetic (random rows written with the real shard writer and manifest, so it can be larger
than the bound in a second); the reader runs in a fresh process whose peak RSS (VmHWM, reset through
/proc/self/clear_refs just before the store opens) is compared with its RSS before the store (after a warm-up on a tiny window that pays the process's one-time
costs: lazy imports, first use of each torch op).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedict.cache.manifest import FORMAT, VERSION, rebuild, receipt_file, shard_file, write_json_atomic
from sparsedict.cache.writer import write_shard

ROWS, D, BOUND, BATCH = 65_536, 576, 64_000_000, 1024

READER = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
from sparsedict.cache import ActivationStore

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

root, bound, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# A process that trains has used torch and imported the store's modules before it opens a store: pay those
# one-time costs (lazy imports, first use of each torch op, the allocator's first arenas; they differ between
# CPUs and are not the store's memory) on a tiny window first, then measure from there.
warm = ActivationStore(root, "h", batch_size=8, shuffle_buffer_rows=64)
w = iter(warm)
for _ in range(3):
    next(w)
del w, warm
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
store = ActivationStore(root, "h", batch_size=batch, max_ram_bytes=bound)
it = iter(store)
n = 0
for _ in range(2 * len(store) + 3):  # two epochs and the next one's first window
    x, _ = next(it)
    n += len(x)
print(json.dumps({"peak": status("VmHWM") - base, "window": store.shuffle_buffer_rows, "rows": n,
                  "batches": 2 * len(store) + 3}))
"""


def make_cache(root: Path, rows: int, dtype: str, shard_rows: int = 8192) -> int:
    """Random ``[rows, D]`` activations in ``dtype`` as a complete cache of hookpoint "h"; return its bytes."""
    manifest = {"format": FORMAT, "version": VERSION, "config": {"synthetic": True}, "config_hash": "synthetic",
                "hookpoints": {"h": {"module_path": "h", "side": "out", "path": "h", "layer": None, "d": D,
                                     "dtype": dtype, "dir": "shards/h"}},
                "exclusions": {"rules": {}, "dropped": {}}, "n_shards": None, "stats": {}, "shards": []}  # fmt: skip
    (root / receipt_file(0)).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "manifest.json", manifest)
    gen = torch.Generator().manual_seed(0)
    size = 0
    for i, a in enumerate(range(0, rows, shard_rows)):
        x = torch.randn(min(shard_rows, rows - a), D, generator=gen).to(getattr(torch, dtype))
        entry = write_shard(root / shard_file("h", i), {"activations": x})
        size += entry["bytes"]
        write_json_atomic(root / receipt_file(i), {"index": i, "rows": len(x), "contexts": 0, "first_context": 0, "tokens_seen": len(x),
            "dropped": {}, "files": {"h": {"file": shard_file("h", i), **entry}}})  # fmt: skip
    rebuild(root, manifest, n_shards=len(range(0, rows, shard_rows)))
    return size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_within_bound(tmp_path, dtype):
    size = make_cache(tmp_path / "c", ROWS, dtype)
    assert size > BOUND, "the cache must be larger than the RAM bound"
    out = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "c"), str(BOUND), str(BATCH)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(dtype, f"cache {size / 1e6:.0f} MB, bound {BOUND / 1e6:.0f} MB:", res)
    assert res["rows"] == res["batches"] * BATCH
    assert res["window"] >= 4 * BATCH, "the bound should leave room for a window of several batches"
    assert res["peak"] <= BOUND, f"peak RSS {res['peak'] / 1e6:.1f} MB above the {BOUND / 1e6:.0f} MB bound"
