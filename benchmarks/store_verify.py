"""Verified vs unverified ActivationStore reads of a real cache: alternated fresh processes, 2 epochs each.

    python benchmarks/store_verify.py CACHE_DIR HOOKPOINT [PAIRS]

Each child opens the store with its default window, reads two epochs of batches of 4096 and prints its wall
and CPU time; the first epoch of a verified store hashes every shard once. Prints each run and the medians.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
from sparsedict.cache import ActivationStore
store = ActivationStore(sys.argv[1], sys.argv[3], batch_size=4096, verify=sys.argv[2] == "1")
it, n = iter(store), 2 * len(store)
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(n):
    next(it)
print(n, time.perf_counter() - t0, time.process_time() - c0)
"""


def main() -> None:
    cache, hookpoint = sys.argv[1], sys.argv[2]
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(pairs):
        for verify in (False, True):
            cmd = [sys.executable, "-c", CHILD, cache, str(int(verify)), hookpoint]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            n, wall, cpu = int(out[0]), float(out[1]), float(out[2])
            runs[verify].append((wall, cpu))
            print(f"verify={verify!s:5} {n} batches: wall {wall:.2f} s ({n / wall:.1f} batches/s), CPU {cpu:.2f} s; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    (w0, c0), (w1, c1) = ([statistics.median(x) for x in zip(*runs[v])] for v in (False, True))
    print(f"median wall off {w0:.2f} s, on {w1:.2f} s: {100 * (w1 / w0 - 1):+.1f} %; "
          f"CPU off {c0:.2f} s, on {c1:.2f} s: {100 * (c1 / c0 - 1):+.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
