"""Inspect benchmark: the ``sparsedict inspect`` pass against encode-only on the same cache and dictionary.

    .venv/bin/python benchmarks/inspect.py --cache /work/runs-shared/cache-1m-resid6 \\
        --checkpoint runs/bench-inspect/topk16k [--tokens 0] [--out runs/bench-inspect/browser] [--json f.json]

A missing ``--checkpoint`` is first trained: a 16k-latent TopK (k=32) on the cache's first
``--train_tokens`` rows (a short run: the benchmark measures inspection, not quality).

In one process, alternated so that machine load affects both alike: encode-only (the cache read in the
same batches of whole contexts, each batch encoded, nothing kept), the inspect pass (the same, plus all
per-latent statistics and tables), encode-only again. Then the rest of a full ``inspect()`` run (logit
lens, nearest features, arrays, one page per latent) is timed on its own. Peak RSS is the process's
VmHWM after each phase (the model for the lens is loaded in the last one). The load average is printed
beside the numbers.
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's `inspect`, which torch and dataclasses import: keep its
# folder off the module path so `import inspect` finds the standard library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


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
    cfg = TrainConfig(batch_size=4096, epochs=2, optimizer="adam", lr=1e-3, warmup_steps=5, init_rows=16384,
                      dead_tokens=len(x), log_every=10**9, out_dir=str(out.parent / "train-run"))  # fmt: skip
    t0 = time.perf_counter()
    Trainer({"m": model}, {source_key(model): TensorSource(x, None, batch_size=4096, seed=0)}, cfg).fit(
        resume=False
    )
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
    parser.add_argument("--train_tokens", type=int, default=100_000)
    parser.add_argument("--n_latents", type=int, default=16_384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=0, help="rows to read (0: the whole cache)")
    parser.add_argument("--batch_rows", type=int, default=4096)
    parser.add_argument("--out", default="runs/bench-inspect/browser")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sparsedict.cache import ActivationStore
    from sparsedict.hub import from_pretrained
    from sparsedict.inspect import InspectConfig
    from sparsedict.inspect.stream import LatentStats, stream
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

    def stats():
        return LatentStats(model.n_latents, cfg.top_n, cfg.samples, cfg.window, cfg.seed)

    phase("encode-only", lambda: stream(store, [(model, NullStats())], limit, args.batch_rows))
    phase("inspect-pass", lambda: stream(store, [(model, stats())], limit, args.batch_rows))
    phase("encode-only", lambda: stream(store, [(model, NullStats())], limit, args.batch_rows))
    t = time.perf_counter()
    index = write_all(cfg, {str(ckpt): model})
    total = time.perf_counter() - t
    meta = json.loads((index.parent / ckpt.name / "inspect.json").read_text())
    sec = meta["seconds"]
    rows = int(meta["tokens"])
    rec["full_inspect"] = {"seconds_total": total, "pass": sec["pass"], "lens_and_neighbours": sec["lens_and_neighbours"],
                           "arrays_and_pages": sec["browser_all"], "tokens_per_s_pass": rows / sec["pass"],
                           "tokens_per_s_total": rows / total, "peak_rss_gb": peak_rss_gb(),
                           "load_avg": os.getloadavg()[0], "index": str(index)}  # fmt: skip
    enc = [p["tokens_per_s"] for p in rec["phases"] if p["phase"] == "encode-only"]
    ins = rec["phases"][1]["tokens_per_s"]
    rec["inspect_over_encode"] = ins / (sum(enc) / len(enc))
    f = rec["full_inspect"]
    print(f"full inspect()  {total:.1f} s: pass {f['pass']:.1f} s ({f['tokens_per_s_pass']:.0f} tokens/s), "
          f"lens + neighbours {f['lens_and_neighbours']:.1f} s, arrays + {model.n_latents:,} pages "
          f"{f['arrays_and_pages']:.1f} s; peak RSS {f['peak_rss_gb']:.2f} GB -> {index}")  # fmt: skip
    print(f"inspect pass / encode-only throughput: {rec['inspect_over_encode']:.2f} "
          f"(encode-only runs {enc[0]:.0f} and {enc[1]:.0f} tokens/s, inspect pass {ins:.0f} tokens/s); "
          f"load average now {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
