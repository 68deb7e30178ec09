"""Training throughput (tokens/s), peak memory and held-out quality per architecture.

    python benchmarks/throughput.py                              # every registered architecture, short runs
    python benchmarks/throughput.py --archs topk,mp --steps 40
    python benchmarks/throughput.py --workload smollm2-l15       # the issue-11 reference workload

Data: a cache of the embedded SmolLM2-135M on the embedded corpus at ``resid_post.14`` (the residual
stream after block 14, d = 576), training rows from split ``train`` and held-out rows from split
``test`` (documents held out by hash), stored under ``cache_dir()/bench-caches/<config hash>`` and
reused. Every training run executes in a fresh (spawned) process so its peak RSS is its own; tokens/s
counts the training loop (data reads included, initialisation excluded). The GEMM limit is the
measured time of one fp32 encoder GEMM ``[batch, d] @ [d, width]`` in the same run: a TopK step
cannot be faster than that GEMM, so ``fraction = tokens/s ÷ (batch / t_gemm)``.

``--workload smollm2-l15``: 250k training tokens + 50k held-out tokens (300k cached), TopK k=32,
width 4608, batch 4096, one run of 1 epoch and one of 5 epochs; reports tokens/s, held-out FVU on the
50k held-out tokens, L0, dead %, peak RSS and the GEMM fraction.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from queue import Empty
from typing import Any

import torch

HOOKPOINT = "resid_post.14"


def bench_cache(split: str, tokens: int, threads: int) -> Path:
    """The embedded model/corpus cached at HOOKPOINT (reused when present)."""
    from sparsedict.cache import CacheConfig, cache_activations
    from sparsedict.lm import cache_dir

    cfg = CacheConfig(
        hookpoints=[HOOKPOINT], split=split, max_tokens=tokens, context_length=128, progress=True
    )
    cfg.out_dir = str(cache_dir() / "bench-caches" / cfg.config_hash())
    cfg.num_threads = threads or None
    return cache_activations(cfg)


def gemm_seconds(batch: int, d: int, width: int, reps: int = 10) -> float:
    """Median time of one fp32 ``[batch, d] @ [d, width]`` GEMM."""
    x, w = torch.randn(batch, d), torch.randn(d, width)
    for _ in range(2):
        x @ w
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def sparsity_fields(arch: str, k: int) -> dict[str, Any]:
    """The config overrides that give an architecture about ``k`` active latents (where it has such a knob)."""
    from sparsedict.dictionaries import lookup

    knobs = lookup(arch)[0].sparsity_fields
    if "k" in knobs:
        return {"k": k}
    if "steps" in knobs:  # matching pursuit: one latent per step
        return {"steps": k}
    return {}


def fit_dictionary(job: dict[str, Any]):
    """Build and train one dictionary on ``job["cache"]`` with the Trainer; returns ``(model, timings)``."""
    from sparsedict.cache import ActivationStore
    from sparsedict.config import from_dict
    from sparsedict.dictionaries import build, lookup
    from sparsedict.train import TrainConfig, Trainer

    torch.manual_seed(0)
    store = ActivationStore(job["cache"], HOOKPOINT, batch_size=job["batch"], seed=0)
    _, cfg_cls = lookup(job["arch"])
    dcfg = from_dict(cfg_cls, {"hookpoint": HOOKPOINT, "n_latents": job["width"], **job["fields"]})
    model = build(dcfg.resolved(store.d_in))
    tcfg = TrainConfig(batch_size=job["batch"], epochs=job["epochs"], max_steps=job["steps"],
                       optimizer=job["optimizer"], out_dir=job["out_dir"], log_every=10**9,
                       init_rows=min(32768, store.n_rows), threads=job["threads"],
                       autocast=job.get("autocast", "none"))  # fmt: skip
    trainer = Trainer({job["arch"]: model}, {(HOOKPOINT, ""): store}, tcfg)
    init = {}
    original = trainer.initialise

    def timed_init() -> None:
        t = time.perf_counter()
        original()
        init["s"] = time.perf_counter() - t

    trainer.initialise = timed_init
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    seconds = time.perf_counter() - t0 - init["s"]
    return model, {"steps": trainer.step, "tokens": trainer.tokens, "train_s": seconds, "init_s": init["s"],
                   "tokens_per_s": trainer.tokens / seconds}  # fmt: skip


def train_once(job: dict[str, Any]) -> dict[str, Any]:
    """Train one dictionary and evaluate it on the held-out cache; runs inside a fresh process."""
    import warnings

    warnings.simplefilter("ignore")
    from sparsedict.cache import ActivationStore
    from sparsedict.eval.heldout import reconstruction_stats

    torch.set_num_threads(job["threads"] or os.cpu_count() or 1)
    model, timing = fit_dictionary(job)
    out = {"arch": job["arch"], "fields": job["fields"], "width": job["width"], "batch": job["batch"],
           "epochs": job["epochs"], **timing}  # fmt: skip
    if job.get("eval_cache"):
        held = ActivationStore(job["eval_cache"], HOOKPOINT, batch_size=4096, drop_last=False, loop=False)
        stats = reconstruction_stats(model, held, max_rows=job["eval_tokens"])
        out.update(heldout_tokens=stats.tokens, fvu=stats.fvu, l0=stats.l0, dead=stats.dead_fraction)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _child(fn, job: dict[str, Any], queue) -> None:
    try:
        queue.put(fn(job))
    except Exception as err:  # report, don't hang the parent
        queue.put({"arch": job.get("arch", job.get("library")), "error": f"{type(err).__name__}: {err}"})


def run_isolated_fn(fn, job: dict[str, Any]) -> dict[str, Any]:
    """``fn(job)`` in a spawned process (so its peak RSS is its own); returns its result dict."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, job, queue))
    proc.start()
    while True:  # never hang on a worker that died without reporting
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                result = {"arch": job.get("arch", job.get("library")),
                          "error": f"worker process exited with code {proc.exitcode} without a result"}  # fmt: skip
                break
    proc.join()
    return result


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    return run_isolated_fn(train_once, job)


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workload", choices=["", "smollm2-l15"], default="", help="the issue-11 reference workload"
    )
    p.add_argument("--archs", default="", help="comma-separated architectures (default: all registered)")
    p.add_argument("--width", type=int, default=4608)
    p.add_argument(
        "--k", type=int, default=32, help="active latents (k, or MP steps) where the architecture has it"
    )
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="steps per architecture (per-architecture mode)")
    p.add_argument("--train_tokens", type=int, default=250_000)
    p.add_argument("--eval_tokens", type=int, default=50_000)
    p.add_argument("--epochs", default="1,5", help="epochs per run in the workload mode")
    p.add_argument("--optimizer", default="auto", help="TrainConfig.optimizer (auto: the per-architecture default)")
    p.add_argument("--autocast", default="none", help="TrainConfig.autocast: 'none' (fp32) or 'bf16'")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. 'contended machine')")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from sparsedict.dictionaries import available
    from sparsedict.lm import cache_dir

    train = bench_cache("train", args.train_tokens, args.threads)
    held = bench_cache("test", args.eval_tokens, args.threads) if args.eval_tokens else None
    t_gemm = gemm_seconds(args.batch, 576, args.width)
    gemm_tps = args.batch / t_gemm
    head = {"machine": machine(), "label": args.label, "train_cache": str(train), "eval_cache": str(held),
            "split": "train rows from split 'train', held-out rows from split 'test'",
            "gemm": {"shape": [args.batch, 576, args.width], "seconds": t_gemm,
                     "gflops": 2 * args.batch * 576 * args.width / t_gemm / 1e9, "tokens_per_s": gemm_tps}}  # fmt: skip
    print(json.dumps(head, indent=1))
    base = {"cache": str(train), "eval_cache": str(held) if held else "", "eval_tokens": args.eval_tokens,
            "width": args.width, "batch": args.batch, "optimizer": args.optimizer, "threads": args.threads,
            "autocast": args.autocast,
            "out_dir": str(cache_dir() / "bench-runs")}  # fmt: skip
    if args.workload:
        jobs = [{**base, "arch": "topk", "fields": {"k": args.k}, "epochs": float(e), "steps": 0}
                for e in args.epochs.split(",")]  # fmt: skip
    else:
        archs = args.archs.split(",") if args.archs else available()
        jobs = [{**base, "arch": a, "fields": sparsity_fields(a, args.k), "epochs": 1.0, "steps": args.steps}
                for a in archs]  # fmt: skip
    rows = []
    for job in jobs:
        r = run_isolated(job)
        if "tokens_per_s" in r:
            r["gemm_fraction"] = r["tokens_per_s"] / gemm_tps
        rows.append(r)
        print(format_row(r), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**head, "rows": rows}) + "\n")
    return 0


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['arch']:<11} ERROR {r['error']}"
    fields = ",".join(f"{k}={v}" for k, v in r["fields"].items())
    quality = ""
    if "fvu" in r:
        quality = f"  FVU {r['fvu']:.4f}  L0 {r['l0']:6.1f}  dead {100 * r['dead']:5.1f}%"
    return (f"{r['arch']:<11} {fields:<9} ep {r['epochs']:<4g} steps {r['steps']:>5}  {r['tokens_per_s']:9.0f} tok/s  "
            f"({100 * r['gemm_fraction']:5.1f}% of GEMM){quality}  peak RSS {r['peak_rss_gb']:.2f} GB")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
