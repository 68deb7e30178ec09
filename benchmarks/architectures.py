"""Every SAE architecture at comparable L0 on real SmolLM2-135M residual activations: one command.

    python benchmarks/architectures.py [--tokens 100000] [--eval_tokens 20000] [--epochs 2] \
        [--expansion 8] [--k 32] [--device cpu] [--out benchmarks/RESULTS_architectures.md]

Caches ``resid_post.6`` of the embedded SmolLM2-135M on the embedded corpus (train split, and the
held-out test split), trains each architecture alone (same width, same tokens, same batches, same
optimiser settings) and prints a markdown table of held-out FVU, L0, dead %, dense % and training
tokens/s. L0 is matched by construction for the k-based architectures (k = 32) and JumpReLU
(target-L0 loss at 32); ReLU and Gated have no L0 knob, so their L1 coefficients are fixed guesses
and their L0 is reported as measured. Inputs are normalised as each architecture's defaults assume
(sqrt_d for the L1 methods, unit mean squared norm for JumpReLU, none for the k-based ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from sparsedict.cache import ActivationStore, CacheConfig, cache_activations
from sparsedict.dictionaries import build, lookup
from sparsedict.eval.metrics import reconstruction_stats
from sparsedict.train import TrainConfig, Trainer

HOOK = "resid_post.6"

# (row name, architecture, config overrides, input normalisation)
ARCHITECTURES = [
    ("topk", "topk", {}, "none"),
    ("batchtopk", "batchtopk", {}, "none"),
    ("matryoshka", "matryoshka", {}, "none"),
    ("jumprelu", "jumprelu", {"l0_target": "K", "l0_coefficient": 1.0, "threshold_init": 0.01}, "unit_msn"),
    ("relu", "relu", {"l1_coefficient": 5.0}, "sqrt_d"),
    ("gated", "gated", {"l1_coefficient": 1.0}, "sqrt_d"),
    ("mp", "mp", {"steps": "K"}, "none"),
]


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


def run_one(name: str, arch: str, overrides: dict, norm: str, args, train_dir: Path, test_dir: Path) -> dict:
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
        out_dir=f"{args.work}/train-{name}",
        log_every=10**9,
        init_rows=8192,
    )
    trainer = Trainer({name: model}, {(HOOK, ""): source}, tc)
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    seconds = time.perf_counter() - t0
    path = trainer.save()[name]
    from sparsedict.hub import from_pretrained

    loaded = from_pretrained(path, device=args.device)  # evaluate what was saved (scale folded)
    store = ActivationStore(test_dir, HOOK, batch_size=4096, loop=False, drop_last=False)
    stats = reconstruction_stats(loaded, store, device=args.device)
    return {
        "name": name,
        "fvu": stats.fvu,
        "l0": stats.l0,
        "dead": stats.dead_fraction,
        "dense": stats.dense_fraction,
        "tokens_per_s": trainer.tokens / seconds,
        "eval_tokens": stats.tokens,
        "train_tokens": trainer.tokens,
    }


def table(rows: list[dict], args, device: str) -> str:
    lines = [
        f"SmolLM2-135M `{HOOK}`, width {args.expansion}×576, {rows[0]['train_tokens']} training tokens "
        f"({args.epochs} epochs of {args.tokens}), batch {args.batch_size}, Adam lr {args.lr}, held-out "
        f"{rows[0]['eval_tokens']} tokens (test split), device {device}.",
        "",
        "| architecture | FVU | L0 | dead % | dense % | train tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead']:.1f} | "
            f"{100 * r['dense']:.1f} | {r['tokens_per_s']:.0f} |"
        )
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
    p.add_argument("--only", nargs="*", default=None, help="subset of architectures to run")
    p.add_argument("--work", default="runs/bench-architectures")
    p.add_argument("--out", default="benchmarks/RESULTS_architectures.md")
    args = p.parse_args(argv)
    train_dir, test_dir = caches(args)
    rows = []
    for name, arch, overrides, norm in ARCHITECTURES:
        if args.only and name not in args.only:
            continue
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
