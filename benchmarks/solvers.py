"""Benchmarks for the solver-based dictionaries: MP-SAE and SNMF (issue 6 / issue 11 targets).

Workloads (one per process, so peak RSS is the workload's own; results print as one JSON line each):

- ``mp``: MP-SAE (32 steps, width 4608) on a cached hookpoint (resid_post.14 of SmolLM2-135M), trained with
  the standard Trainer on ``--tokens`` training rows; reports training tokens/s, the fraction of the
  encoder-shaped GEMM limit ``[batch, d] @ [d, width]`` (fp32 and bf16, timed in the same process before and
  after the run), the load average, held-out FVU, L0, dead %, peak RSS.
- ``snmf``: the paper's full-batch solver (``--full-iters``) vs the streaming solver (``--epochs`` passes of
  fit_step) on the same ``--tokens`` rows of a cached MLP-hidden hookpoint, for each K; held-out FVU of both
  (both encoded by the same NNLS), wall times, and the NNLS iterations needed for the encode to converge.
- ``snmf-rss``: streaming SNMF on ``--tokens`` rows of a synthetic stream (d=1536, generated batch by batch,
  never held in memory) through the Trainer; peak RSS (run it at two token counts to see independence).

Example (what RESULTS_solvers.md used)::

    python benchmarks/solvers.py mp --train-cache C --test-cache T --hookpoint resid_post.14 --tokens 100000
    python benchmarks/solvers.py snmf --train-cache C --test-cache T --hookpoint mlp_hidden.15 --K 100 400
    python benchmarks/solvers.py snmf-rss --tokens 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch
from throughput import GEMM_DTYPES, gemm_limits, gemm_times

from sparsedict.dictionaries import build
from sparsedict.metrics import ReconstructionStats


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_rows(path: str, hookpoint: str, n: int, start: int = 0) -> torch.Tensor:
    """Rows ``[start, start + n)`` of a cache (cache order: whole contexts, so disjoint ranges share none)."""
    from sparsedict.cache import ActivationStore

    store = ActivationStore(path, hookpoint)
    if store.n_rows < start + n:
        print(f"note: {path} has {store.n_rows} rows < {start + n} requested; using what is there")
    return store.rows(start, min(start + n, store.n_rows)).float()


def train_test(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows and held-out rows; with one cache for both, held-out rows follow the training rows."""
    x = load_rows(args.train_cache, args.hookpoint, args.tokens)
    start = x.shape[0] if args.test_cache == args.train_cache else 0
    return x, load_rows(args.test_cache, args.hookpoint, args.test_tokens, start)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, batch: int = 2048) -> ReconstructionStats:
    model.eval()
    stats = ReconstructionStats()
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        code = model.encode(xb)
        stats.update(xb, model.decode(code), code)
    return stats


def run_mp(args) -> dict:
    from sparsedict.dictionaries.mp import MPConfig
    from sparsedict.train import TensorSource, TrainConfig, Trainer

    x, xt = train_test(args)
    cfg = MPConfig(hookpoint=args.hookpoint, n_latents=args.width, steps=args.steps, init_atoms=args.init)
    torch.manual_seed(0)
    model = build(cfg.resolved(x.shape[1]))
    tc = TrainConfig(
        batch_size=args.batch,
        epochs=args.epochs,
        lr=args.lr,
        warmup_steps=args.warmup,
        autocast=args.autocast,
        out_dir="/tmp/sd_bench_mp",
        log_every=10_000,
        init_rows=32768,
    )
    tr = Trainer({"mp": model}, {(args.hookpoint, ""): TensorSource(x, batch_size=args.batch)}, tc)
    tr.initialise()
    init_stats = evaluate(model, xt)
    it = iter(tr.sources[(args.hookpoint, "")])
    shape = (args.batch, x.shape[1], args.width)
    gemms = {g: gemm_times(*shape, dt) for g, dt in GEMM_DTYPES.items()}  # the encoder-shaped GEMM limit
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    while tr.step < tr.total_steps:
        tr.train_step({(args.hookpoint, ""): next(it)})
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    for g, dt in GEMM_DTYPES.items():
        gemms[g] += gemm_times(*shape, dt)
    limits = gemm_limits(*shape, gemms)
    stats = evaluate(model, xt)
    return {
        "workload": "mp",
        "train_tokens": tr.tokens,
        "steps": tr.step,
        "batch": args.batch,
        "autocast": args.autocast,
        "width": args.width,
        "pursuit_steps": args.steps,
        "lr": args.lr,
        "tokens_per_s": tr.tokens / wall,
        "train_wall_s": wall,
        "gemm_limit_tokens_per_s": {g: v["tokens_per_s"] for g, v in limits.items()},
        "gemm_fraction": {g: tr.tokens / wall / v["tokens_per_s"] for g, v in limits.items()},
        "load_average": [load_before[0], load_after[0]],
        "heldout_fvu": stats.fvu,
        "heldout_fvu_at_init": init_stats.fvu,
        "l0": stats.l0,
        "dead_pct": 100 * stats.dead_fraction,
        "peak_rss_mb": peak_rss_mb(),
        "heldout_tokens": stats.tokens,
    }


def run_snmf(args) -> list[dict]:
    from sparsedict.dictionaries.snmf import SNMF, SNMFConfig, nnls, snmf_full_batch

    x, xt = train_test(args)
    out = []
    for K in args.K:
        cfg = SNMFConfig(
            hookpoint=args.hookpoint, n_latents=K, sparsity=args.sparsity, memory_tokens=args.memory_tokens
        ).resolved(x.shape[1])
        row = {"workload": "snmf", "K": K, "train_tokens": x.shape[0], "heldout_tokens": xt.shape[0]}
        if args.full_iters > 0:
            t0 = time.perf_counter()
            ref = snmf_full_batch(x, K, sparsity=args.sparsity, iters=args.full_iters, seed=0)
            row["full_wall_s"] = time.perf_counter() - t0
            row["full_iters"], row["full_best_iter"] = len(ref.losses), ref.best_iter
            full = SNMF.from_factors(ref.F, cfg)
            row["full_heldout_fvu"] = evaluate(full, xt).fvu
            row["full_code_density"] = float((ref.G > 0).float().mean())
            del ref
        torch.manual_seed(0)
        model = SNMF(cfg)
        t0 = time.perf_counter()
        model.init_from_data(x[torch.randperm(x.shape[0])[:32768]])
        g = torch.Generator().manual_seed(0)
        for _ in range(args.epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - args.batch + 1, args.batch):
                model.fit_step(x[perm[i : i + args.batch]])
        row["stream_wall_s"] = time.perf_counter() - t0
        row["stream_epochs"] = args.epochs
        st = evaluate(model, xt)
        row.update(stream_heldout_fvu=st.fvu, stream_l0=st.l0, stream_dead_pct=100 * st.dead_fraction)
        # encode convergence: objective after k iterations vs a 2000-iteration solution
        xe = xt[:2048]
        W = model.W_dec
        best, _ = nnls(xe, W, iters=2000, tol=0.0)
        f_best = float((xe - best @ W).pow(2).sum())
        for k in (10, 30, 50, 100):
            gk, _ = nnls(xe, W, iters=k, tol=0.0)
            row[f"encode_rel_excess_at_{k}"] = float((xe - gk @ W).pow(2).sum()) / f_best - 1
        row["peak_rss_mb"] = peak_rss_mb()
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


class SyntheticStream:
    """Store-like source generating ``[batch, d]`` rows on the fly: non-negative sparse codes on K_true
    mixed-sign features + noise. Nothing is kept between batches, so memory is independent of tokens."""

    def __init__(self, n_rows: int, d: int = 1536, k_true: int = 300, batch_size: int = 4096, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.F = torch.randn(k_true, d, generator=g) * (torch.rand(k_true, d, generator=g) < 0.05)
        self.n_rows, self.d_in, self.d_out, self.batch_size = n_rows, d, d, batch_size
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.meta: dict = {}
        self.world_size = 1

    def _batch(self, n: int) -> torch.Tensor:
        codes = torch.rand(n, self.F.shape[0], generator=self.gen)
        codes = codes * (torch.rand(n, self.F.shape[0], generator=self.gen) < 0.05)
        return codes @ self.F + 0.05 * torch.randn(n, self.d_in, generator=self.gen)

    def __iter__(self):
        while True:
            yield self._batch(self.batch_size), None

    def sample(self, n_rows: int, seed: int = 0):
        return self._batch(n_rows), None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run_snmf_rss(args) -> dict:
    from sparsedict.dictionaries.snmf import SNMFConfig
    from sparsedict.train import TrainConfig, Trainer

    src = SyntheticStream(args.tokens, batch_size=args.batch)
    cfg = SNMFConfig(hookpoint="synthetic", n_latents=args.K[0]).resolved(src.d_in)
    model = build(cfg)
    tc = TrainConfig(
        batch_size=args.batch, epochs=1, out_dir="/tmp/sd_bench_snmf_rss", log_every=10_000, init_rows=32768
    )
    tr = Trainer({"snmf": model}, {("synthetic", ""): src}, tc)
    tr.initialise()
    it = iter(src)
    t0 = time.perf_counter()
    last = {}
    while tr.step < tr.total_steps:
        last = tr.train_step({("synthetic", ""): next(it)})
    wall = time.perf_counter() - t0
    return {
        "workload": "snmf-rss",
        "K": args.K[0],
        "train_tokens": tr.tokens,
        "tokens_per_s": tr.tokens / wall,
        "train_wall_s": wall,
        "last_batch_fvu": last.get("snmf/fvu"),
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=["mp", "snmf", "snmf-rss"])
    p.add_argument("--train-cache", default="")
    p.add_argument("--test-cache", default="")
    p.add_argument("--hookpoint", default="resid_post.14")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--test-tokens", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0)
    # MP
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--autocast", default="none", choices=["none", "bf16"])
    p.add_argument("--init", default="data", choices=["data", "random"])
    # SNMF
    p.add_argument("--K", type=int, nargs="+", default=[100])
    p.add_argument("--sparsity", type=float, default=0.01)
    p.add_argument("--full-iters", type=int, default=400)
    p.add_argument("--memory-tokens", type=int, default=200_000)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )
    if args.workload == "mp":
        print(json.dumps(run_mp(args)))
    elif args.workload == "snmf":
        run_snmf(args)
    else:
        print(json.dumps(run_snmf_rss(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
