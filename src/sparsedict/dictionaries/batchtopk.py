"""BatchTopK SAE (Bussmann, Leask, Nanda 2024) with an inference threshold and AuxK.

Training: ``a = ReLU((x − b_dec) W_enc + b_enc)``; keep the ``k·B`` largest entries of the flattened
``[B, n]`` matrix (per-token L0 varies, its batch mean is k). A token's code therefore depends on the
rest of the batch, so evaluation uses a global threshold instead: ``f = a · 1[a > θ]`` (a JumpReLU with a
single θ). θ is the exponential moving average of the smallest positive kept activation of each training
batch (``θ ← (1 − r) θ + r · min(a_kept > 0)``, first value taken as is), updated in ``after_step``
and saved in the checkpoint as the buffer ``threshold`` (−1 while unset; an eval-mode forward with an
unset θ falls back to batch top-k). Unit-norm decoder, AuxK and init as TopK.
θ is in latent units, which the export fold (``fold_scaling``) leaves unchanged, so it needs no folding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, register
from sparsedict.dictionaries.topk import auxk_loss


@dataclass
class BatchTopKConfig(DictionaryConfig):
    architecture: str = "batchtopk"
    """Registered architecture name."""
    k: int = 32
    """Mean active latents per token (k·B entries are kept per batch of B tokens)."""
    aux_k: int = 0
    """Dead latents used by the AuxK loss; 0 means d_in // 2."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss (0 turns it off)."""
    threshold_rate: float = 0.01
    """EMA rate r of the inference threshold θ (SAELens uses 0.01, dictionary_learning 0.001)."""
    threshold_start_step: int = 0
    """Training step from which θ is estimated (earlier batches are ignored)."""


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the ``k·B`` largest entries of ``acts [B, n]`` (flattened), zero the rest; differentiable.

    Returns the dense ``[B, n]`` code; gradient flows to the kept entries only.
    """
    B, n = acts.shape
    flat = acts.reshape(-1)
    vals, idx = flat.topk(min(k * B, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view(B, n)


def threshold_code(acts: Tensor, theta: Tensor) -> Tensor:
    """``acts · 1[acts > θ]`` for ``acts [B, n]`` and a scalar or ``[n]`` threshold."""
    return acts * (acts > theta.to(acts.dtype))


@register("batchtopk", BatchTopKConfig)
class BatchTopK(Dictionary):
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float32))
        self._step = 0

    def _x_in(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.subtracts_b_dec else x

    def select(self, acts: Tensor) -> Tensor:
        """Training: batch top-k. Eval: the threshold θ (batch top-k while θ is unset)."""
        if self.training or float(self.threshold) < 0:
            return batch_topk(acts, self.cfg.k)
        return threshold_code(acts, self.threshold)

    def encode(self, x: Tensor) -> SparseCode:
        """Dense code ``values [B, n]`` (zeros are inactive)."""
        acts = (self._x_in(x) @ self.W_enc + self.b_enc).relu()
        return SparseCode(self.select(acts), None, self.n_latents)

    def aux_losses(self, x: Tensor, y: Tensor, code: SparseCode, x_hat: Tensor) -> dict[str, Tensor]:
        return auxk_loss(self, self._x_in(x), y - x_hat, self.cfg.aux_k or self.d_in // 2, self.cfg.aux_alpha)

    def on_step(self, step: int, total_steps: int) -> None:
        self._step = step

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """Update θ from this batch's smallest positive kept activation."""
        if not self.training or self._step < self.cfg.threshold_start_step:
            return
        self.update_threshold(out.code)

    @torch.no_grad()
    def update_threshold(self, code: SparseCode) -> None:
        v = code.values.detach().float()
        pos = v[v > 0]
        if pos.numel() == 0:
            return
        m = _all_reduce_mean(pos.min())
        if float(self.threshold) < 0:
            self.threshold.copy_(m)
        else:
            r = self.cfg.threshold_rate
            self.threshold.mul_(1 - r).add_(r * m)


def _all_reduce_mean(t: Tensor) -> Tensor:
    """Mean over data-parallel ranks (each selects top-k over its own batch) so replicas keep one θ."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t
