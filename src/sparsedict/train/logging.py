"""Run logging from rank 0: a tqdm progress bar with tokens/s, a JSONL log and optional wandb."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sparsedict import distributed
from sparsedict.train.config import TrainConfig


class _Bar:
    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int, tokens_per_s: float, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        fvu = next((v for k, v in metrics.items() if k.endswith("/fvu")), None)
        post = {"tok/s": f"{tokens_per_s:,.0f}"}
        if fvu is not None:
            post["fvu"] = f"{fvu:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)


class RunLogger:
    """Writes ``out_dir/log.jsonl`` and, with ``wandb_project`` set, logs to wandb (rank 0 only)."""

    def __init__(
        self, cfg: TrainConfig, enabled: bool | None = None, run_config: dict[str, Any] | None = None
    ):
        self.enabled = distributed.is_main() if enabled is None else enabled
        self.cfg = cfg
        self.path = Path(cfg.out_dir) / "log.jsonl"
        self.wandb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if cfg.wandb_project:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.out_dir, config=run_config or {})

    @contextmanager
    def progress(self, total: int, initial: int = 0):
        if not self.enabled:
            yield _Bar(None)
            return
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
        )
        try:
            yield _Bar(bar)
        finally:
            bar.close()

    def note(self, text: str) -> None:
        """Print one line to stderr (rank 0), above the progress bar."""
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def log(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "tokens": tokens, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
