"""Dead-latent tracking: tokens since each latent last fired, all-reduced across data-parallel ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsedict import distributed
from sparsedict.dictionaries.base import SparseCode


class DeadLatentTracker:
    """Counts, per latent, the training tokens since it last fired (int64 on the device).

    A latent is *dead* when that count exceeds ``window`` tokens.
    """

    def __init__(self, n_latents: int, window: int, device: torch.device | str = "cpu", sync: bool = True):
        self.window = window
        self.sync = sync  # False when every rank already sees the global code (latent-sharded dictionaries)
        self.since = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.tokens = 0

    def update(self, code: SparseCode, n_tokens: int) -> None:
        counts = code.active()
        if self.sync:
            counts = distributed.all_reduce_sum(counts)
            n_tokens = int(distributed.all_reduce_sum(torch.tensor(n_tokens, device=counts.device)))
        fired = counts > 0
        self.since.add_(n_tokens).masked_fill_(fired, 0)
        self.tokens += n_tokens

    def dead_mask(self) -> Tensor:
        return self.since >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_dict(self) -> dict[str, Tensor]:
        return {"since": self.since, "tokens": torch.tensor(self.tokens)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.since.copy_(state["since"])
        self.tokens = int(state["tokens"])
