"""Every SAE architecture at comparable L0 on real SmolLM2-135M residual activations: one command.

    python benchmarks/architectures.py [--tokens 100000] [--eval_tokens 20000] [--epochs 2] \
        [--expansion 8] [--k 32] [--device cpu] [--calibration_runs 4] [--l0_tolerance 0.15] \
        [--out benchmarks/RESULTS_architectures.md]

Caches ``resid_post.6`` of the embedded SmolLM2-135M on the embedded corpus (train split, and the
held-out test split), trains each architecture alone (same width, same tokens, same batches, same
optimiser settings) and prints a markdown table of held-out FVU, L0, dead %, dense % and training
tokens/s. L0 is matched by construction for the k-based architectures (k = 32; BatchTopK and
Matryoshka evaluate with their inference threshold θ) and JumpReLU (target-L0 loss at 32). ReLU and
Gated have no L0 knob, so their L1 coefficient λ is calibrated: full-budget runs, each measuring L0 on a
sample of the *training* cache (the held-out set is only used for the reported row), with a secant step
on (log λ, log L0) (a prior slope for the first step, interpolation once the target is bracketed), until
L0 is within ``--l0_tolerance`` of k or ``--calibration_runs`` runs are spent; the row is the run whose
L0 is closest to k in log terms, and the "setting" column says λ and how many runs it took. Inputs are
normalised as each architecture's defaults assume (sqrt_d for the L1 methods, unit mean squared norm for
JumpReLU, none for the k-based ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from sparsedict.cache import ActivationStore, CacheConfig, cache_activations
from sparsedict.dictionaries import build, lookup
from sparsedict.eval.heldout import reconstruction_stats
from sparsedict.train import TrainConfig, Trainer

HOOK = "resid_post.6"

# (row name, architecture, config overrides, input normalisation); "K" is replaced by --k, and a
# Calibrate value is searched for L0 ≈ k (see calibrate()).

# Starting guesses for the L1 calibration at the default budget, from probe runs of this script's
# settings (ReLU: λ 5 → held-out L0 104, λ 12 → 62, λ 35 → training-sample L0 25.5, slope ≈ -0.84 over
# 12–35; Gated: λ 1 → 516, λ 6 → 61, slope ≈ -1.2, assumed to flatten as the code gets sparser).
RELU_START, RELU_SLOPE = 27.0, -0.84
GATED_START, GATED_SLOPE = 10.0, -1.0


@dataclasses.dataclass(frozen=True)
class Calibrate:
    start: float
    """First value tried."""
    slope: float
    """Prior d log L0 / d log value for the first step (later steps use the measured secant)."""


ARCHITECTURES = [
    ("topk", "topk", {}),
    ("batchtopk", "batchtopk", {}),
    ("matryoshka", "matryoshka", {}),
    ("jumprelu", "jumprelu", {"l0_target": "K", "l0_coefficient": 1.0, "threshold_init": 0.01}),
    # L0 falls as λ grows; starting guesses and prior slopes from probe runs at this budget
    ("relu", "relu", {"l1_coefficient": Calibrate(start=RELU_START, slope=RELU_SLOPE)}),
    ("gated", "gated", {"l1_coefficient": Calibrate(start=GATED_START, slope=GATED_SLOPE)}),
    ("mp", "mp", {"steps": "K"}),
]
"""(row name, architecture, config overrides); inputs are normalised as the class declares
(``input_normalisation``)."""


def caches(args) -> tuple[Path, Path]:
    common = dict(
        model="smollm2-135m",
        dataset="embedded",
        hookpoints=[HOOK],
        context_length=128,
        exclude_first_n=2,
        device=args.device,
        progress=False,
    )
    train = cache_activations(
        CacheConfig(split="train", max_tokens=args.tokens, out_dir=f"{args.work}/cache-train", **common)
    )
    test = cache_activations(
        CacheConfig(split="test", max_tokens=args.eval_tokens, out_dir=f"{args.work}/cache-test", **common)
    )
    return train, test


def run_one(
    name: str, arch: str, overrides: dict, norm: str, args, train_dir: Path, test_dir: Path, tag: str = ""
) -> dict:
    source = ActivationStore(train_dir, HOOK, batch_size=args.batch_size, seed=0)
    _, cfg_cls = lookup(arch)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = {k: (args.k if v == "K" else v) for k, v in overrides.items()}
    if "k" in fields:
        kw["k"] = args.k
    cfg = cfg_cls(architecture=arch, hookpoint=HOOK, expansion=args.expansion, **kw)
    torch.manual_seed(0)
    model = build(cfg.resolved(source.d_in))
    tc = TrainConfig(
        batch_size=args.batch_size,
        epochs=args.epochs,
        optimizer="adam",  # one optimiser for every row (the 'auto' default picks signum_sf for TopK only)
        lr=args.lr,
        warmup_steps=args.warmup,
        normalise_inputs=norm,
        device=args.device,
        dead_tokens=args.dead_tokens,
        out_dir=f"{args.work}/train-{name}{tag}",
        log_every=10**9,
        init_rows=8192,
    )
    trainer = Trainer({name: model}, {(HOOK, ""): source}, tc)
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    seconds = time.perf_counter() - t0
    path = trainer.save()[name]
    from sparsedict.dictionaries import from_pretrained

    loaded = from_pretrained(path, device=args.device)  # evaluate what was saved (scale folded)
    store = ActivationStore(test_dir, HOOK, batch_size=4096, loop=False, drop_last=False)
    stats = reconstruction_stats(loaded, store, device=args.device)
    # L0 on a sample of the training cache: what calibration steers by (the held-out set stays unused)
    sample = ActivationStore(train_dir, HOOK, batch_size=4096, seed=1, loop=False, drop_last=False)
    train_l0 = reconstruction_stats(loaded, sample, max_rows=args.eval_tokens, device=args.device).l0
    setting = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
    if "threshold" in dict(loaded.named_buffers()) and loaded.threshold.numel() == 1:
        setting += f", θ={float(loaded.threshold):.3g}"
    return {
        "name": name,
        "setting": setting,
        "fvu": stats.fvu,
        "l0": stats.l0,
        "train_l0": train_l0,
        "dead": stats.dead_fraction,
        "dense": stats.dense_fraction,
        "tokens_per_s": trainer.tokens / seconds,
        "eval_tokens": stats.tokens,
        "train_tokens": trainer.tokens,
    }


def next_value(history: list[tuple[float, float]], target: float, prior_slope: float) -> float:
    """Next value of a knob that sets L0 as a power law: a secant step on (log value, log L0).

    ``history`` holds (value, L0) pairs. Once the target is bracketed, interpolate between the closest
    bracketing pair (the step stays inside the bracket); otherwise step from the run closest to the target
    along the secant of the last two runs, or along ``prior_slope`` with one run or a non-decreasing secant
    (noise). Steps are capped at a factor of 8.
    """
    pts = [(math.log(v), math.log(max(l0, 0.1))) for v, l0 in history]
    t = math.log(target)
    above = [p for p in pts if p[1] > t]
    below = [p for p in pts if p[1] < t]
    if above and below:  # L0 falls with the value: the bracket is (largest value above, smallest below)
        a = min(above, key=lambda p: p[1] - t)
        b = min(below, key=lambda p: t - p[1])
        u = a[0] + (t - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
        return math.exp(u)
    slope = prior_slope
    if len(pts) >= 2 and pts[-1][0] != pts[-2][0]:
        s = (pts[-1][1] - pts[-2][1]) / (pts[-1][0] - pts[-2][0])
        if s < -0.05:
            slope = s
    base = min(pts, key=lambda p: abs(p[1] - t))
    step = max(-math.log(8), min(math.log(8), (t - base[1]) / slope))
    return math.exp(base[0] + step)


def calibrate(
    name: str, arch: str, overrides: dict, norm: str, args, train_dir: Path, test_dir: Path
) -> dict:
    """Full-budget runs of ``arch`` with its Calibrate knob steered to training-sample L0 ≈ k."""
    ((key, cal),) = ((k, v) for k, v in overrides.items() if isinstance(v, Calibrate))
    target = float(args.k)
    value, history, runs = cal.start, [], []
    for i in range(args.calibration_runs):
        row = run_one(name, arch, {**overrides, key: value}, norm, args, train_dir, test_dir, tag=f"-cal{i}")
        history.append((value, row["train_l0"]))
        runs.append(row)
        print(
            f"# {name} calibration run {i + 1}: {key}={value:.4g} -> train L0 {row['train_l0']:.1f}",
            flush=True,
        )
        if abs(row["train_l0"] / target - 1) <= args.l0_tolerance:
            break
        value = next_value(history, target, cal.slope)
    best = min(runs, key=lambda r: abs(math.log(max(r["train_l0"], 0.1) / target)))
    ok = abs(best["train_l0"] / target - 1) <= args.l0_tolerance
    best["setting"] += f" (calibrated, {len(runs)} runs{'' if ok else ', tolerance not reached'})"
    best["calibration"] = [(v, l0) for v, l0 in history]
    return best


def table(rows: list[dict], args, device: str) -> str:
    lines = [
        f"SmolLM2-135M `{HOOK}`, width {args.expansion}×576, {rows[0]['train_tokens']} training tokens "
        f"({args.epochs} epochs of {args.tokens}), batch {args.batch_size}, Adam lr {args.lr}, held-out "
        f"{rows[0]['eval_tokens']} tokens (test split), device {device}.",
        "",
        "| architecture | setting | FVU | L0 | dead % | dense % | train tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['setting']} | {r['fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead']:.1f} | "
            f"{100 * r['dense']:.1f} | {r['tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        f"L0 ≈ {args.k} by construction for TopK, BatchTopK, Matryoshka (k) and MP (k matching-pursuit steps), "
        "by the target-L0 loss for JumpReLU. BatchTopK and Matryoshka are evaluated per token with their "
        "inference threshold θ, the running mean of each training batch's smallest kept activation over "
        "the last 20 % of the run (rate max(0.01, 1/j) for the j-th batch). ReLU and Gated have no L0 "
        "knob: their L1 coefficient λ was calibrated by full-budget runs with a secant step on "
        "(log λ, log L0), L0 measured on a training-cache sample, stopping within "
        f"±{100 * args.l0_tolerance:.0f} % of {args.k} (at most {args.calibration_runs} runs):",
    ]
    for r in rows:
        if "calibration" in r:
            steps = ", ".join(f"λ {v:.3g} → L0 {l0:.1f}" for v, l0 in r["calibration"])
            lines.append(f"- {r['name']}: {steps}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--eval_tokens", type=int, default=20_000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dead_tokens", type=int, default=50_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calibration_runs", type=int, default=4, help="most full-budget runs per L1 calibration")
    p.add_argument(
        "--l0_tolerance", type=float, default=0.15, help="calibration stops at |L0 / k - 1| <= this"
    )
    p.add_argument("--only", nargs="*", default=None, help="subset of architectures to run")
    p.add_argument("--work", default="runs/bench-architectures")
    p.add_argument("--out", default="benchmarks/RESULTS_architectures.md")
    args = p.parse_args(argv)
    train_dir, test_dir = caches(args)
    rows = []
    for name, arch, overrides in ARCHITECTURES:
        norm = lookup(arch)[0].input_normalisation
        if args.only and name not in args.only:
            continue
        if any(isinstance(v, Calibrate) for v in overrides.values()):
            rows.append(calibrate(name, arch, overrides, norm, args, train_dir, test_dir))
        else:
            rows.append(run_one(name, arch, overrides, norm, args, train_dir, test_dir))
        print(rows[-1], flush=True)
    text = table(rows, args, args.device)
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# Architectures at comparable L0\n\nCommand: `python benchmarks/architectures.py "
            + " ".join(argv if argv is not None else __import__("sys").argv[1:])
            + "`\n\n"
            + text
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
