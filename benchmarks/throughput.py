"""Training throughput (tokens/s), peak memory and held-out quality per architecture.

    python benchmarks/throughput.py                              # every registered architecture, short runs
    python benchmarks/throughput.py --archs topk,mp --steps 40
    python benchmarks/throughput.py --workload smollm2-l15       # the issue-11 reference workload
    python benchmarks/throughput.py --workload smollm2-l15 --autocast bf16 --compare 12 --profile 3

Data: a cache of the embedded SmolLM2-135M on the embedded corpus at ``--hookpoint`` (default
``resid_post.14``, the residual stream after block 14, d = 576), training rows from split ``train`` and
held-out rows from split ``test`` (documents held out by hash), stored under ``--cache-root/<config hash>``
(default ``cache_dir()/bench-caches``) and reused. Every training run executes in a fresh (spawned)
process so its peak RSS is its own; tokens/s counts the training loop (data reads included,
initialisation excluded).

GEMM limits: printed once up front (the CPU model and its bf16 flags with them: AMX tiles, AVX512-BF16),
and per run: the median time of the encoder GEMM ``[batch, d] @ [d, width]`` in fp32 and in bf16 (the
CPU's bf16 matrix/dot-product units: AMX on Sapphire Rapids, AVX512-BF16 on Zen 4), measured inside each
training process right before and right after its run (5 + 5 repetitions, the median of all 10). A TopK
step cannot be faster than its GEMM, so each row prints ``tokens/s ÷ (batch / t_gemm)`` for both dtypes.

``--workload smollm2-l15``: 250k training tokens + 50k held-out tokens (300k cached), TopK k=32,
width 4608, batch 4096, one run of 1 epoch and one of 5 epochs; reports tokens/s, held-out FVU on the
50k held-out tokens, L0, dead %, peak RSS and the GEMM fractions. ``--width/--k/--batch/--hookpoint``
change the shape (the other shapes the results file reports: ``--width 9216 --k 64 --batch 1024``,
``--hookpoint resid_post.6``).

``--train-model-dtype bfloat16``: the training cache comes from the model run in bf16
(``CacheConfig.model_dtype``); the held-out cache stays fp32, so the FVU compares both caches on the
same fp32 activations.

``--shapes 'width=9216,k=64,batch=1024;hookpoint=resid_post.6,train_cache=PATH'``: the same A/B of
TopK steps at each further shape or layer, each with the GEMM limit of its own shape (``--compare R``
rounds each). ``--compare-archs topk,batchtopk,...``: the A/B alternates the steps of these architectures
(CPU kernels, ``--autocast``) instead, and prints each one's tokens/s as a fraction of the first one's,
with its last step's L0 and code form; ``relu:dense`` is ReLU without its sparse training step
(``SPARSEDICT_DENSE_CODES=1``, the dense path). ``--l0-target`` trains ReLU/JumpReLU/Gated to
``l0_target = --k``; ``--compare-warmup W`` runs W alternating training rounds first (their tokens/s are
printed too) with every schedule set to the benchmark's length, so the timed steps see trained, sparse
codes, as most steps of a run do.

``--compare R``: before the runs, an in-process A/B of single training steps on the same batches: the
plain-torch path (``SPARSEDICT_DISABLE_CPU_KERNELS=1``, fp32, the trainer's unfused optimiser) against
the CPU kernels in fp32 and in ``--autocast``, interleaved with the two GEMMs, R rounds in rotating order,
medians printed (robust to other load on the machine). ``--profile S``: a ``torch.profiler`` table per
variant (S steps each, self CPU time per op).
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


def bench_cache(
    split: str,
    tokens: int,
    threads: int,
    hookpoint: str = HOOKPOINT,
    root: str = "",
    model_dtype: str = "float32",
) -> Path:
    """The embedded model/corpus cached at ``hookpoint`` under ``root/<config hash>`` (reused when present;
    ``root`` defaults to ``cache_dir()/bench-caches``), the model run in ``model_dtype``."""
    from sparsedict.cache import CacheConfig, cache_activations
    from sparsedict.lm import cache_dir

    cfg = CacheConfig(hookpoints=[hookpoint], split=split, max_tokens=tokens, context_length=128,
                      progress=True, model_dtype=model_dtype)  # fmt: skip
    cfg.out_dir = str(Path(root or cache_dir() / "bench-caches") / cfg.config_hash())
    cfg.num_threads = threads or None
    return cache_activations(cfg)


def gemm_times(batch: int, d: int, width: int, dtype: torch.dtype, reps: int = 5) -> list[float]:
    """Times of ``reps`` ``[batch, d] @ [d, width]`` GEMMs in ``dtype`` (after two warm-up calls)."""
    x, w = torch.randn(batch, d).to(dtype), torch.randn(d, width).to(dtype)
    for _ in range(2):
        x @ w
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t)
    return times


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_limits(batch: int, d: int, width: int, times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """``{dtype: {seconds, gflops, tokens_per_s}}`` from lists of GEMM times (their medians)."""
    out = {}
    for name, ts in times.items():
        t = median(ts)
        out[name] = {"seconds": t, "gflops": 2 * batch * d * width / t / 1e9, "tokens_per_s": batch / t}
    return out


def load_average() -> list[float]:
    return list(os.getloadavg())


def sparsity_fields(arch: str, k: int, l0_target: bool = False) -> dict[str, Any]:
    """The config overrides that give an architecture about ``k`` active latents (where it has such a knob;
    ``l0_target``: also where its coefficient can be steered to a target L0)."""
    from sparsedict.dictionaries import lookup

    knobs = lookup(arch)[0].sparsity_fields
    if "k" in knobs:
        return {"k": k}
    if "steps" in knobs:  # matching pursuit: one latent per step
        return {"steps": k}
    if l0_target and "l0_target" in knobs:
        return {"l0_target": float(k)}
    return {}


def fit_dictionary(job: dict[str, Any]):
    """Build and train one dictionary on ``job["cache"]`` with the Trainer; returns ``(model, timings)``."""
    from sparsedict.cache import ActivationStore
    from sparsedict.config import from_dict
    from sparsedict.dictionaries import build, lookup
    from sparsedict.train import TrainConfig, Trainer

    hp = job.get("hookpoint", HOOKPOINT)
    torch.manual_seed(0)
    store = ActivationStore(job["cache"], hp, batch_size=job["batch"], seed=0)
    _, cfg_cls = lookup(job["arch"])
    dcfg = from_dict(cfg_cls, {"hookpoint": hp, "n_latents": job["width"], **job["fields"]})
    model = build(dcfg.resolved(store.d_in))
    tcfg = TrainConfig(batch_size=job["batch"], epochs=job["epochs"], max_steps=job["steps"],
                       optimizer=job["optimizer"], out_dir=job["out_dir"], log_every=10**9,
                       init_rows=min(32768, store.n_rows), threads=job["threads"],
                       autocast=job.get("autocast", "none"))  # fmt: skip
    trainer = Trainer({job["arch"]: model}, {(hp, ""): store}, tcfg)
    if job.get("build_only"):
        return model, trainer
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
    hp = job.get("hookpoint", HOOKPOINT)
    d = job["d"]
    gemms = {name: gemm_times(job["batch"], d, job["width"], dt) for name, dt in GEMM_DTYPES.items()}
    load_before = load_average()
    model, timing = fit_dictionary(job)
    load_after = load_average()
    for name, dt in GEMM_DTYPES.items():
        gemms[name] += gemm_times(job["batch"], d, job["width"], dt)
    limits = gemm_limits(job["batch"], d, job["width"], gemms)
    out = {"arch": job["arch"], "fields": job["fields"], "width": job["width"], "batch": job["batch"],
           "epochs": job["epochs"], "autocast": job.get("autocast", "none"), "hookpoint": hp, **timing,
           "gemm": limits, "load_before": load_before, "load_after": load_after,
           "gemm_fraction": {k: timing["tokens_per_s"] / v["tokens_per_s"] for k, v in limits.items()}}  # fmt: skip
    if job.get("eval_cache"):
        held = ActivationStore(job["eval_cache"], hp, batch_size=4096, drop_last=False, loop=False)
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


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx512_vnni")
"""CPU flags that decide what a bf16 GEMM can reach (AMX tiles on Sapphire Rapids, AVX512-BF16 dot
products on Zen 4 / Cooper Lake; without either torch converts bf16 to fp32)."""


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and which of :data:`BF16_FLAGS` it has (from /proc/cpuinfo where it exists)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": name, "flags": [f for f in BF16_FLAGS if f in flags]}


def machine() -> dict[str, Any]:
    return {"cpu": cpu_description(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: None)()),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip


def print_gemm_header(batch: int, d: int, width: int, reps: int = 7) -> dict[str, dict[str, float]]:
    """Measure and print both GEMM limits of this shape once, up front (each run measures its own too)."""
    limits = gemm_limits(
        batch, d, width, {g: gemm_times(batch, d, width, dt, reps) for g, dt in GEMM_DTYPES.items()}
    )
    f, b = limits["fp32"], limits["bf16"]
    cpu = cpu_description()
    print(f"# GEMM [{batch}, {d}] @ [{d}, {width}] on {torch.get_num_threads()} threads, {cpu['model']} "
          f"(flags: {', '.join(cpu['flags']) or 'none of ' + '/'.join(BF16_FLAGS)}): fp32 {1e3 * f['seconds']:.1f} ms "
          f"= {f['gflops']:.0f} GFLOP/s = {f['tokens_per_s']:.0f} tok/s; bf16 {1e3 * b['seconds']:.1f} ms = "
          f"{b['gflops']:.0f} GFLOP/s = {b['tokens_per_s']:.0f} tok/s (bf16/fp32 {f['seconds'] / b['seconds']:.2f}x); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    return limits


VARIANTS = {  # name -> (autocast, CPU kernels on)
    "ref-fp32": ("none", False),
    "cpu-fp32": ("none", True),
    "cpu-bf16": ("bf16", True),
    "ref-bf16": ("bf16", False),
}
"""The in-process A/B variants: the plain-torch path (``SPARSEDICT_DISABLE_CPU_KERNELS=1``) or the CPU
kernels, in fp32 or under bf16 autocast."""


class _KernelSwitch:
    """``with _KernelSwitch(on, dense_codes):`` runs the block with the CPU kernels on or off and, for the
    dense-code architectures, their sparse training step on or off (the environment variables the dispatch
    reads at every call)."""

    def __init__(self, on: bool, dense_codes: bool = False):
        self.values = {"SPARSEDICT_DISABLE_CPU_KERNELS": not on, "SPARSEDICT_DENSE_CODES": dense_codes}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.values}
        for k, v in self.values.items():
            if v:
                os.environ[k] = "1"
            else:
                os.environ.pop(k, None)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare_steps(job: dict[str, Any], entries: dict[str, list], rounds: int, profile_steps: int = 0) -> dict:
    """In-process A/B of training steps (see the module docstring); returns medians per entry.

    ``entries``: name -> ``[architecture, config fields, autocast, CPU kernels on, dense codes]``; every
    entry gets its own Trainer on the same cache (same batch order) and the entries' steps alternate in
    rotating order. ``job["warm"]`` rounds of training steps (alternating too, timed apart) precede the
    timed ones; with them the run length every schedule sees (LR, coefficient warmups, L0 steering) is the
    benchmark's own number of steps instead of an endless run.
    """
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(job["threads"] or os.cpu_count() or 1)
    variants = list(entries)
    warm = job.get("warm", 0)
    # one step more than are taken: the last step of a run does once-per-run work (BatchTopK's θ calibration)
    run_steps = 3 + warm + rounds + profile_steps if warm else 10**6
    trainers, iters, last = {}, {}, {}
    for name, (arch, fields, autocast, on, dense) in entries.items():
        with _KernelSwitch(on, dense):  # the optimiser picks its fused paths at construction
            _, tr = fit_dictionary({**job, "arch": arch, "fields": fields, "autocast": autocast,
                                    "build_only": True, "steps": run_steps})  # fmt: skip
            tr.initialise()
        trainers[name] = tr
        iters[name] = {key: iter(src) for key, src in tr.sources.items()}
        for (
            m
        ) in tr.members:  # the L0 and the code's form (dense, or sparse with k_max slots) of the last step
            m.model.after_step = _recording(m.model.after_step, last, name)

    def step(name: str) -> float:
        tr = trainers[name]
        batches = {key: next(it) for key, it in iters[name].items()}
        with _KernelSwitch(*entries[name][3:]):
            t = time.perf_counter()
            tr.train_step(batches)
            return time.perf_counter() - t

    d, B, n = job["d"], job["batch"], job["width"]
    for name in variants:  # warm-up: numba compilation, first-touch of buffers
        for _ in range(2):
            step(name)
    warm_times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(warm):
        for name in variants[r % len(variants) :] + variants[: r % len(variants)]:
            warm_times[name].append(step(name))
    times: dict[str, list[float]] = {v: [] for v in variants}
    gemms: dict[str, list[float]] = {g: [] for g in GEMM_DTYPES}
    load_before = load_average()
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name in order:
            times[name].append(step(name))
        for g, dt in GEMM_DTYPES.items():
            gemms[g] += gemm_times(B, d, n, dt, reps=1)
    limits = gemm_limits(B, d, n, gemms)
    out = {"rounds": rounds, "load_before": load_before, "load_after": load_average(), "gemm": limits,
           "variants": {}}  # fmt: skip
    for name in variants:
        t = median(times[name])
        out["variants"][name] = {"step_ms": 1e3 * t, "tokens_per_s": B / t, "all_ms": [1e3 * v for v in times[name]],
                                 **{f"fraction_{g}": t_g["seconds"] / t for g, t_g in limits.items()},
                                 **last.get(name, {})}  # fmt: skip
        if warm:
            w = warm_times[name]
            out["variants"][name].update(warm_tokens_per_s=B * len(w) / sum(w), warm_ms=[1e3 * v for v in w])
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile

        out["profiles"] = {}
        for name in variants:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(profile_steps):
                    step(name)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            out["profiles"][name] = table
    return out


def _recording(after_step, last: dict, name: str):
    """``after_step`` that also stores the step's mean L0 and its code's form (``k_max`` slots or dense) in
    ``last[name]``."""

    def wrapped(out):
        v = out.code.values.detach()
        last[name] = {"l0": float((v != 0).sum(-1).float().mean()),
                      "code": f"sparse k_max {v.shape[1]}" if out.code.indices is not None else "dense"}  # fmt: skip
        return after_step(out)

    return wrapped


def print_compare(res: dict, batch: int) -> None:
    g = res["gemm"]
    print(f"# in-process A/B, {res['rounds']} rounds, load average {res['load_before'][0]:.2f} -> "
          f"{res['load_after'][0]:.2f}; GEMM fp32 {1e3 * g['fp32']['seconds']:.1f} ms "
          f"({g['fp32']['gflops']:.0f} GFLOP/s, {g['fp32']['tokens_per_s']:.0f} tok/s), bf16 "
          f"{1e3 * g['bf16']['seconds']:.1f} ms ({g['bf16']['gflops']:.0f} GFLOP/s, {g['bf16']['tokens_per_s']:.0f} tok/s)")  # fmt: skip
    base = next(iter(res["variants"].values()))
    for name, v in res["variants"].items():
        warm = ""
        if "warm_tokens_per_s" in v:
            warm = (f"; first {len(v['warm_ms'])} steps {v['warm_tokens_per_s']:6.0f} tok/s = "
                    f"{100 * v['warm_tokens_per_s'] / base['warm_tokens_per_s']:5.1f}% of the first entry's")  # fmt: skip
        code = f"  L0 {v['l0']:6.1f} ({v['code']})" if "l0" in v else ""
        print(f"#   {name:14} step {v['step_ms']:8.1f} ms  {v['tokens_per_s']:8.0f} tok/s  "
              f"{100 * v['fraction_fp32']:5.1f}% of the fp32 GEMM limit, {100 * v['fraction_bf16']:5.1f}% of bf16, "
              f"{100 * v['tokens_per_s'] / base['tokens_per_s']:5.1f}% of the first entry's tok/s{code}{warm}")  # fmt: skip
    for name, table in res.get("profiles", {}).items():
        print(f"# profile {name} (self CPU time per op)\n{table}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workload", choices=["", "smollm2-l15"], default="", help="the issue-11 reference workload"
    )
    p.add_argument("--archs", default="", help="comma-separated architectures (default: all registered)")
    p.add_argument("--hookpoint", default=HOOKPOINT, help="cached hookpoint the dictionaries train on")
    p.add_argument("--width", type=int, default=4608)
    p.add_argument(
        "--k", type=int, default=32, help="active latents (k, or MP steps) where the architecture has it"
    )
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="steps per architecture (per-architecture mode)")
    p.add_argument("--train_tokens", type=int, default=250_000)
    p.add_argument("--eval_tokens", type=int, default=50_000)
    p.add_argument("--epochs", default="1,5", help="epochs per run in the workload mode")
    p.add_argument(
        "--optimizer", default="auto", help="TrainConfig.optimizer (auto: the per-architecture default)"
    )
    p.add_argument("--autocast", default="none", help="TrainConfig.autocast: 'none' (fp32) or 'bf16'")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument(
        "--train-model-dtype",
        default="float32",
        help="CacheConfig.model_dtype of the training cache (the held-out cache is always fp32)",
    )
    p.add_argument(
        "--cache-root",
        default="",
        help="directory of the benchmark caches (default: cache_dir()/bench-caches)",
    )
    p.add_argument(
        "--train-cache", default="", help="an existing training cache (instead of the benchmark's own)"
    )
    p.add_argument(
        "--eval-cache", default="", help="an existing held-out cache (instead of the benchmark's own)"
    )
    p.add_argument("--compare", type=int, default=0, help="rounds of the in-process A/B of steps (0: skip)")
    p.add_argument(
        "--variants", default="ref-fp32,cpu-fp32,cpu-bf16", help=f"A/B variants, of {list(VARIANTS)}"
    )
    p.add_argument(
        "--compare-archs",
        default="",
        help="comma-separated architectures for the A/B instead of --variants (first one: the ratios' base)",
    )
    p.add_argument(
        "--compare-warmup",
        type=int,
        default=0,
        help="alternating training rounds before the timed ones (the codes of ReLU/JumpReLU/Gated become sparse "
        "only after training; the schedules then see a run of the benchmark's length)",
    )
    p.add_argument(
        "--l0-target",
        action="store_true",
        help="architectures with an l0_target (ReLU, JumpReLU, Gated) get l0_target = --k",
    )
    p.add_argument(
        "--shapes",
        default="",
        help="more TopK shapes for the A/B, each against its own GEMM limit: ';'-separated lists of "
        "width=,k=,batch=,hookpoint=,train_cache= (e.g. 'width=9216,k=64,batch=1024;hookpoint=resid_post.6')",
    )
    p.add_argument("--profile", type=int, default=0, help="torch.profiler steps per A/B variant (0: none)")
    p.add_argument("--no-runs", action="store_true", help="only the A/B (and profile), no full training runs")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. 'contended machine')")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from sparsedict.cache import ActivationStore
    from sparsedict.dictionaries import available
    from sparsedict.lm import cache_dir

    train = args.train_cache or bench_cache("train", args.train_tokens, args.threads, args.hookpoint,
                                            args.cache_root, args.train_model_dtype)  # fmt: skip
    held = args.eval_cache or (
        bench_cache("test", args.eval_tokens, args.threads, args.hookpoint, args.cache_root)
        if args.eval_tokens
        else None
    )
    d = ActivationStore(train, args.hookpoint, batch_size=1).d_in
    head = {"machine": machine(), "label": args.label, "train_cache": str(train), "eval_cache": str(held),
            "hookpoint": args.hookpoint, "shape": {"batch": args.batch, "d": d, "width": args.width, "k": args.k},
            "load_average": load_average(), "train_model_dtype": args.train_model_dtype,
            "split": "train rows from split 'train', held-out rows from split 'test'"}  # fmt: skip
    print(json.dumps(head, indent=1))
    head["gemm"] = print_gemm_header(args.batch, d, args.width)
    base = {"cache": str(train), "eval_cache": str(held) if held else "", "eval_tokens": args.eval_tokens,
            "width": args.width, "batch": args.batch, "optimizer": args.optimizer, "threads": args.threads,
            "autocast": args.autocast, "hookpoint": args.hookpoint, "d": d,
            "out_dir": str(cache_dir() / "bench-runs")}  # fmt: skip
    if args.compare or args.profile:
        job = {**base, "epochs": 1.0, "steps": 0, "warm": args.compare_warmup}
        if args.compare_archs:  # architectures against each other, each with the CPU kernels in --autocast
            entries = {}
            for name in args.compare_archs.split(","):  # 'relu:dense': without the sparse training step
                a, _, form = name.partition(":")
                fields = sparsity_fields(a, args.k, args.l0_target)
                entries[name] = [a, fields, args.autocast, True, form == "dense"]
        else:  # one architecture, the kernel/dtype variants against each other
            arch = (args.archs or "topk").split(",")[0]
            fields = {"k": args.k} if args.workload else sparsity_fields(arch, args.k)
            entries = {v: [arch, fields, *VARIANTS[v], False] for v in args.variants.split(",")}
        head["compare"] = run_isolated_fn(
            _compare_child, {**job, "entries": entries, "rounds": max(1, args.compare),
                             "profile_steps": args.profile})  # fmt: skip
        if "error" in head["compare"]:
            print("# A/B failed:", head["compare"]["error"])
        else:
            print_compare(head["compare"], args.batch)
    head["shapes"] = []
    for spec in filter(None, args.shapes.split(";")):  # the same kernel/dtype A/B at other shapes and layers
        over = dict(kv.split("=", 1) for kv in spec.split(","))
        shape = {"width": int(over.get("width", args.width)), "batch": int(over.get("batch", args.batch)),
                 "hookpoint": over.get("hookpoint", args.hookpoint)}  # fmt: skip
        cache = over.get("train_cache") or (
            str(train) if shape["hookpoint"] == args.hookpoint
            else bench_cache("train", args.train_tokens, args.threads, shape["hookpoint"], args.cache_root)
        )  # fmt: skip
        shape_d = ActivationStore(cache, shape["hookpoint"], batch_size=1).d_in
        job = {**base, **shape, "cache": cache, "d": shape_d, "epochs": 1.0, "steps": 0}
        k = int(over.get("k", args.k))
        entries = {v: ["topk", {"k": k}, *VARIANTS[v], False] for v in args.variants.split(",")}
        print(
            f"# shape: TopK k={k}, width {shape['width']}, batch {shape['batch']}, {shape['hookpoint']} (d = {shape_d})"
        )
        res = run_isolated_fn(
            _compare_child, {**job, "entries": entries, "rounds": max(1, args.compare), "profile_steps": 0}
        )
        head["shapes"].append({**shape, "k": k, "cache": cache, "compare": res})
        if "error" in res:
            print("# A/B failed:", res["error"])
        else:
            print_compare(res, shape["batch"])
    if args.workload:
        jobs = [{**base, "arch": "topk", "fields": {"k": args.k}, "epochs": float(e), "steps": 0}
                for e in args.epochs.split(",")]  # fmt: skip
    else:
        archs = args.archs.split(",") if args.archs else available()
        jobs = [{**base, "arch": a, "fields": sparsity_fields(a, args.k), "epochs": 1.0, "steps": args.steps}
                for a in archs]  # fmt: skip
    rows = []
    for job in [] if args.no_runs else jobs:
        r = run_isolated(job)
        rows.append(r)
        print(format_row(r), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**head, "rows": rows}) + "\n")
    return 0


def _compare_child(job: dict[str, Any]) -> dict[str, Any]:
    return compare_steps(job, job["entries"], job["rounds"], job["profile_steps"])


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['arch']:<11} ERROR {r['error']}"
    fields = ",".join(f"{k}={v}" for k, v in r["fields"].items())
    quality = ""
    if "fvu" in r:
        quality = f"  FVU {r['fvu']:.4f}  L0 {r['l0']:6.1f}  dead {100 * r['dead']:5.1f}%"
    frac = r["gemm_fraction"]
    return (f"{r['arch']:<11} {fields:<9} {r['autocast']:<4} ep {r['epochs']:<4g} steps {r['steps']:>5}  "
            f"{r['tokens_per_s']:9.0f} tok/s  ({100 * frac['fp32']:5.1f}% of the fp32 GEMM limit "
            f"{r['gemm']['fp32']['tokens_per_s']:.0f} tok/s, {100 * frac['bf16']:5.1f}% of bf16 "
            f"{r['gemm']['bf16']['tokens_per_s']:.0f}){quality}  peak RSS {r['peak_rss_gb']:.2f} GB  "
            f"load {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
