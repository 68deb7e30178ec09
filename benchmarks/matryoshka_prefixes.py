"""What a Matryoshka SAE's prefix weights cost: held-out FVU of the full code and of every prefix, beside TopK.

    python benchmarks/matryoshka_prefixes.py --train CACHE --test CACHE [--hookpoint resid_post.6] [--k 32] \
        [--expansion 4] [--steps 481] [--batch_size 1024] [--threads 1] \
        [--weights equal "0.1,0.1,0.1,0.1,0.1,0.5" "0.05,0.05,0.05,0.05,0.05,0.75" "g:0.125,0.125,0.25,0.5"]

Trains TopK and one Matryoshka per weight vector (``g:`` + fractions: those groups at equal weights) in one
Trainer (the same batches, package defaults otherwise), then encodes the held-out rows in eval mode (Matryoshka's
inference threshold θ) and reports the FVU of the code restricted to the latents below each prefix end ``m_g`` (the
reconstruction a user of that prefix gets), and L0.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from sparsedict.cache import ActivationStore
from sparsedict.dictionaries import build, lookup
from sparsedict.dictionaries.matryoshka import resolve_groups
from sparsedict.metrics import fvu
from sparsedict.train import TrainConfig, Trainer


def prefix_fvus(model, x: torch.Tensor, ends: list[int]) -> dict[str, float]:
    """L0 and the FVU of ``x`` reconstructed from the code's latents below each of ``ends``."""
    x = x * float(model.input_scale)
    dense = model.encode(x).to_dense()
    row = {"l0": float((dense != 0).sum(1).float().mean())}
    for end in ends:
        kept = dense.clone()
        kept[:, end:] = 0
        row[f"fvu@{end}"] = fvu(x, kept @ model.W_dec + model.b_dec)
    return row


def variant_fields(spec: str) -> dict:
    """Matryoshka config fields of one ``--weights`` entry: ``equal``, ``g:`` + group fractions, or weights."""
    if spec == "equal":
        return {}
    if spec.startswith("g:"):
        return {"group_fractions": tuple(float(v) for v in spec[2:].split(","))}
    return {"group_weights": tuple(float(v) for v in spec.split(","))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--hookpoint", default="resid_post.6")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--steps", type=int, default=481)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--eval_tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/sparsedict-matryoshka-prefixes")
    ap.add_argument(
        "--weights", nargs="+", default=["equal", "0.1,0.1,0.1,0.1,0.1,0.5", "0.05,0.05,0.05,0.05,0.05,0.75"]
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = ActivationStore(args.train, args.hookpoint, batch_size=args.batch_size, seed=0)
    points = {"topk": ("topk", {}), **{w: ("matryoshka", variant_fields(w)) for w in args.weights}}
    models = {}
    for name, (arch, fields) in points.items():
        torch.manual_seed(0)
        cfg = lookup(arch)[1](hookpoint=args.hookpoint, expansion=args.expansion, k=args.k, **fields)
        models[name] = build(cfg.resolved(src.d_in))
    tc = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, log_every=10**9, out_dir=args.work,
                     threads=args.threads)  # fmt: skip
    Trainer(models, {(args.hookpoint, ""): src}, tc).fit(resume=False)
    test = ActivationStore(args.test, args.hookpoint).rows()[: args.eval_tokens]
    out = {}
    with torch.no_grad():
        for name, m in models.items():
            m.eval()
            ends = [m.n_latents] if name == "topk" else resolve_groups(m.cfg)
            out[name] = prefix_fvus(m, test, ends)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
