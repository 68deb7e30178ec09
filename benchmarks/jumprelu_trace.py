"""Why JumpReLU latents die: per-latent θ and pre-activation trajectories in one short run.

    python benchmarks/jumprelu_trace.py --train CACHE --test CACHE --hookpoint resid_post.6 --max_steps 48 \
        --point "base:l0_target=32;bandwidth=0.001" --point "wide:l0_target=32;bandwidth=0.03"

Every point (``name:field=value;...``, JumpReLU config fields) trains in one Trainer on the same batches. Per step
and latent it records θ, the batch's firings, the window hits ``|z − θ| < ε/2`` and the batch's 99th-percentile
pre-activation; at the end each latent is dead or alive on the held-out cache. Printed per point: the held-out
dead fraction; for dead and alive latents the medians of θ and of the batch z99 at steps 0, 5 and the last, the
window hits per step and the last training step with a firing; and the dead fraction by octile of the initial θ.
Measurements: benchmarks/RESULTS_defaults.md ("JumpReLU's dead latents and the bandwidth ε").
"""

from __future__ import annotations

import argparse
import itertools

import torch
import yaml

from sparsedict.cache import ActivationStore
from sparsedict.dictionaries import build
from sparsedict.dictionaries.jumprelu import JumpReLUConfig
from sparsedict.train import TrainConfig, Trainer


def record(model, rec: dict[str, list]) -> None:
    """Wrap ``model.forward`` so that every training batch appends its per-latent statistics to ``rec``."""
    forward = model.forward

    def wrapped(x, target=None):
        if model.training:
            with torch.no_grad():
                z = model.pre_acts(x)
                theta = model.theta(z.dtype)
                rec["theta"].append(theta.clone())
                rec["fires"].append((z > theta).sum(0))
                rec["hits"].append(((z - theta).abs() < model.bandwidth / 2).sum(0))
                rec["z99"].append(torch.quantile(z[:1024], 0.99, dim=0))
        return forward(x, target)

    model.forward = wrapped


def held_out_fires(model, path: str, hookpoint: str) -> torch.Tensor:
    """Per-latent firing counts ``[n]`` over the held-out cache (inputs scaled as in training)."""
    model.eval()
    c, fires = float(model.input_scale), None
    for x, _ in ActivationStore(path, hookpoint, batch_size=4096, loop=False, drop_last=False):
        with torch.no_grad():
            f = model.encode(x.float() * c).active()
        fires = f if fires is None else fires + f
    return fires


def summary(name: str, model, rec: dict[str, list], fires: torch.Tensor) -> None:
    theta, z99 = torch.stack(rec["theta"]), torch.stack(rec["z99"])
    hits, fired = torch.stack(rec["hits"]).float(), torch.stack(rec["fires"])
    steps = torch.arange(len(fired))[:, None].float()
    last = torch.where(fired > 0, steps, torch.tensor(-1.0)).max(0).values
    dead = fires == 0
    print(
        f"== {name}: ε {model.bandwidth:.4g}, held-out dead {100 * float(dead.float().mean()):.1f} % of {len(dead)}"
    )
    for label, sel in (("dead", dead), ("alive", ~dead)):
        if not bool(sel.any()):
            continue

        def med(t: torch.Tensor, sel: torch.Tensor = sel) -> str:
            return f"{float(t[sel].median()):.4f}"

        t5 = min(5, len(theta) - 1)
        print(f"   {label:5s} {int(sel.sum())}: θ {med(theta[0])} / {med(theta[t5])} / {med(theta[-1])}, "
              f"z99 {med(z99[0])} / {med(z99[t5])} / {med(z99[-1])} (steps 0 / {t5} / last), window hits per step "
              f"{float(hits[:, sel].mean()):.2f}, last training firing at step {float(last[sel].median()):.0f}")  # fmt: skip
    q = torch.quantile(theta[0], torch.linspace(0, 1, 9))
    octiles = [
        float(dead[(theta[0] >= lo) & (theta[0] <= hi)].float().mean()) for lo, hi in itertools.pairwise(q)
    ]
    print("   dead by octile of the initial θ:", " / ".join(f"{100 * o:.0f}" for o in octiles), "%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--hookpoint", default="resid_post.6")
    p.add_argument("--max_steps", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--point", action="append", required=True, help="name:field=value;field=value")
    p.add_argument("--work", default="runs/jumprelu_trace")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = ActivationStore(args.train, args.hookpoint, batch_size=args.batch_size, seed=0)
    base = TrainConfig(batch_size=args.batch_size, max_steps=args.max_steps, seed=0, log_every=10**9,
                       init_rows=min(32768, store.n_rows), out_dir=args.work)  # fmt: skip
    torch.manual_seed(0)
    models, recs = {}, {}
    for spec in args.point:
        name, _, fields = spec.partition(":")
        kw = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in fields.split(";") if f)}
        cfg = JumpReLUConfig(hookpoint=args.hookpoint, expansion=args.expansion, name=name, **kw)
        models[name] = build(cfg.resolved(store.d_in))
        recs[name] = {k: [] for k in ("theta", "fires", "hits", "z99")}
        record(models[name], recs[name])
    Trainer(models, {(args.hookpoint, ""): store}, base).fit(resume=False)
    for name, model in models.items():
        summary(name, model, recs[name], held_out_fires(model, args.test, args.hookpoint))


if __name__ == "__main__":
    main()
