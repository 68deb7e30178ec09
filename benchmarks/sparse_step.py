"""Quality check of the sparse CPU training step of the dense-code architectures: the same run twice.

    python benchmarks/sparse_step.py --train-cache /work/runs-shared/smollm2-resid6-train-500k \\
        --eval-cache /work/runs-shared/smollm2-resid6-test-20k --hookpoint resid_post.6 --steps 100

For each architecture (default ReLU, JumpReLU, Gated, BatchTopK, Matryoshka, with ``l0_target`` / ``k`` =
``--k``), one Trainer run with the sparse step (the default on the CPU kernels) and one with
``SPARSEDICT_DENSE_CODES=1`` (the dense step), from the same seed on the same batches, their steps
alternating in one process. Prints the largest relative difference of the summed loss over the run, the
loss at the first and last step, how many steps took the sparse path, and the held-out FVU / L0 of both
final models. The two runs differ only by fp32 summation order, which training amplifies slowly; the
check is that the loss curves and the held-out FVU agree to a few digits. ``--control`` gives the noise floor
of that comparison: both runs take the dense step, one on inputs scaled by ``1 + 2^-22`` (a rounding-level
change), and the same numbers are printed ("sparse" then names the perturbed dense run).

``--crossover``: instead, where the sparse step stops paying: one ReLU step (forward + backward) dense
against sparse at a set fraction of active entries (biases at each latent's quantile of real rows),
alternating, medians of 4; the dense fallback's ``MAX_ACTIVE_FRACTION`` comes from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _KernelSwitch, fit_dictionary, load_average, median, sparsity_fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-cache", required=True)
    p.add_argument("--eval-cache", required=True)
    p.add_argument("--hookpoint", default="resid_post.6")
    p.add_argument("--archs", default="relu,jumprelu,gated,batchtopk,matryoshka")
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--control",
        action="store_true",
        help="noise floor: the first run is the dense step too, on inputs scaled by 1 + 2^-22 (fp rounding only)",
    )
    p.add_argument(
        "--crossover", action="store_true", help="time dense vs sparse ReLU steps by active fraction"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.crossover:
        return crossover(args)
    import warnings

    warnings.simplefilter("ignore")
    from sparsedict.cache import ActivationStore
    from sparsedict.eval.heldout import reconstruction_stats
    from sparsedict.lm import cache_dir

    print(
        f"# {args.steps} steps, width {args.width}, batch {args.batch}, {args.hookpoint}; load {load_average()}"
    )
    for arch in args.archs.split(","):
        job = {"cache": args.train_cache, "hookpoint": args.hookpoint, "arch": arch, "width": args.width,
               "batch": args.batch, "fields": sparsity_fields(arch, args.k, True), "epochs": 1.0,
               "steps": args.steps, "optimizer": "auto", "threads": args.threads,
               "out_dir": str(cache_dir() / "bench-runs"), "build_only": True}  # fmt: skip
        runs = {}
        for dense in (False, True):
            with _KernelSwitch(True, dense or args.control):
                model, tr = fit_dictionary(job)
                tr.initialise()
            it = {key: iter(src) for key, src in tr.sources.items()}
            runs[dense] = {"model": model, "trainer": tr, "iters": it, "loss": [], "sparse": 0}
            original = model.after_step

            def record(out, run=runs[dense], original=original):
                run["sparse"] += out.code.indices is not None
                return original(out)

            model.after_step = record
        for _ in range(args.steps):
            for dense, run in runs.items():
                batches = {key: next(i) for key, i in run["iters"].items()}
                if args.control and not dense:
                    batches = {key: (x * (1 + 2**-22), y) for key, (x, y) in batches.items()}
                with _KernelSwitch(True, dense or args.control):
                    metrics = run["trainer"].train_step(batches)
                run["loss"].append(metrics[f"{run['trainer'].members[0].name}/loss"])
        a, b = torch.tensor(runs[False]["loss"]), torch.tensor(runs[True]["loss"])
        rel = ((a - b).abs() / b.abs().clamp_min(1e-12)).max()
        quality = {}
        for dense, run in runs.items():
            os.environ.pop("SPARSEDICT_DENSE_CODES", None)
            held = ActivationStore(
                args.eval_cache, args.hookpoint, batch_size=4096, drop_last=False, loop=False
            )
            st = reconstruction_stats(run["model"], held, max_rows=args.eval_tokens)
            quality[dense] = (st.fvu, st.l0, st.dead_fraction)
        (fs, ls, ds), (fd, ld, dd) = quality[False], quality[True]
        print(f"{arch:11} {job['fields']}: loss step 1 {a[0]:.6g} / {b[0]:.6g}, last {a[-1]:.6g} / {b[-1]:.6g} "
              f"(sparse / dense), max rel. diff {float(rel):.2e}; sparse steps {runs[False]['sparse']}/{args.steps}; "
              f"held-out FVU {fs:.5f} / {fd:.5f}, L0 {ls:.1f} / {ld:.1f}, dead {100 * ds:.1f}% / {100 * dd:.1f}%",
              flush=True)  # fmt: skip
    print(f"# load {load_average()}")
    return 0


def crossover(args) -> int:
    import time

    from sparsedict.cache import ActivationStore
    from sparsedict.dictionaries import active, build
    from sparsedict.dictionaries.relu import ReLUConfig

    store = ActivationStore(args.train_cache, args.hookpoint, batch_size=args.batch, seed=0)
    x, _ = next(iter(store))
    x = x.float() * (x.shape[1] ** 0.5 / x.float().norm(dim=1).mean())  # ReLU's sqrt_d normalisation
    torch.manual_seed(0)
    m = build(ReLUConfig(hookpoint=args.hookpoint, n_latents=args.width).resolved(x.shape[1]))
    active.MAX_ACTIVE_FRACTION = 1.0
    with torch.no_grad():
        z0 = (x - m.b_dec) @ m.W_enc

    def step(dense: bool) -> float:
        with _KernelSwitch(True, dense):
            m.zero_grad(set_to_none=True)
            t = time.perf_counter()
            sum(m(x).losses.values()).backward()
            return time.perf_counter() - t

    print(
        f"# ReLU step, width {args.width}, batch {args.batch}, {args.threads} thread(s); load {load_average()}"
    )
    for frac in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 6, 1 / 4):
        with torch.no_grad():
            m.b_enc.copy_(-z0.quantile(1 - frac, dim=0))
        times = {True: [], False: []}
        for r in range(5):
            for dense in (True, False) if r % 2 else (False, True):
                t = step(dense)
                if r:
                    times[dense].append(t)
        d, s = (median(times[v]) for v in (True, False))
        print(f"active {frac:.4f} of B*n (L0 {frac * args.width:6.0f}): dense {1e3 * d:7.1f} ms, sparse "
              f"{1e3 * s:7.1f} ms, dense/sparse {d / s:.2f}", flush=True)  # fmt: skip
    print(f"# load {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
