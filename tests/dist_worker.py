"""A tiny training job for the distributed / resume / failure tests (run as a script, alone or under torchrun).

``python tests/dist_worker.py '<json options>'`` trains a TopK dictionary on a planted-dictionary
TensorSource with the real :class:`Trainer`, then saves it under ``out_dir/topk``. Under
``torchrun --nproc-per-node R`` it trains data-parallel (each rank reads its slice of every global
batch) or, with ``shard_latents``, latent-parallel. Options (JSON keys): ``out_dir``, ``steps``,
``batch`` (global), ``n``, ``k``, ``lr``, ``clt`` (an activation: train a cross-layer
transcoder over two layers instead, still saved as ``topk``), ``checkpoint_every``, ``shard_latents``, ``timeout_min``,
``step_sleep`` (seconds slept per step, to make kill timing easy), ``kill_rank``/``kill_step`` (that rank
SIGKILLs itself before reading that step's batch), ``hang_rank``/``hang_step`` (that rank stops
forever: only a collective timeout can end the job), ``dead_tokens``. Rank 0 writes ``done.json`` (world
size, last metrics, and the gloo threads alive before and after the process group is destroyed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch


def planted(n_rows: int = 4096, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows that are sparse combinations of 48 unit atoms plus noise and an offset: ``[n_rows, d]``."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(48, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(48, generator=g)[:3] for _ in range(n_rows)])
    vals = torch.rand(n_rows, 3, generator=g) * 2 + 0.5
    x = (vals[:, :, None] * atoms[idx]).sum(1)
    return x + 0.01 * torch.randn(n_rows, d, generator=g) + 0.3


def main(opts: dict) -> None:
    from sparsedict import distributed
    from sparsedict.dictionaries import build
    from sparsedict.dictionaries.topk import TopKConfig
    from sparsedict.train import TensorSource, TrainConfig, Trainer
    from sparsedict.train.data import TensorSource as _TS

    torch.set_num_threads(1)
    rank, world, _ = distributed.init("cpu", opts.get("timeout_min", 1.0))
    shard = bool(opts.get("shard_latents", False))
    dp = 1 if shard else world
    batch = opts.get("batch", 128)

    class Source(_TS):
        """TensorSource with fault/slowness injection before each batch."""

        def __iter__(self):
            for b in super().__iter__():
                step = self.state_step - 1  # the inner iterator has already advanced past this batch
                if opts.get("kill_rank") == rank and step == opts.get("kill_step"):
                    os.kill(os.getpid(), signal.SIGKILL)
                if opts.get("hang_rank") == rank and step == opts.get("hang_step"):
                    while True:
                        time.sleep(1)
                time.sleep(opts.get("step_sleep", 0.0))
                yield b

        @property
        def state_step(self) -> int:
            per_epoch = self.n_rows // (self.batch_size * self.world_size)
            return self.epoch * per_epoch + self.position // (self.batch_size * self.world_size)

    assert issubclass(Source, TensorSource)
    x = planted()
    y = None
    if opts.get("clt"):  # a cross-layer transcoder over 2 layers: rows [N, 2, 16], layer 1's target shifted
        x = x.view(-1, 2, 16)
        y = torch.stack([x[:, 0], x[:, 1] + 0.5 * x[:, 0]], 1)
    src = Source(x, y, batch_size=batch // dp, seed=1, rank=rank if dp > 1 else 0, world_size=dp)
    torch.manual_seed(0)
    if opts.get("clt"):
        from sparsedict.dictionaries import CLTConfig

        cfg = CLTConfig(
            layers=[0, 1], activation=opts["clt"], n_latents=opts.get("n", 64), k=opts.get("k", 4)
        )
    else:
        cfg = TopKConfig(d_in=16, n_latents=opts.get("n", 64), k=opts.get("k", 4), b_dec_init="mean")
    model = build(cfg.resolved(16))
    tc = TrainConfig(
        batch_size=batch,
        max_steps=opts.get("steps", 40),
        lr=opts.get("lr", 3e-3),
        warmup_steps=5,
        decay_fraction=0.2,
        out_dir=opts["out_dir"],
        log_every=1,
        init_rows=1024,
        checkpoint_every=opts.get("checkpoint_every", 0),
        shard_latents=shard,
        dead_tokens=opts.get("dead_tokens", 10_000_000),
        dist_timeout_min=opts.get("timeout_min", 1.0),
        wandb_project=opts.get("wandb_project", ""),
    )
    trainer = Trainer({"topk": model}, {model.cfg.source_key: src}, tc)
    last = trainer.fit(resume=True)
    trainer.save()
    before = gloo_threads()
    distributed.destroy()
    if rank == 0:
        with open(os.path.join(opts["out_dir"], "done.json"), "w") as f:
            json.dump({"world": world, "last": last, "gloo_threads_before_destroy": before,
                       "gloo_threads_after_destroy": gloo_threads()}, f)  # fmt: skip


def gloo_threads() -> list[str]:
    """Names of this process's gloo backend threads (Linux: ``/proc/self/task/*/comm``)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if "gloo" in n)


# -- helpers for the tests that launch this script ----------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))


def command(opts: dict, nproc: int = 1) -> list[str]:
    """The command line that runs this worker in one process or under torchrun with ``nproc`` ranks."""
    script = [os.path.join(HERE, "dist_worker.py"), json.dumps(opts)]
    if nproc == 1:
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *script,
    ]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run(opts: dict, nproc: int = 1, timeout: float = 120):
    """Run to completion; raise with the output when it fails."""
    import subprocess

    p = subprocess.run(command(opts, nproc), env=env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def params(out_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "topk", "model.safetensors"))


def log(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
