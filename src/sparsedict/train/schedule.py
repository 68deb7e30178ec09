"""Learning-rate and coefficient schedules as pure functions of the step (so resume is exact)."""

from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warmup over ``warmup_steps``, constant, then linear decay to 0 over the last ``decay_fraction``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_fraction > 0 and total_steps > 0:
        decay_start = int(total_steps * (1 - decay_fraction))
        if step >= decay_start:
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


def width_lr(n_latents: int, optimizer: str) -> float:
    """Default LR from the width rule ``base / sqrt(n / 2^14)`` (Adam 2e-4, sign-SGD 5e-3 at n = 2^14)."""
    base = 2e-4 if optimizer == "adam" else 5e-3
    return base / (n_latents / 2**14) ** 0.5


BUDGET_MAX_STEPS = 2000
"""The longest run :func:`budget_lr` was measured on (benchmarks/RESULTS_training.md); longer runs take the width rule."""

BUDGET_MAX_BATCH = 4096
"""The largest batch :func:`budget_lr` was measured on; larger batches get its LR."""


def budget_lr(n_latents: int, total_steps: int, batch_size: int = BUDGET_MAX_BATCH) -> float:
    """Adam LR for a run of ``total_steps`` steps of ``batch_size`` rows:
    ``0.0148 · (B / 4096)^(1/4) / (steps^(1/3) · sqrt(n / 2^14))``, with B at most 4096.

    The width rule's ``1/sqrt(n)`` times a run-length factor ``steps^(-1/3)`` and a weak batch factor, measured
    on runs of 48 to 2,000 steps, batches of 256 to 4,096 rows and widths 2,304 and 4,608
    (benchmarks/RESULTS_training.md). At 10^5 steps, n = 2^14 and B = 4096 it gives 3.2e-4, the order of the
    width rule for runs of billions of tokens.
    """
    batch = min(max(1, batch_size), BUDGET_MAX_BATCH) / BUDGET_MAX_BATCH
    return 0.0148 * batch**0.25 / (max(1, total_steps) ** (1 / 3) * (n_latents / 2**14) ** 0.5)
