"""wandb logging from rank 0 only (offline mode), with every metric the issue asks for.

A 2-rank torchrun job (gloo, CPU) of ``tests/dist_worker.py`` with ``wandb_project`` set and
``WANDB_MODE=offline``: exactly one offline run directory must exist (rank 1 logs nothing), its run file
must hold the logged keys (loss terms, FVU, L0, dead %, lr, grad norm, tokens/s), the JSONL log must
have one record per step (not one per rank), and the progress bar must show tokens/s.
"""

from __future__ import annotations

import json
import subprocess

import dist_worker as W

KEYS = (
    "topk/loss",
    "topk/mse",
    "topk/fvu",
    "topk/l0",
    "topk/dead",
    "topk/lr",
    "topk/grad_norm",
    "tokens_per_s",
)


def test_wandb_offline_rank0_only(tmp_path):
    steps = 20
    opts = {"out_dir": str(tmp_path / "run"), "steps": steps, "wandb_project": "sparsedict-test"}
    env = {
        **W.env(),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_SILENT": "false",
    }
    p = subprocess.run(W.command(opts, 2), env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-4000:]
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one wandb run (rank 0 only), found {[r.name for r in runs]}"
    assert not list((tmp_path / "wandb-dir").rglob("offline-run-*"))  # no second run anywhere else
    blob = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in KEYS:
        assert blob.count(key.encode()) >= steps, f"{key} was not logged at every step"
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(set(KEYS) <= set(r) for r in records)
    assert records[-1]["topk/grad_norm"] > 0 and records[-1]["tokens_per_s"] > 0
    assert "tok/s=" in p.stderr
