"""The same TopK configuration trained by sparsedict and by each installed peer library, side by side.

    python benchmarks/peers.py [--width 4608 --k 32 --batch 4096 --epochs 1 --train_tokens 250000]

All runs read the same cached activations (``benchmarks/throughput.py``'s cache of the embedded
SmolLM2-135M at ``resid_post.14``, split 'train'; held-out rows from split 'test') in the same batch
order, each in a fresh process (its own peak RSS), and every model is scored by sparsedict's metrics
(:class:`sparsedict.metrics.ReconstructionStats`: held-out FVU with per-dimension mean, L0, dead %).
Peers train with their own training step and defaults:

- **eai-sparsify** (``sparsify.SparseCoder``): its trainer's step on cached data — b_dec = mean of the first
  batch, unit-norm decoder before each step, loss = its FVU (auxk_alpha 0, its default), parallel gradient
  removed, sign-SGD under ``ScheduleFreeWrapper`` (momentum 0.95, lr 5e-3/sqrt(n/2^14)), ``.eval()`` at the end.
  Without CUDA its Triton decoder cannot run, so ``SPARSIFY_DISABLE_TRITON=1`` selects its eager decoder.
- **sae-lens**, **dictionary-learning**, **overcomplete**: no runner is written here yet; they are reported
  as missing (with the reason) rather than run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import HOOKPOINT, bench_cache, run_isolated_fn

PEERS = {"eai-sparsify": "sparsify", "sae-lens": "sae_lens", "dictionary-learning": "dictionary_learning",
         "overcomplete": "overcomplete"}  # fmt: skip
RUNNERS = ("sparsedict", "eai-sparsify")


def peer_status(name: str) -> str:
    """'' when the peer imports and has a runner here, else why it is skipped."""
    module = PEERS[name]
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {name})"
    try:
        importlib.import_module(module)
    except Exception as err:
        return f"installed but `import {module}` fails: {type(err).__name__}: {err}"
    if name not in RUNNERS:
        return "installed, but benchmarks/peers.py has no runner for it yet"
    return ""


def _batches(job: dict[str, Any]):
    from sparsedict.cache import ActivationStore

    store = ActivationStore(job["cache"], HOOKPOINT, batch_size=job["batch"], seed=0)
    steps = max(1, math.floor(job["epochs"] * store.n_rows / job["batch"]))
    it = iter(store)
    for _ in range(steps):
        yield next(it)[0]


def _score(job: dict[str, Any], encode_decode) -> dict[str, float]:
    """Held-out metrics with sparsedict's ReconstructionStats; ``encode_decode(x) -> (x̂, SparseCode)``."""
    from sparsedict.cache import ActivationStore
    from sparsedict.metrics import ReconstructionStats

    held = ActivationStore(job["eval_cache"], HOOKPOINT, batch_size=4096, drop_last=False, loop=False)
    stats = ReconstructionStats(job["width"])
    with torch.no_grad():
        for x, _ in held:
            x = x[: job["eval_tokens"] - stats.tokens]
            x_hat, code = encode_decode(x)
            stats.update(x, x_hat, code)
            if stats.tokens >= job["eval_tokens"]:
                break
    return {"heldout_tokens": stats.tokens, "fvu": stats.fvu, "l0": stats.l0, "dead": stats.dead_fraction}


def train_sparsedict(job: dict[str, Any]) -> dict[str, Any]:
    """sparsedict's Trainer (TrainConfig defaults, ``--optimizer``) on the same store and batch order."""
    from throughput import fit_dictionary

    from sparsedict.dictionaries import reconstruct

    model, timing = fit_dictionary({**job, "arch": "topk", "fields": {"k": job["k"]}, "steps": 0})
    return {
        "tokens": timing["tokens"],
        "train_s": timing["train_s"],
        **_score(job, lambda x: reconstruct(model, x)),
    }


def train_sparsify(job: dict[str, Any]) -> dict[str, Any]:
    if not torch.cuda.is_available():  # its Triton decoder needs a GPU; use its own eager fallback switch
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    from sparsedict.dictionaries.base import SparseCode

    sae = SparseCoder(576, SparseCoderConfig(k=job["k"], num_latents=job["width"]), device="cpu")
    lr = 5e-3 / (job["width"] / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    t0, tokens = time.perf_counter(), 0
    for step, x in enumerate(_batches(job)):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        tokens += x.shape[0]
    opt.eval()
    seconds = time.perf_counter() - t0

    def encode_decode(x):
        out = sae(x)
        return out.sae_out, SparseCode(out.latent_acts, out.latent_indices, job["width"])

    return {"tokens": tokens, "train_s": seconds, **_score(job, encode_decode)}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(job["threads"] or os.cpu_count() or 1)
    torch.manual_seed(0)
    fn = {"sparsedict": train_sparsedict, "eai-sparsify": train_sparsify}[job["library"]]
    out = {"library": job["library"], **fn(job)}
    out["tokens_per_s"] = out["tokens"] / out["train_s"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--train_tokens", type=int, default=250_000)
    p.add_argument("--eval_tokens", type=int, default=50_000)
    p.add_argument("--optimizer", default="adam", help="sparsedict's optimizer ('adam' or 'signum_sf')")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--label", default="", help="free text printed with the results (e.g. 'contended machine')"
    )
    args = p.parse_args(argv)
    from sparsedict.cache import ActivationStore
    from sparsedict.lm import cache_dir

    train = bench_cache("train", args.train_tokens, args.threads)
    held = bench_cache("test", args.eval_tokens, args.threads)
    n_rows = ActivationStore(train, HOOKPOINT, batch_size=args.batch).n_rows
    print(f"TopK k={args.k} width={args.width} batch={args.batch} epochs={args.epochs}: {n_rows} training rows, "
          f"held-out {args.eval_tokens} rows; {os.cpu_count()} cores, torch {torch.__version__} {args.label}")  # fmt: skip
    libraries = ["sparsedict"]
    for name in PEERS:
        why = peer_status(name)
        if why:
            print(f"  skip {name}: {why}")
        else:
            libraries.append(name)
    base = {"cache": str(train), "eval_cache": str(held), "eval_tokens": args.eval_tokens, "n_rows": n_rows,
            "width": args.width, "k": args.k, "batch": args.batch, "epochs": args.epochs,
            "optimizer": args.optimizer, "threads": args.threads, "out_dir": str(cache_dir() / "bench-runs")}  # fmt: skip
    print(f"{'library':<14} {'tok/s':>9} {'FVU':>8} {'L0':>7} {'dead %':>7} {'peak RSS':>9}")
    for lib in libraries:
        r = run_isolated_fn(run_job, {**base, "library": lib})
        if "error" in r:
            print(f"{lib:<14} ERROR {r['error']}")
            continue
        print(f"{lib:<14} {r['tokens_per_s']:9.0f} {r['fvu']:8.4f} {r['l0']:7.2f} {100 * r['dead']:7.2f} "
              f"{r['peak_rss_gb']:7.2f} GB", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
