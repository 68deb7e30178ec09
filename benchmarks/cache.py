"""Cache benchmarks on SmolLM2-135M: caching tokens/s (forward cut after the hooked block vs full
forward, and end to end), and ActivationStore read throughput + peak RSS under a RAM bound.

    .venv/bin/python benchmarks/cache.py [--tokens 4096] [--store-rows 262144] [--json out.json]

Store reads use a synthetic cache (random rows written with the real writer and manifest format) so a
cache larger than the RAM bound can be made in seconds; I/O cost does not depend on the values.
Each store measurement runs in a fresh process so ``ru_maxrss`` is that reader's own peak.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def bench_forward(n_tokens: int, layers: list[int], batch: int = 8, ctx: int = 128) -> list[dict]:
    from sparsedict.cache import CacheConfig, hooks
    from sparsedict.cache.tokens import plan_shards
    from sparsedict.lm import load_model

    model, tok = load_model()
    cfg = CacheConfig(dataset="embedded", max_tokens=n_tokens, context_length=ctx, shard_rows=10**9)
    plan = next(plan_shards(cfg, tok))
    ids = torch.from_numpy(plan.token_ids).long()
    rows = []
    for layer in layers:
        for stop in (True, False):
            hooks.record(model, [f"resid_post.{layer}"], ids[:batch], stop_after=stop)  # warm-up
            t = time.perf_counter()
            for a in range(0, len(ids), batch):
                hooks.record(model, [f"resid_post.{layer}"], ids[a : a + batch], stop_after=stop)
            dt = time.perf_counter() - t
            rows.append({"bench": "forward", "layer": layer, "early_stop": stop, "contexts": len(ids),
                         "tokens_per_s": ids.numel() / dt, "seconds": dt})  # fmt: skip
            print(f"forward resid_post.{layer:<2} early_stop={stop!s:<5} {ids.numel() / dt:8.0f} tokens/s "
                  f"({len(ids)} contexts x {ctx}, batch {batch})")  # fmt: skip
    return rows


def bench_cache(n_tokens: int, layer: int) -> dict:
    from sparsedict.cache import CacheConfig, cache_activations

    with tempfile.TemporaryDirectory() as d:
        cfg = CacheConfig(dataset="embedded", hookpoints=[f"resid_post.{layer}"], max_tokens=n_tokens,
                          out_dir=d, progress=False)  # fmt: skip
        t = time.perf_counter()
        cache_activations(cfg)
        dt = time.perf_counter() - t
    print(f"cache_activations resid_post.{layer}: {n_tokens / dt:.0f} kept rows/s end to end "
          f"({n_tokens} rows in {dt:.1f} s, incl. model load and tokenisation)")  # fmt: skip
    return {
        "bench": "cache_end_to_end",
        "layer": layer,
        "rows": n_tokens,
        "rows_per_s": n_tokens / dt,
        "seconds": dt,
    }


def make_synthetic(
    root: Path, rows: int, d: int = 576, shard_rows: int = 32768, dtype: str = "float32"
) -> None:
    from sparsedict.cache.manifest import (
        FORMAT,
        VERSION,
        rebuild,
        receipt_file,
        shard_file,
        write_json_atomic,
    )
    from sparsedict.cache.writer import write_shard

    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "config": {"synthetic": True}, "config_hash": "synthetic",
                "hookpoints": {"h": {"module_path": "h", "side": "out", "path": "h", "layer": None, "d": d,
                                     "dtype": dtype, "dir": "shards/h"}},
                "exclusions": {"rules": {}, "dropped": {}}, "n_shards": None, "stats": {}, "shards": []}  # fmt: skip
    write_json_atomic(root / "manifest.json", manifest)
    gen = torch.Generator().manual_seed(0)
    n = 0
    for i, a in enumerate(range(0, rows, shard_rows)):
        r = min(shard_rows, rows - a)
        x = torch.randn(r, d, generator=gen).to(getattr(torch, dtype))
        files = {
            "h": {"file": shard_file("h", i), **write_shard(root / shard_file("h", i), {"activations": x})}
        }
        (root / receipt_file(i)).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / receipt_file(i), {"index": i, "rows": r, "contexts": 0, "first_context": 0,
                                                  "tokens_seen": r, "dropped": {}, "files": files})  # fmt: skip
        n = i + 1
    rebuild(root, manifest, n_shards=n)


def _hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM; unlike ru_maxrss it resets at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read(root: str, kwargs: dict, n_batches: int, q) -> None:
    from sparsedict.cache import ActivationStore

    torch.set_num_threads(kwargs.pop("threads"))

    clear = Path("/proc/self/clear_refs")
    if clear.exists():  # reset VmHWM to the current RSS, so the peak is this reader's own
        clear.write_text("5")
        base = int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("VmRSS:")).split()[1]) * 1024  # fmt: skip
    else:
        base = _hwm()
    store = ActivationStore(root, "h", **kwargs)
    t = time.perf_counter()
    it = iter(store)
    nbytes = 0
    for _ in range(n_batches):
        x, _ = next(it)
        nbytes += x.numel() * x.element_size()
    dt = time.perf_counter() - t
    peak = _hwm()
    q.put({"batches_per_s": n_batches / dt, "GB_per_s": nbytes / dt / 1e9, "peak_rss_MB": peak / 1e6,
           "rss_before_store_MB": base / 1e6, "window_rows": store.shuffle_buffer_rows})  # fmt: skip


THREADS = 1


def bench_store(rows: int, batch: int, n_batches: int, max_ram: int | None, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        make_synthetic(Path(d), rows, dtype=dtype)
        size = sum(p.stat().st_size for p in Path(d).rglob("*.safetensors"))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        kwargs = {"batch_size": batch, "max_ram_bytes": max_ram, "threads": THREADS}
        p = ctx.Process(target=_read, args=(d, kwargs, n_batches, q))
        p.start()
        res = q.get()
        p.join()
    res.update(bench="store_read", rows=rows, cache_MB=size / 1e6, batch=batch, dtype=dtype,
               max_ram_MB=max_ram / 1e6 if max_ram else None)  # fmt: skip
    print(
        f"store read ({dtype}, cache {size / 1e6:.0f} MB, bound {res['max_ram_MB']} MB, window "
        f"{res['window_rows']} rows): {res['batches_per_s']:.1f} batches/s of {batch}, {res['GB_per_s']:.2f} GB/s, "
        f"peak RSS {res['peak_rss_MB']:.0f} MB (process before the store: {res['rss_before_store_MB']:.0f} MB)"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per forward benchmark")
    ap.add_argument("--store-rows", type=int, default=262_144, help="rows of the synthetic store cache")
    ap.add_argument("--store-threads", type=int, default=1, help="torch threads of the store reader process")
    ap.add_argument("--store-only", action="store_true", help="only the store read benchmark")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    global THREADS
    THREADS = args.store_threads
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"(store reader: {THREADS}), load average {os.getloadavg()[0]:.1f}"
    )
    n_batches = 2 * (args.store_rows // 4096)  # two epochs, including window loads
    rows = [bench_store(args.store_rows, 4096, n_batches, None, "float32")]
    rows.append(bench_store(args.store_rows, 4096, n_batches, 128_000_000, "float32"))
    rows.append(bench_store(args.store_rows, 4096, n_batches, 128_000_000, "bfloat16"))
    if args.store_only:
        return 0
    rows += bench_forward(args.tokens, [6, 14])
    rows.append(bench_cache(args.tokens * 2, 6))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
