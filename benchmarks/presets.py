"""Train many dictionaries in one data pass, each with its own optimiser settings, and score them held-out.

    python benchmarks/presets.py --train CACHE --test CACHE --hookpoint resid_post.6 [--target T] \
        --epochs 2 --batch_size 1024 [--max_steps N] [--expansion 8] \
        --point "topk:k=32" --point "topk:k=32;train.lr=0.003" --point "relu:l0_target=32" ... \
        [--json out.jsonl] [--label NAME] [--png pareto.png]
    python benchmarks/presets.py --replot out.jsonl [--label NAME] --png pareto.png

A point is ``arch:field=value;field=value;train.field=value``: dictionary config fields, and
``train.*`` TrainConfig fields that may differ per dictionary (``lr``, ``betas``, ``lr_dec_scale``,
``warmup_steps``, ``decay_fraction``, ``optimizer``, ``normalise_inputs``). Everything else is shared:
every point reads the same batches (one :class:`~sparsedict.train.Trainer`), so differences between
points are the settings', not the data order's. Unset fields take the package defaults, which is how
the defaults are measured. Each point is scored on the held-out cache (FVU, L0, dead and dense
fractions over its tokens) and on a sample of the training cache (L0, to tell overfitting from
steering error); a dictionary with a single inference threshold θ (BatchTopK, Matryoshka) is also scored
under the running-mean θ its final recalibration replaced and under batch selection (θ unset); the LR, betas and warmup the optimiser actually used are recorded. One JSON line per
point goes to ``--json`` (appended), and a table is printed; ``--png`` draws the held-out L0-FVU plot
(one curve per architecture), ``--replot`` draws it from ``--json`` lines instead of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml

from sparsedict.cache import ActivationStore
from sparsedict.dictionaries import build, lookup
from sparsedict.eval.heldout import reconstruction_stats
from sparsedict.train import TrainConfig, Trainer
from sparsedict.train.optim import DictionaryOptimizer

PER_POINT = ("lr", "betas", "lr_dec_scale", "warmup_steps", "decay_fraction", "optimizer", "normalise_inputs")
"""TrainConfig fields a point may set for itself."""


def parse_point(text: str) -> tuple[str, dict, dict]:
    """``"relu:l0_target=32;train.lr=1e-3"`` -> ``("relu", {"l0_target": 32}, {"lr": 1e-3})``."""
    arch, _, rest = text.partition(":")
    fields, train = {}, {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, _, value = item.partition("=")
        value = yaml.safe_load(value)
        if key.startswith("train."):
            key = key[len("train.") :]
            if key not in PER_POINT:
                raise SystemExit(
                    f"{text}: train.{key} is shared by all points; per point: {', '.join(PER_POINT)}"
                )
            train[key] = tuple(value) if isinstance(value, list) else value
        else:
            fields[key] = tuple(value) if isinstance(value, list) else value
    return arch.strip(), fields, train


def point_name(arch: str, fields: dict, train: dict) -> str:
    parts = [arch] + [f"{k}{v}" for k, v in fields.items()] + [f"{k}{v}" for k, v in train.items()]
    return "-".join(str(p).replace(" ", "") for p in parts)


def keep_running(model, name: str, into: dict):
    """``model.calibrate_threshold`` that first records θ (the running mean it replaces) in ``into[name]``."""
    calibrate = model.calibrate_threshold

    def wrapped(*a, **kw):
        into[name] = float(model.threshold)
        return calibrate(*a, **kw)

    return wrapped


def trace_steps(m, trainer, into: list):
    """``m.model.after_step`` that also appends ``(step, lr, coefficient, batch L0)`` to ``into``."""
    after_step = m.model.after_step

    def wrapped(out):
        coefficient = m.model.l0_controller.coefficient  # the one this step trained with
        after_step(out)
        l0 = float((out.code.values.detach() != 0).sum(-1).float().mean())
        into.append((trainer.step, m.opt.opt.param_groups[0]["lr"], coefficient, l0))

    return wrapped


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    target = args.target or None
    store = ActivationStore(
        args.train, args.hookpoint, target=target, batch_size=args.batch_size, seed=args.seed
    )
    base = TrainConfig(
        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed,
        dead_tokens=args.dead_tokens, log_every=args.log_every, init_rows=min(32768, store.n_rows),
        out_dir=args.work, autocast=args.autocast,
    )  # fmt: skip
    points = [parse_point(p) for p in args.point]
    torch.manual_seed(args.seed)
    models, settings = {}, {}
    for arch, fields, train in points:
        name = point_name(arch, fields, train)
        _, cfg_cls = lookup(arch)
        cfg = cfg_cls(
            hookpoint=args.hookpoint, target=args.target, expansion=args.expansion, name=name, **fields
        )
        models[name] = build(cfg.resolved(store.d_in, store.d_out))
        settings[name] = (arch, fields, train)
    key = (args.hookpoint, args.target if target else "")
    trainer = Trainer(models, {key: store}, base)
    for m in trainer.members:
        train = settings[m.name][2]
        if train:
            cfg = dataclasses.replace(base, **train)
            if m.opt is not None:
                m.opt = DictionaryOptimizer(m.model, cfg, trainer.total_steps)
            if "normalise_inputs" in train:
                norm = train["normalise_inputs"]
                m.normalisation = type(m.model).input_normalisation if norm == "auto" else norm
    traces = {}  # steered points: (step, lr, coefficient, batch L0) after every optimiser step
    if args.trace:
        for m in trainer.members:
            if getattr(m.model, "l0_controller", None) is not None:
                m.model.after_step = trace_steps(m, trainer, traces.setdefault(m.name, []))
    running = {}  # BatchTopK-like: θ's running mean, before the final recalibration replaces it
    for m in trainer.members:
        if hasattr(m.model, "calibrate_threshold"):
            m.model.calibrate_threshold = keep_running(m.model, m.name, running)
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    seconds = time.perf_counter() - t0

    def test_store() -> ActivationStore:
        # a fresh store per pass: a loop=False store iterated again after its epoch ended yields nothing
        return ActivationStore(
            args.test, args.hookpoint, target=target, batch_size=4096, loop=False, drop_last=False
        )

    def train_sample() -> ActivationStore:
        return ActivationStore(args.train, args.hookpoint, target=target, batch_size=4096, seed=args.seed + 1,
                               loop=False, drop_last=False)  # fmt: skip

    rows = []
    for m in trainer.members:
        arch, fields, train = settings[m.name]
        held = reconstruction_stats(m.model, test_store(), max_rows=args.eval_tokens)
        train_l0 = reconstruction_stats(m.model, train_sample(), max_rows=args.eval_tokens).l0
        row = {
            "label": args.label, "name": m.name, "architecture": arch, "fields": fields, "train": train,
            "hookpoint": args.hookpoint, "target": args.target, "n_latents": m.model.n_latents,
            "batch_size": args.batch_size, "steps": trainer.step, "tokens": trainer.tokens,
            "train_rows": store.n_rows, "normalisation": m.normalisation,
            "fvu": held.fvu, "l0": held.l0, "dead": held.dead_fraction, "dense": held.dense_fraction,
            "train_l0": train_l0, "eval_tokens": held.tokens, "seconds_all_points": seconds,
        }  # fmt: skip
        if m.opt is not None:
            row.update(lr=m.opt.base_lr, warmup=m.opt.warmup_steps,
                       betas=list(m.opt.opt.param_groups[0].get("betas", ())),
                       lr_scales=sorted({g.get("lr_scale", 1.0) for g in m.opt.opt.param_groups}),
                       lr_factors={g["name"]: g["lr_factor"] for g in m.opt.opt.param_groups
                                   if g.get("lr_factor", 1.0) != 1.0})  # fmt: skip
        theta = dict(m.model.named_buffers()).get("threshold")
        if theta is not None and theta.numel() == 1:
            row["theta"] = float(theta)
            # the same weights under the running-mean θ, and under batch top-k (θ unset) per eval batch
            for key, value in (("running", running.get(m.name)), ("batch_selection", -1.0)):
                if value is None:
                    continue
                theta.fill_(value)
                held = reconstruction_stats(m.model, test_store(), max_rows=args.eval_tokens)
                row.update({f"theta_{key}": value, f"fvu_{key}": held.fvu, f"l0_{key}": held.l0})
                if key == "running":
                    row["train_l0_running"] = reconstruction_stats(
                        m.model, train_sample(), max_rows=args.eval_tokens
                    ).l0
            theta.fill_(row["theta"])
        for attr in ("l1_current", "l0_current"):
            if hasattr(m.model, attr):
                row[attr] = float(getattr(m.model, attr))
        if m.name in traces:
            row["trace"] = traces[m.name]
        rows.append(row)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    print(f"| point | FVU | L0 | train L0 | dead % | lr | steps | ({args.label}, {seconds:.0f} s)")
    for r in rows:
        print(f"| {r['name']} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['train_l0']:.1f} | {100 * r['dead']:.1f} | "
              f"{r.get('lr', 0):.3g} | {r['steps']} |", flush=True)  # fmt: skip
        for key in ("running", "batch_selection"):
            if f"fvu_{key}" in r:
                print(f"|   {key}: θ {r[f'theta_{key}']:.4g} | {r[f'fvu_{key}']:.4f} | {r[f'l0_{key}']:.1f} | "
                      f"{r.get(f'train_l0_{key}', float('nan')):.1f} |")  # fmt: skip
    for name, trace in traces.items():
        every = max(1, len(trace) // 24)
        print(f"trace {name}: step lr coefficient batch-L0")
        for step, lr, coefficient, l0 in trace[::every] + trace[-1:]:
            print(f"  {step:5d} {lr:.3g} {coefficient:.4g} {l0:.1f}")
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    """The held-out L0-FVU plot of ``rows`` (one curve per architecture, each point tagged with its fields)."""
    from sparsedict.eval.plot import plot_pareto

    points = [{**r, "params": r["fields"]} for r in rows]
    print(f"wrote {plot_pareto(points, path, title=title)}")


def title_of(rows: list[dict]) -> str:
    r = rows[0]
    return (f"{r['label'] or r['hookpoint']}: n={r['n_latents']}, {r['steps']} steps of {r['batch_size']}, "
            "default settings")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="training activation cache")
    p.add_argument("--test", help="held-out activation cache")
    p.add_argument("--hookpoint")
    p.add_argument("--target", default="", help="transcoder target hookpoint (empty: SAEs)")
    p.add_argument("--point", action="append", help="arch:field=v;train.field=v (repeatable)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max_steps", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--dead_tokens", type=int, default=TrainConfig.dead_tokens)
    p.add_argument("--eval_tokens", type=int, default=20_000)
    p.add_argument("--autocast", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--trace", action="store_true", help="record and print λ and the batch L0 per step")
    p.add_argument("--label", default="")
    p.add_argument("--work", default="/tmp/sparsedict-presets")
    p.add_argument("--json", default="")
    p.add_argument("--png", default="", help="write the held-out L0-FVU plot here")
    p.add_argument("--replot", default="", help="plot these JSON lines (those of --label if given) and exit")
    args = p.parse_args(argv)
    if args.replot:
        rows = [json.loads(line) for line in Path(args.replot).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if not args.label or r["label"] == args.label]
        if not rows or not args.png:
            raise SystemExit(f"--replot needs --png and lines of label {args.label!r} in {args.replot}")
        plot(rows, args.png, title_of(rows))
        return 0
    missing = [f"--{k}" for k in ("train", "test", "hookpoint", "point") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} (or give --replot)")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = run(args)
    if args.png:
        plot(rows, args.png, title_of(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
