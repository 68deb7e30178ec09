"""Where a dictionary's reconstruction error sits: rows of large norm against the rest, during and after training.

    python benchmarks/batchtopk_probe.py --train CACHE --test CACHE --hookpoint resid_post.6 \
        --point "topk:k=64" --point "batchtopk:k=64" [--point "batchtopk:k=64;train.lr=0.0077"] \
        [--expansion 4] [--epochs 1] [--cut 250] [--log_steps 0,5,20,47] [--init_only] [--unseen CACHE]

Points are ``benchmarks/presets.py`` points (one Trainer, the same batches, batch 1024). A row is an
"outlier" when its norm after subtracting the per-dimension median exceeds ``--cut``. On the logged steps
(after that step's update) each point's training batch is re-encoded in training mode and the line gives
the batch FVU, the mean L0 and error share of the outlier rows, and for the other rows the mean L0, the
fraction with no latent, the 10th / 90th percentile L0 and their FVU. After training the same split on
the held-out cache (first 20,000 rows). ``--init_only``: the FVU of each point's initial weights on one
training batch, no training. ``--unseen``: also the L0 on a 20,000-row sample of that cache (e.g. a larger
training cache, mostly rows the run did not see) beside a sample of the training cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from presets import parse_point, point_name

from sparsedict.cache import ActivationStore
from sparsedict.dictionaries import build, lookup
from sparsedict.train import TrainConfig, Trainer
from sparsedict.train.optim import DictionaryOptimizer


def split_line(x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor, cut: float, var: torch.Tensor) -> str:
    err = (x_hat - x).pow(2).sum(-1)
    big = (x - x.median(0).values).norm(dim=1) > cut
    rest = ~big
    return (f"FVU {err.sum() / var.sum():.4f} | {int(big.sum())} outlier rows: L0 {l0[big].mean():.0f}, "
            f"error share {err[big].sum() / err.sum():.2f} | other rows: L0 {l0[rest].mean():.1f}, "
            f"none {(l0[rest] == 0).float().mean():.3f}, p10/p90 {l0[rest].quantile(0.1):.0f}/"
            f"{l0[rest].quantile(0.9):.0f}, FVU {err[rest].sum() / var[rest].sum():.4f}")  # fmt: skip


@torch.no_grad()
def encode_all(model, x: torch.Tensor, training: bool):
    """``(x_hat, l0)`` of ``x`` in raw units, in chunks of 4096 rows."""
    model.train(training)
    c = float(model.input_scale)
    outs, l0s = [], []
    for i in range(0, len(x), 4096):
        xs = x[i : i + 4096] * c
        code = model.encode(xs)
        outs.append(model.decode(code, xs) / c)
        l0s.append(code.l0().float())
    return torch.cat(outs), torch.cat(l0s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--hookpoint", required=True)
    p.add_argument("--point", action="append", required=True)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--cut", type=float, default=250.0)
    p.add_argument("--log_steps", default="0,5,10,20,30,47")
    p.add_argument("--init_only", action="store_true")
    p.add_argument("--unseen", default="")
    p.add_argument("--work", default="/tmp/sparsedict-probe")
    a = p.parse_args()
    torch.set_num_threads(1)
    store = ActivationStore(a.train, a.hookpoint, batch_size=1024, seed=0)
    base = TrainConfig(batch_size=1024, epochs=a.epochs, seed=0, log_every=10**9, out_dir=a.work,
                       init_rows=min(32768, store.n_rows))  # fmt: skip
    torch.manual_seed(0)
    models, train_fields = {}, {}
    for text in a.point:
        arch, fields, train = parse_point(text)
        name = point_name(arch, fields, train)
        cfg = lookup(arch)[1](hookpoint=a.hookpoint, expansion=a.expansion, name=name, **fields)
        models[name], train_fields[name] = build(cfg.resolved(store.d_in, store.d_out)), train
    trainer = Trainer(models, {(a.hookpoint, ""): store}, base)
    for m in trainer.members:
        if train_fields[m.name]:
            m.opt = DictionaryOptimizer(m.model, dataclasses.replace(base, **train_fields[m.name]),
                                        trainer.total_steps)  # fmt: skip
    if a.init_only:
        trainer.initialise()
        x = store.sample(1024, seed=7)[0].float()
        for m in trainer.members:
            x_hat, l0 = encode_all(m.model, x, training=True)
            print(f"init {m.name:40s} {split_line(x, x_hat, l0, a.cut, (x - x.mean(0)).pow(2).sum(-1))}")
        return
    logged = {int(s) for s in a.log_steps.split(",")}
    step = trainer.train_step

    def probed(batches):
        x, s = batches[(a.hookpoint, "")][0].float(), trainer.step
        out = step(batches)
        if s in logged:
            for m in trainer.members:
                x_hat, l0 = encode_all(m.model, x, training=True)
                print(f"step {s:3d} {m.name:40s} {split_line(x, x_hat, l0, a.cut, (x - x.mean(0)).pow(2).sum(-1))}",
                      flush=True)  # fmt: skip
        return out

    trainer.train_step = probed
    trainer.fit(resume=False)
    test = ActivationStore(a.test, a.hookpoint, batch_size=4096, loop=False, drop_last=False)
    x = torch.cat([b[0].float() for b in test])[:20000]
    var = (x - x.mean(0)).pow(2).sum(-1)
    for m in trainer.members:
        x_hat, l0 = encode_all(m.model, x, training=False)
        print(f"held-out {m.name:40s} L0 {l0.mean():.1f} {split_line(x, x_hat, l0, a.cut, var)}", flush=True)
        if a.unseen:
            l0s = [encode_all(m.model, ActivationStore(c, a.hookpoint, batch_size=4096, seed=5)
                              .sample(20000, seed=5)[0].float(), training=False)[1].mean() for c in (a.train, a.unseen)]  # fmt: skip
            print(f"          L0 on a training-cache sample {l0s[0]:.1f}, on {a.unseen}: {l0s[1]:.1f}")


if __name__ == "__main__":
    main()
