"""Every reconstruction and sparsity metric, defined once (METHODS.md §3).

All metrics are ratios of streaming sums accumulated in fp64, so they do not depend on how the
evaluated tokens were split into batches and merge exactly across batches and ranks:

- ``S_res = Σ_t ‖y_t − ŷ_t‖²``, ``S_1 = Σ_t y_t`` ``[d]``, ``S_2 = Σ_t ‖y_t‖²``, ``T`` tokens.
- **FVU** ``= S_res / Σ_t ‖y_t − μ‖²`` with the per-dimension mean ``μ = S_1 / T`` of the same tokens,
  and ``Σ_t ‖y_t − μ‖² = S_2 − ‖S_1‖² / T``. Explained variance ``= 1 − FVU``.
- **MSE** per element ``= S_res / (T·d)``; per-token SSE ``= S_res / T``.
- **cosine** ``= mean_t ⟨y_t, ŷ_t⟩ / (‖y_t‖‖ŷ_t‖)``.
- **L0** ``= mean_t |{i : f_ti ≠ 0}|`` (and its histogram over tokens).
- **dead %** = fraction of latents with zero firings over the evaluated tokens; **dense %** = fraction
  firing on more than ``dense_threshold`` (10 %) of tokens.
- **relative reconstruction bias** ``γ = Σ‖ŷ‖² / Σ⟨y, ŷ⟩`` (< 1 means shrinkage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsedict.dictionaries.base import SparseCode


def fvu(y: Tensor, y_hat: Tensor) -> float:
    """Fraction of variance unexplained of ``y_hat`` for ``y`` ``[T, d]`` (per-dimension mean of y)."""
    stats = ReconstructionStats()
    stats.update(y, y_hat)
    return stats.fvu


@dataclass
class ReconstructionStats:
    """Streaming sums for reconstruction and sparsity metrics; ``update`` per batch, ``merge`` across."""

    n_latents: int = 0
    dense_threshold: float = 0.1
    tokens: int = 0
    s_res: float = 0.0
    s_2: float = 0.0
    s_cross: float = 0.0
    s_hat2: float = 0.0
    s_cos: float = 0.0
    s_l0: float = 0.0
    s_1: Tensor | None = None
    fired: Tensor | None = None
    l0_hist: Tensor | None = field(default=None)

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, code: SparseCode | None = None) -> None:
        if y.shape != y_hat.shape:
            raise ValueError(f"y {list(y.shape)} and y_hat {list(y_hat.shape)} must have the same shape")
        y, y_hat = y.double(), y_hat.double()
        self.tokens += y.shape[0]
        self.s_res += float((y - y_hat).pow(2).sum())
        self.s_2 += float(y.pow(2).sum())
        self.s_cross += float((y * y_hat).sum())
        self.s_hat2 += float(y_hat.pow(2).sum())
        cos = (y * y_hat).sum(-1) / (y.norm(dim=-1) * y_hat.norm(dim=-1)).clamp_min(1e-30)
        self.s_cos += float(cos.sum())
        s1 = y.sum(0)
        self.s_1 = s1 if self.s_1 is None else self.s_1 + s1
        if code is not None:
            n = code.n_latents
            self.n_latents = n
            l0 = code.l0()
            self.s_l0 += float(l0.sum())
            hist = torch.bincount(l0.cpu(), minlength=n + 1)[: n + 1]
            self.l0_hist = hist if self.l0_hist is None else self.l0_hist + hist
            active = code.active().cpu()
            self.fired = active if self.fired is None else self.fired + active

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        out = ReconstructionStats(self.n_latents or other.n_latents, self.dense_threshold)
        for name in ("tokens", "s_res", "s_2", "s_cross", "s_hat2", "s_cos", "s_l0"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("s_1", "fired", "l0_hist"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, a if b is None else b if a is None else a + b)
        return out

    @property
    def total_variance(self) -> float:
        if self.tokens == 0 or self.s_1 is None:
            return float("nan")
        return self.s_2 - float(self.s_1.pow(2).sum()) / self.tokens

    @property
    def fvu(self) -> float:
        return self.s_res / self.total_variance

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def mse(self) -> float:
        d = self.s_1.numel() if self.s_1 is not None else 1
        return self.s_res / max(1, self.tokens * d)

    @property
    def sse_per_token(self) -> float:
        return self.s_res / max(1, self.tokens)

    @property
    def cosine(self) -> float:
        return self.s_cos / max(1, self.tokens)

    @property
    def shrinkage(self) -> float:
        return self.s_hat2 / self.s_cross if self.s_cross else float("nan")

    @property
    def l0(self) -> float:
        return self.s_l0 / max(1, self.tokens)

    @property
    def firing_frequency(self) -> Tensor:
        return self.fired.double() / max(1, self.tokens)

    @property
    def dead_fraction(self) -> float:
        return float((self.fired == 0).double().mean()) if self.fired is not None else float("nan")

    @property
    def dense_fraction(self) -> float:
        if self.fired is None:
            return float("nan")
        return float((self.firing_frequency > self.dense_threshold).double().mean())

    def summary(self) -> dict[str, float]:
        out = {
            "tokens": self.tokens,
            "fvu": self.fvu,
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "sse_per_token": self.sse_per_token,
            "cosine": self.cosine,
            "shrinkage": self.shrinkage,
        }
        if self.fired is not None:
            out.update(l0=self.l0, dead_fraction=self.dead_fraction, dense_fraction=self.dense_fraction)
        return out


@torch.no_grad()
def reconstruction_stats(model, batches, max_rows: int | None = None, device: str | torch.device = "cpu") -> ReconstructionStats:
    """Accumulate :class:`ReconstructionStats` of ``model`` over an iterable of ``(x, y)`` batches.

    ``y`` None means the target is ``x`` (an SAE). Stops after ``max_rows`` rows when given.
    """
    stats = ReconstructionStats(model.n_latents)
    was_training = model.training
    model.eval()
    for x, y in batches:
        x = x.to(device, torch.float32)
        y = x if y is None else y.to(device, torch.float32)
        if max_rows is not None and stats.tokens + x.shape[0] > max_rows:
            keep = max_rows - stats.tokens
            x, y = x[:keep], y[:keep]
        code = model.encode(x)
        stats.update(y, model.decode(code, x), code)
        if max_rows is not None and stats.tokens >= max_rows:
            break
    model.train(was_training)
    return stats
