"""Cross-layer transcoder vs a per-layer transcoder set on real SmolLM2-135M, at matched L0 per layer: one command.

    python benchmarks/clt.py [--layers 3 4 5 6] [--tokens 400000] [--eval_tokens 20000] [--splice_tokens 4096] \
        [--n 2304] [--k 16] [--epochs 1] [--cache DIR] [--eval_cache DIR] [--work runs/bench-clt] [--reuse]

Caches ``mlp_in.l`` and ``mlp_out.l`` of every layer of the range (train split, and the held-out test split;
``--cache``/``--eval_cache`` reuse existing caches of those hookpoints), then trains both in one pass of the
Trainer on the same rows (one store serving ``[B, L, 576]`` batches): a TopK CLT (features of layer l read
``mlp_in.l`` and write to every ``mlp_out.l'``, l' >= l) and a set of TopK transcoders ``mlp_in.l -> mlp_out.l``,
each with n features and k active per layer and token (L0 matched exactly). Prints a markdown table: held-out
FVU per layer, active features per token over all layers, and the replacement model (every MLP of the range
replaced at once) CE recovered and KL beside each layer spliced alone, all on the test split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sparsedict.cache import ActivationStore, CacheConfig, cache_activations
from sparsedict.dictionaries import CLTConfig, TranscoderSet, build, from_pretrained
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.eval.evaluate import cache_contexts
from sparsedict.eval.heldout import reconstruction_stats
from sparsedict.eval.splice import evaluate_replacement
from sparsedict.lm import load_model
from sparsedict.train import TrainConfig, Trainer


def caches(args) -> tuple[Path, Path]:
    hps = [f"mlp_in.{i}" for i in args.layers] + [f"mlp_out.{i}" for i in args.layers]
    common = dict(model="smollm2-135m", dataset="embedded", hookpoints=hps, context_length=128,
                  exclude_first_n=2, dtype="bfloat16")  # fmt: skip
    train = (
        Path(args.cache)
        if args.cache
        else cache_activations(
            CacheConfig(split="train", max_tokens=args.tokens, out_dir=f"{args.work}/cache-train", **common)
        )
    )
    test = (
        Path(args.eval_cache)
        if args.eval_cache
        else cache_activations(
            CacheConfig(
                split="test", max_tokens=args.eval_tokens, out_dir=f"{args.work}/cache-test", **common
            )
        )
    )
    return train, test


def train_both(args, src: ActivationStore) -> tuple[dict, float]:
    """Train the CLT and the PLT set in one pass of the Trainer on the same rows; (models, seconds)."""
    torch.manual_seed(0)
    clt = build(
        CLTConfig(layers=args.layers, activation="topk", n_latents=args.n, k=args.k).resolved(src.d_in)
    )
    tset = TranscoderSet(
        TopKConfig(
            layers=args.layers, hookpoint="mlp_in", target="mlp_out", n_latents=args.n, k=args.k
        ).resolved(src.d_in)
    )
    tc = TrainConfig(batch_size=args.batch, epochs=args.epochs, lr=args.lr, optimizer="adam", warmup_steps=50,
                     normalise_inputs="auto", dead_tokens=200_000, log_every=50, out_dir=f"{args.work}/train",
                     init_rows=16384)  # fmt: skip
    t0 = time.perf_counter()
    Trainer({"clt": clt, "plt": tset}, {clt.cfg.source_key: src}, tc).fit(resume=False)
    return {"CLT": clt.eval(), "PLT set": tset.eval()}, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--eval_tokens", type=int, default=20_000)
    ap.add_argument("--splice_tokens", type=int, default=4096)
    ap.add_argument("--n", type=int, default=2304, help="features per layer")
    ap.add_argument("--k", type=int, default=16, help="active features per layer and token")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--cache", default="")
    ap.add_argument("--eval_cache", default="")
    ap.add_argument("--work", default="runs/bench-clt")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--reuse", action="store_true", help="evaluate the CLT and PLT set saved by an earlier run"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = caches(args)
    ins, outs = [f"mlp_in.{i}" for i in args.layers], [f"mlp_out.{i}" for i in args.layers]
    src = ActivationStore(train, ins, target=outs, batch_size=args.batch, seed=0)
    saved = {"CLT": Path(args.work) / "clt", "PLT set": Path(args.work) / "plt"}
    if args.reuse:
        models, train_s = {name: from_pretrained(path).eval() for name, path in saved.items()}, float("nan")
    else:
        models, train_s = train_both(args, src)
        for name, m in models.items():
            m.save_pretrained(saved[name])
    recon = {}
    for name, m in models.items():
        store = ActivationStore(test, ins, target=outs, batch_size=4096, drop_last=False, loop=False)
        recon[name] = reconstruction_stats(m, store, max_rows=args.eval_tokens).summary()
    lm, _ = load_model("smollm2-135m")
    ctx = cache_contexts(test, args.splice_tokens)
    t1 = time.perf_counter()
    splice = evaluate_replacement(lm, models, ctx, batch_size=4)
    splice_s = time.perf_counter() - t1
    L = len(args.layers)
    print(f"\nSmolLM2-135M, layers {args.layers}, {src.n_rows} training rows x {args.epochs} epoch(s), batch "
          f"{args.batch}, TopK n={args.n} k={args.k} per layer (CLT decoders: {L * (L + 1) // 2} blocks); held-out "
          f"{test.name}: reconstruction on {min(args.eval_tokens, store.n_rows)} rows, splicing on {len(ctx)} contexts "
          f"({int(ctx.keep.sum())} kept tokens). train {train_s:.0f} s (both), splice {splice_s:.0f} s\n")  # fmt: skip
    head = ["model", *(f"FVU L{i}" for i in args.layers), "L0 (all layers)", "CE rec (replacement)",
            "KL (replacement)", *(f"CE rec L{i} alone" for i in args.layers)]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in models:
        r, s = recon[name], splice[name]
        rep = s["replacement"].summary()
        cells = [name, *(f"{r[f'layer{i}/fvu']:.3f}" for i in args.layers), f"{r['l0']:.1f}",
                 f"{rep['ce_recovered']:.3f}", f"{rep['kl']:.3f}",
                 *(f"{s[f'layer{i}'].summary()['ce_recovered']:.3f}" for i in args.layers)]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
