"""Dead latents and held-out FVU of TopK transcoders / skip transcoders at the SmolLM2 recipes' settings.

Trains ``mlp_in.L -> mlp_out.L`` (width 8 x 576, k 32) on the first ``--tokens`` rows of a cache holding both
hookpoints, with the settings of ``recipes/smollm2-135m/{transcoder,skip_transcoder}.yaml`` (batch 1024, 4
epochs, lr 1e-3, warmup 20, decay over the last 20 %, grad clip 1, no input normalisation, dead window 100k
tokens), and evaluates on ``--test-tokens`` held-out rows. ``--lr 0 --warmup -1`` gives the package defaults
instead; ``--encoder-at-input-scale`` leaves the encoder as it was built (random, on the input's scale), the
initialisation before ``Dictionary.match_encoder_scale``. Prints one JSON line per run.

    python benchmarks/transcoders.py --train-cache C --test-cache T --layer 6 --skip
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from sparsedict.cache import ActivationStore
from sparsedict.dictionaries import build, lookup
from sparsedict.dictionaries.base import Dictionary
from sparsedict.eval.heldout import reconstruction_stats
from sparsedict.train import TensorSource, TrainConfig, Trainer


def first_rows(path: str, hookpoint: str, target: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` rows of ``hookpoint`` and ``target`` (fp32), permuted within them by the store (seed 0)."""
    store = ActivationStore(path, hookpoint, target=target, batch_size=4096, drop_last=False, loop=False,
                            shuffle="window", shuffle_buffer_rows=n)  # fmt: skip
    xs, ys, got = [], [], 0
    for x, y in store:
        xs.append(x)
        ys.append(y)
        got += len(x)
        if got >= n:
            break
    return torch.cat(xs)[:n].float(), torch.cat(ys)[:n].float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-cache", required=True)
    p.add_argument("--test-cache", required=True)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--skip", action="store_true", help="a skip transcoder")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--test-tokens", type=int, default=20_000)
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="0: the package default")
    p.add_argument("--warmup", type=int, default=20, help="-1: the package default")
    p.add_argument("--encoder-at-input-scale", action="store_true", help="skip match_encoder_scale (before)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.encoder_at_input_scale:
        Dictionary.match_encoder_scale = lambda self, x, y: None
    hp, tg = f"mlp_in.{args.layer}", f"mlp_out.{args.layer}"
    x, y = first_rows(args.train_cache, hp, tg, args.tokens)
    xt, yt = first_rows(args.test_cache, hp, tg, args.test_tokens)
    _, cfg_cls = lookup("topk")
    torch.manual_seed(0)
    model = build(
        cfg_cls(hookpoint=hp, target=tg, expansion=8, k=32, skip=args.skip).resolved(x.shape[1], y.shape[1])
    )
    tc = TrainConfig(batch_size=1024, epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup, decay_fraction=0.2,
                     grad_clip=1.0, normalise_inputs="none", dead_tokens=100_000, log_every=10**9,
                     out_dir=tempfile.mkdtemp(prefix="sd-transcoders-"))  # fmt: skip
    trainer = Trainer({"m": model}, {model.cfg.source_key: TensorSource(x, y, batch_size=1024)}, tc)
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    wall = time.perf_counter() - t0
    held = reconstruction_stats(
        model, [(xt[i : i + 4096], yt[i : i + 4096]) for i in range(0, len(xt), 4096)]
    )
    record = {
        "pair": f"{hp}->{tg}",
        "skip": args.skip,
        "encoder": "input scale (before)" if args.encoder_at_input_scale else "target scale",
        "optimizer": trainer.members[0].opt.describe(),
        "steps": trainer.step,
        "train_dead_pct": 100 * trainer.members[0].dead.dead_fraction(),
        "heldout_fvu": held.fvu,
        "heldout_l0": held.l0,
        "heldout_dead_pct": 100 * held.dead_fraction,
        "heldout_tokens": held.tokens,
        "input_rms": float(x.pow(2).sum(-1).mean().sqrt()),
        "target_rms": float(y.pow(2).sum(-1).mean().sqrt()),
        "train_wall_s": wall,
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
