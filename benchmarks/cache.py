"""Cache benchmarks on SmolLM2-135M: caching tokens/s (forward cut after the hooked block vs full
forward, and end to end), ActivationStore read throughput + peak RSS under a RAM bound, with and without
shard verification, and the speed of the candidate shard digests. The forward runs with the model in each of
``--model-dtypes`` (``CacheConfig.model_dtype``), alternating batch by batch, and prints each dtype's
tokens/s and its activations' relative error against the float32 forward of the same contexts.

    .venv/bin/python benchmarks/cache.py [--tokens 4096] [--store-rows 262144] [--repeats 2] [--json out.json]
    .venv/bin/python benchmarks/cache.py --forward-only --model-dtypes float32,bfloat16 --layers 14 --cut-only

Store reads use a synthetic cache (random rows written with the real writer and manifest format) so a
cache larger than the RAM bound can be made in seconds; I/O cost does not depend on the values.
Each store measurement runs in a fresh process so ``ru_maxrss`` is that reader's own peak and no shard
has been verified yet; verification on and off alternate, ``--repeats`` times each. Digests are timed on
buffers of the sizes the cache writes (a tokens shard, 16,384-row activation shards of d = 576 in fp32 and
bf16, and of d = 2304 in bf16), in memory (as the writer hashes) and streamed from a file in the page
cache: ``preadv`` into one reused ``digest.WINDOW``-byte buffer (as readers hash), or read-only maps of
that size and of 4 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


def bench_forward(
    n_tokens: int,
    layers: list[int],
    batch: int = 8,
    ctx: int = 128,
    dtypes: tuple[str, ...] = ("float32",),
    stops: tuple[bool, ...] = (True, False),
) -> list[dict]:
    """Forward tokens/s up to ``resid_post.L`` (cut after the block, and the full forward) with the model in
    each of ``dtypes``, the dtypes alternating batch by batch; for a dtype other than float32 (the first),
    the activations' relative error against the float32 forward of the same contexts
    (``‖a − a_fp32‖ / ‖a_fp32‖`` over all kept positions, and the median per token)."""
    from sparsedict.cache import CacheConfig, hooks
    from sparsedict.cache.tokens import plan_shards
    from sparsedict.lm import load_model

    models = {dt: load_model(dtype=dt)[0] for dt in dtypes}
    tok = load_model()[1]
    cfg = CacheConfig(dataset="embedded", max_tokens=n_tokens, context_length=ctx, shard_rows=10**9)
    plan = next(plan_shards(cfg, tok))
    ids = torch.from_numpy(plan.token_ids).long()
    rows = []
    for layer in layers:
        hp = f"resid_post.{layer}"
        for stop in stops:
            seconds = dict.fromkeys(dtypes, 0.0)
            err_sq, ref_sq, per_token = dict.fromkeys(dtypes, 0.0), 0.0, {dt: [] for dt in dtypes}
            for m in models.values():
                hooks.record(m, [hp], ids[:batch], stop_after=stop)  # warm-up
            for a in range(0, len(ids), batch):
                acts = {}
                for dt, m in models.items():
                    t = time.perf_counter()
                    acts[dt] = hooks.record(m, [hp], ids[a : a + batch], stop_after=stop)[hp].float()
                    seconds[dt] += time.perf_counter() - t
                if stop and "float32" in acts:
                    keep = ids[a : a + batch] != tok.pad_token_id  # the positions a cache keeps
                    keep[:, : cfg.exclude_first_n] = False
                    ref = acts["float32"][keep]
                    ref_sq += float(ref.double().square().sum())
                    for dt, act in acts.items():
                        diff = act[keep] - ref
                        err_sq[dt] += float(diff.double().square().sum())
                        per_token[dt].append((diff.norm(dim=-1) / ref.norm(dim=-1)).flatten())
            for dt in dtypes:
                row = {"bench": "forward", "layer": layer, "early_stop": stop, "model_dtype": dt,
                       "contexts": len(ids), "tokens_per_s": ids.numel() / seconds[dt], "seconds": seconds[dt]}  # fmt: skip
                line = f"forward {hp:<13} {dt:<8} early_stop={stop!s:<5} {row['tokens_per_s']:8.0f} tokens/s"
                if ref_sq and dt != "float32":
                    row["rel_error"] = (err_sq[dt] / ref_sq) ** 0.5
                    row["rel_error_median_token"] = float(torch.cat(per_token[dt]).median())
                    row["speedup_vs_float32"] = seconds["float32"] / seconds[dt]
                    line += (f" ({row['speedup_vs_float32']:.2f}x float32; relative error vs float32 "
                             f"{row['rel_error']:.2e}, median per token {row['rel_error_median_token']:.2e})")  # fmt: skip
                rows.append(row)
                print(f"{line} ({len(ids)} contexts x {ctx}, batch {batch})")
    return rows


def bench_cache(n_tokens: int, layer: int, model_dtype: str = "float32") -> dict:
    from sparsedict.cache import CacheConfig, cache_activations

    with tempfile.TemporaryDirectory() as d:
        cfg = CacheConfig(dataset="embedded", hookpoints=[f"resid_post.{layer}"], max_tokens=n_tokens,
                          out_dir=d, progress=False, model_dtype=model_dtype)  # fmt: skip
        t = time.perf_counter()
        cache_activations(cfg)
        dt = time.perf_counter() - t
    print(f"cache_activations resid_post.{layer} model_dtype={model_dtype}: {n_tokens / dt:.0f} kept rows/s "
          f"end to end ({n_tokens} rows in {dt:.1f} s, incl. model load and tokenisation)")  # fmt: skip
    return {
        "bench": "cache_end_to_end",
        "layer": layer,
        "model_dtype": model_dtype,
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


class _Crc32c:
    """crc32c behind the hashlib interface (``crc32c`` package, or ``google-crc32c``, which needs bytes)."""

    def __init__(self, google: bool) -> None:
        import crc32c
        import google_crc32c

        self.google, self.h = google, google_crc32c.Checksum() if google else crc32c.CRC32CHash()

    def update(self, view) -> None:
        self.h.update(bytes(view) if self.google and not isinstance(view, bytes) else view)

    def hexdigest(self) -> str:
        return self.h.hexdigest().decode() if self.google else self.h.hexdigest()


def _hash_candidates() -> dict:
    import xxhash

    out = {"xxh3_64": xxhash.xxh3_64, "xxh3_128": xxhash.xxh3_128, "blake2b": hashlib.blake2b,
           "sha256": hashlib.sha256}  # fmt: skip
    for name, google in (("crc32c (crc32c)", False), ("crc32c (google-crc32c)", True)):
        try:
            _Crc32c(google)
        except ImportError:
            print(f"{name}: not installed, skipped (pip install crc32c google-crc32c)")
            continue
        out[name] = lambda google=google: _Crc32c(google)
    return out


def _best(fn, size: int, seconds: float = 0.5) -> float:
    """GB/s of ``fn()`` over ``size`` bytes in CPU time (user + system, so a shared machine's preemption does
    not count): best of repeats filling about ``seconds`` (at least 3)."""
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < 3 or spent < seconds:
        t = time.process_time()
        fn()
        dt = time.process_time() - t
        best, spent, n = min(best, dt), spent + dt, n + 1
    return size / best / 1e9


def bench_hashes() -> list[dict]:
    from sparsedict.cache import digest

    def stream_map(new, fd, size, window):
        h = new()
        for pos in range(0, size, window):
            with mmap.mmap(fd, min(window, size - pos), access=mmap.ACCESS_READ, offset=pos) as w:
                h.update(w)
        return h.hexdigest()

    def stream_pread(new, fd, size, window):
        h, view = new(), memoryview(bytearray(window))
        for pos in range(0, size, window):
            n = os.preadv(fd, [view[: min(window, size - pos)]], pos)
            h.update(view[:n])
        return h.hexdigest()

    sizes = {"tokens shard (~128 ctx x 128)": 300_000, "fp32 d=576 (37.7 MB)": 16384 * 576 * 4,
             "bf16 d=576 (18.9 MB)": 16384 * 576 * 2, "bf16 d=2304 (75.5 MB)": 16384 * 2304 * 2}  # fmt: skip
    rows = []
    cands = _hash_candidates()
    print("digest speed, GB/s of CPU time (best of repeats):")
    with tempfile.TemporaryDirectory() as d:
        for label, size in sizes.items():
            data = os.urandom(size)
            path = Path(d) / "shard"
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            stream_map(hashlib.md5, fd, size, 4 << 20)  # into the page cache
            try:
                for name, new in cands.items():
                    res = {"memory": _best(partial(_update, new, data), size)}
                    if size > 1_000_000:
                        res["file, preadv"] = _best(partial(stream_pread, new, fd, size, digest.WINDOW), size)
                        res["file, maps"] = _best(partial(stream_map, new, fd, size, digest.WINDOW), size)
                        res["file, maps 4 MiB"] = _best(partial(stream_map, new, fd, size, 4 << 20), size)
                    rows.append({"bench": "digest", "algorithm": name, "buffer": label, "bytes": size,
                                 **{f"GB_per_s_{k}": v for k, v in res.items()}})  # fmt: skip
                    print(
                        f"digest {name:<22} {label:<30} " + "  ".join(f"{k} {v:6.2f}" for k, v in res.items())
                    )
            finally:
                os.close(fd)
    return rows


def _update(new, data) -> str:
    h = new()
    h.update(data)
    return h.hexdigest()


def _read(root: str, kwargs: dict, n_batches: int, q) -> None:
    from sparsedict.cache import ActivationStore, digest

    torch.set_num_threads(kwargs.pop("threads"))

    clear = Path("/proc/self/clear_refs")
    if clear.exists():  # reset VmHWM to the current RSS, so the peak is this reader's own
        clear.write_text("5")
        base = int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("VmRSS:")).split()[1]) * 1024  # fmt: skip
    else:
        base = _hwm()
    store = ActivationStore(root, "h", **kwargs)
    t, c = time.perf_counter(), time.process_time()
    it = iter(store)
    nbytes, first, epoch, epoch_cpu = 0, None, None, None
    for i in range(n_batches):
        x, _ = next(it)
        nbytes += x.numel() * x.element_size()
        if first is None:
            first = time.perf_counter() - t
        if i + 1 == len(store):
            epoch, epoch_cpu = time.perf_counter() - t, time.process_time() - c
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    peak = _hwm()
    # the verification pass alone, hashed again (the files are in the page cache, as they were above)
    t, c = time.perf_counter(), time.process_time()
    for path, entry in zip(store._x.files, store._x.entries):
        digest.verify_file(path, entry, fresh=True)
    pass_s, pass_cpu = time.perf_counter() - t, time.process_time() - c
    q.put({"batches_per_s": n_batches / dt, "GB_per_s": nbytes / dt / 1e9, "peak_rss_MB": peak / 1e6,
           "rss_before_store_MB": base / 1e6, "window_rows": store.shuffle_buffer_rows, "seconds": dt,
           "cpu_s": cpu, "first_batch_s": first, "first_epoch_s": epoch, "first_epoch_cpu_s": epoch_cpu,
           "verify": store._x.verify, "verify_pass_s": pass_s, "verify_pass_cpu_s": pass_cpu})  # fmt: skip


THREADS = 1


def _read_once(d: str, kwargs: dict, n_batches: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_read, args=(d, dict(kwargs), n_batches, q))
    p.start()
    res = q.get()
    p.join()
    return res


def bench_store(
    rows: int, batch: int, n_batches: int, max_ram: int | None, dtype: str, repeats: int
) -> list[dict]:
    """Verification off and on, alternating ``repeats`` times, each in a fresh reader process."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        make_synthetic(Path(d), rows, dtype=dtype)
        size = sum(p.stat().st_size for p in Path(d).rglob("*.safetensors"))
        for rep in range(repeats):
            pair = {}
            for verify in (False, True):
                kwargs = {"batch_size": batch, "max_ram_bytes": max_ram, "threads": THREADS, "verify": verify}
                res = _read_once(d, kwargs, n_batches)
                res.update(bench="store_read", rows=rows, cache_MB=size / 1e6, batch=batch, dtype=dtype, repeat=rep,
                           max_ram_MB=max_ram / 1e6 if max_ram else None, load_average=os.getloadavg()[0])  # fmt: skip
                print(
                    f"store read ({dtype}, cache {size / 1e6:.0f} MB, bound {res['max_ram_MB']} MB, window "
                    f"{res['window_rows']} rows, verify={verify!s:<5}): {res['batches_per_s']:6.1f} batches/s of "
                    f"{batch}, {res['GB_per_s']:.2f} GB/s, CPU {res['cpu_s']:.2f} s; first batch "
                    f"{res['first_batch_s']:.3f} s, first epoch {res['first_epoch_s']:.3f} s (CPU "
                    f"{res['first_epoch_cpu_s']:.2f} s); peak RSS {res['peak_rss_MB']:.0f} MB (process before the "
                    f"store: {res['rss_before_store_MB']:.0f} MB); load {res['load_average']:.1f}"
                )
                pair[verify] = res
                out.append(res)
            off, on = pair[False], pair[True]
            print(f"  -> verify on vs off: wall {100 * (on['seconds'] / off['seconds'] - 1):+.1f} % over {n_batches} "
                  f"batches, {100 * (on['first_epoch_s'] / off['first_epoch_s'] - 1):+.1f} % over the first epoch; "
                  f"CPU {100 * (on['cpu_s'] / off['cpu_s'] - 1):+.1f} % / "
                  f"{100 * (on['first_epoch_cpu_s'] / off['first_epoch_cpu_s'] - 1):+.1f} %; the hash pass alone: "
                  f"{on['verify_pass_s']:.3f} s ({size / on['verify_pass_s'] / 1e9:.1f} GB/s), CPU "
                  f"{on['verify_pass_cpu_s']:.3f} s = {100 * on['verify_pass_cpu_s'] / off['first_epoch_cpu_s']:.1f} % "
                  f"of an unverified epoch's CPU")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per forward benchmark")
    ap.add_argument("--store-rows", type=int, default=262_144, help="rows of the synthetic store cache")
    ap.add_argument("--store-threads", type=int, default=1, help="torch threads of the store reader process")
    ap.add_argument(
        "--repeats", type=int, default=2, help="verification off/on pairs per store configuration"
    )
    ap.add_argument("--store-only", action="store_true", help="only the digest and store read benchmarks")
    ap.add_argument("--forward-only", action="store_true", help="only the model forward benchmark")
    ap.add_argument("--layers", default="6,14", help="blocks L of the forward benchmark's resid_post.L")
    ap.add_argument("--cut-only", action="store_true", help="time only the forward cut after block L")
    ap.add_argument(
        "--model-dtypes",
        default="float32,bfloat16",
        help="model dtypes of the forward benchmark, alternated (float32 first: the others' error is against it)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    global THREADS
    THREADS = args.store_threads
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"(store reader: {THREADS}), load average {os.getloadavg()[0]:.1f}"
    )
    dtypes = tuple(args.model_dtypes.split(","))
    rows = []
    if not args.forward_only:
        rows += bench_hashes()
        n_batches = 2 * (args.store_rows // 4096)  # two epochs, including window loads
        rows += bench_store(args.store_rows, 4096, n_batches, None, "float32", args.repeats)
        rows += bench_store(args.store_rows, 4096, n_batches, 128_000_000, "float32", args.repeats)
        rows += bench_store(args.store_rows, 4096, n_batches, 128_000_000, "bfloat16", args.repeats)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if not args.store_only:
        layers = [int(v) for v in args.layers.split(",")]
        stops = (True,) if args.cut_only else (True, False)
        rows += bench_forward(args.tokens, layers, dtypes=dtypes, stops=stops)
        if not args.forward_only:
            rows += [bench_cache(args.tokens * 2, 6, dt) for dt in dtypes]
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
