"""Inspect benchmark: the ``sparsedict inspect`` pass against encode-only on the same cache and dictionary.

    .venv/bin/python benchmarks/features.py --cache /work/runs-shared/cache-1m-resid6 \\
        --checkpoint runs/bench-inspect/topk16k [--tokens 0] [--out runs/bench-inspect/browser] [--json f.json]

A missing ``--checkpoint`` is first trained: a 16k-latent TopK (k=32) on the cache's first
``--train_tokens`` rows (a short run: the benchmark measures inspection, not quality).

In one process, alternated so that machine load affects both alike: encode-only (the cache read in the
same batches of whole contexts, each batch encoded, nothing kept), a full ``inspect()`` (the same pass
plus every per-latent statistic and table, then the logit lens, nearest features, the arrays and one page
per latent; its pass is timed on its own), encode-only again (``--once`` skips it). Peak RSS is the
process's VmHWM after each phase (the model for the lens is loaded during ``inspect()``). The pass's
read / encode / bookkeeping split is printed; ``--compare_threads ROWS`` then times the bookkeeping on one
thread against torch's threads. The load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(cache: str, hookpoint: str, out: Path, tokens: int, n_latents: int, k: int) -> None:
    from sparsedict.cache import ActivationStore
    from sparsedict.dictionaries import build
    from sparsedict.dictionaries.topk import TopKConfig
    from sparsedict.train import TensorSource, TrainConfig, Trainer
    from sparsedict.train.trainer import source_key

    x = ActivationStore(cache, hookpoint, loop=False).rows(0, tokens)
    model = build(TopKConfig(hookpoint=hookpoint, n_latents=n_latents, k=k).resolved(x.shape[1]))
    batch = min(4096, len(x))
    cfg = TrainConfig(batch_size=batch, epochs=1, optimizer="adam", lr=1e-3, warmup_steps=5,
                      init_rows=min(16384, len(x)), dead_tokens=len(x), log_every=10**9,
                      out_dir=str(out.parent / "train-run"))  # fmt: skip
    t0 = time.perf_counter()
    source = TensorSource(x, None, batch_size=batch, seed=0)
    Trainer({"m": model}, {source_key(model): source}, cfg).fit(resume=False)
    model.save_pretrained(out, {"cache": cache, "tokens": len(x)})
    print(
        f"trained {n_latents}-latent TopK k={k} on {len(x):,} rows in {time.perf_counter() - t0:.0f} s -> {out}"
    )


class NullStats:
    """Stands in for ``LatentStats``: the pass reads and encodes, and keeps nothing."""

    def update(self, code, batch) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/work/runs-shared/cache-1m-resid6")
    parser.add_argument("--hookpoint", default="resid_post.6")
    parser.add_argument("--checkpoint", default="runs/bench-inspect/topk16k")
    parser.add_argument("--train_tokens", type=int, default=65_536)
    parser.add_argument("--n_latents", type=int, default=16_384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=0, help="rows to read (0: the whole cache)")
    parser.add_argument("--batch_rows", type=int, default=4096)
    parser.add_argument("--out", default="runs/bench-inspect/browser")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--once", action="store_true", help="one encode-only run (before inspect) instead of two"
    )
    parser.add_argument("--compare_threads", type=int, default=0, metavar="ROWS",
                        help="also time the pass's bookkeeping on one thread against torch's threads, alternated "
                             "twice, on the first ROWS rows (0: skip)")  # fmt: skip
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sparsedict.cache import ActivationStore
    from sparsedict.dictionaries import from_pretrained
    from sparsedict.inspect import InspectConfig
    from sparsedict.inspect.stream import stream
    from sparsedict.inspect.write import write_all

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").exists():
        train(args.cache, args.hookpoint, ckpt, args.train_tokens, args.n_latents, args.k)
    model = from_pretrained(ckpt).eval()
    store = ActivationStore(args.cache, model.cfg.hookpoint, batch_size=1, loop=False)
    limit = args.tokens or None
    with torch.no_grad():
        model.encode(store.rows(0, 256))  # compile kernels, touch the weights
    cfg = InspectConfig(checkpoints=[str(ckpt)], cache=args.cache, out=args.out, tokens=args.tokens,
                        batch_rows=args.batch_rows, progress=False)  # fmt: skip
    rec: dict = {"cache": args.cache, "checkpoint": str(ckpt), "n_latents": model.n_latents,
                 "architecture": model.architecture, "k": getattr(model.cfg, "k", None),
                 "threads": torch.get_num_threads(), "phases": []}  # fmt: skip

    def phase(name: str, fn) -> int:
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        rows = fn()
        dt = time.perf_counter() - t
        row = {"phase": name, "rows": rows, "seconds": dt, "tokens_per_s": rows / dt,
               "load_avg": [load0, os.getloadavg()[0]], "peak_rss_gb": peak_rss_gb()}  # fmt: skip
        rec["phases"].append(row)
        print(f"{name:<14} {rows:>9,} rows  {dt:8.1f} s  {rows / dt:8.0f} tokens/s  peak RSS {row['peak_rss_gb']:.2f} GB"
              f"  load {load0:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
        return rows

    def full() -> int:
        index = write_all(cfg, {str(ckpt): model})
        meta = json.loads((index.parent / ckpt.name / "inspect.json").read_text())
        sec, rows = meta["seconds"], int(meta["tokens"])
        rec["full_inspect"] = {"pass": sec["pass"], "pass_read": sec["pass_read"], "pass_encode": sec["pass_encode"],
                               "pass_bookkeeping": sec["pass_bookkeeping"],
                               "lens_and_neighbours": sec["lens_and_neighbours"],
                               "arrays_and_pages": sec["browser_all"], "tokens_per_s_pass": rows / sec["pass"],
                               "index": str(index)}  # fmt: skip
        return rows

    def encode() -> int:
        return stream(store, [(model, NullStats())], limit, args.batch_rows)

    phase("encode-only", encode)
    phase("inspect", full)
    if not args.once:
        phase("encode-only", encode)
    if args.compare_threads:
        from sparsedict.inspect.stream import LatentStats

        rec["bookkeeping_threads"] = []
        for threads in (1, 0, 1, 0):
            stats = LatentStats(model.n_latents, cfg.top_n, cfg.samples, cfg.window, cfg.seed)
            stats.threads = threads
            split: dict[str, float] = {}
            rows = stream(store, [(model, stats)], args.compare_threads, args.batch_rows, seconds=split)
            row = {"threads": threads or torch.get_num_threads(), "rows": rows, **split,
                   "load_avg": os.getloadavg()[0]}  # fmt: skip
            rec["bookkeeping_threads"].append(row)
            print(f"bookkeeping on {row['threads']} thread(s): {split['bookkeeping']:.1f} s for {rows:,} rows "
                  f"(encode {split['encode']:.1f} s, read {split['read']:.1f} s), load {row['load_avg']:.1f}")  # fmt: skip
    f = rec["full_inspect"]
    enc = [p["tokens_per_s"] for p in rec["phases"] if p["phase"] == "encode-only"]
    rec["inspect_pass_over_encode"] = f["tokens_per_s_pass"] / (sum(enc) / len(enc))
    rec["inspect_total_over_encode"] = rec["phases"][1]["tokens_per_s"] / (sum(enc) / len(enc))
    print(f"inspect(): pass {f['pass']:.1f} s ({f['tokens_per_s_pass']:.0f} tokens/s: read {f['pass_read']:.1f} s, "
          f"encode {f['pass_encode']:.1f} s, bookkeeping {f['pass_bookkeeping']:.1f} s), lens + neighbours "
          f"{f['lens_and_neighbours']:.1f} s, arrays + {model.n_latents:,} pages {f['arrays_and_pages']:.1f} s "
          f"-> {f['index']}")  # fmt: skip
    print(f"inspect pass / encode-only throughput: {rec['inspect_pass_over_encode']:.2f} (whole inspect(): "
          f"{rec['inspect_total_over_encode']:.2f}); encode-only {', '.join(f'{e:.0f}' for e in enc)} tokens/s; "
          f"peak RSS {peak_rss_gb():.2f} GB; load average now {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
