"""TopK SAE (Gao et al. 2024) with the AuxK dead-latent loss.

``z = TopK(ReLU((x − b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``; unit-norm decoder rows.
AuxK: ``e = y − x̂`` (detached), top-``k_aux`` pre-activations among dead latents, ``ê = z_aux W_dec``
decoded **without** b_dec, ``L_aux = α ‖e − ê‖² / Σ‖e − ē‖²`` (normalised by the residual's batch variance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, SparseCode, register
from sparsedict.kernels import sparse_decode, topk_encode


@dataclass
class TopKConfig(DictionaryConfig):
    architecture: str = "topk"
    """Registered architecture name."""
    k: int = 32
    """Active latents per token."""
    aux_k: int = 0
    """Dead latents used by the AuxK loss; 0 means d_in // 2."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss (0 turns it off)."""


def residual_variance(e: Tensor) -> Tensor:
    """``Σ_t ‖e_t − ē‖² / B`` of a residual batch ``e [B, d]`` (fp32): the normaliser of the AuxK-style losses."""
    return (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def auxk_loss(
    model: Dictionary, x_in: Tensor, residual: Tensor, k_aux: int, alpha: float
) -> dict[str, Tensor]:
    """AuxK term for ``model`` (TopK-like: ``W_enc``, ``b_enc``, ``W_dec``, ``_dead_mask``).

    ``x_in`` is the encoder input (b_dec already subtracted where the model does so) and
    ``residual = y − x̂``. Only the dead columns of ``W_enc`` are multiplied (a GEMM over the dead
    latents, not the full width); the aux code is decoded without b_dec.
    """
    dead = model._dead_mask
    if not model.training or alpha <= 0 or dead is None or not bool(dead.any()):
        return {}
    dead_idx = dead.nonzero().squeeze(1)
    pre_dead = x_in @ model.W_enc[:, dead_idx] + model.b_enc[dead_idx]
    vals, j = pre_dead.topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    e_hat = sparse_decode(dead_idx[j], vals.relu(), model.W_dec)
    residual = residual.detach().float()
    loss = (e_hat.float() - residual).pow(2).sum(-1).mean() / residual_variance(residual)
    return {"auxk": alpha * loss}


@register("topk", TopKConfig)
class TopK(Dictionary):
    cfg: TopKConfig
    # chosen by measurement: benchmarks/RESULTS_training.md
    auto_train: ClassVar[dict[str, Any]] = {
        "betas": (0.8, 0.99),
        "lr_rule": "budget",
        "lr_dec_scale": 2.0,
        "warmup_fraction": 0.1,
    }
    supports_latent_sharding = True
    saelens_architecture = "topk"
    sparsity_fields = ("k",)

    def encode(self, x: Tensor) -> SparseCode:
        b_enc = self.b_enc
        if self.subtracts_b_dec and self.b_dec.requires_grad and torch.is_grad_enabled():
            # Same forward values as encoding ``x − b_dec``, cheaper backward: b_dec's encoder gradient
            # ``−W_enc · g_b_enc`` becomes one GEMV through a bias term whose value is exactly b_enc,
            # instead of ∂/∂x as an embedding bag over [B, k, d] (x itself needs no gradient).
            b = self.b_dec.detach()
            with torch.autocast(x.device.type, enabled=False):
                b_enc = b_enc + (b - self.b_dec) @ self.W_enc.detach()
            x = x - b
        else:
            x = self._x_in(x)
        values, indices = topk_encode(x, self.W_enc, b_enc, self.cfg.k)
        return SparseCode(values, indices, self.n_latents)

    def aux_losses(self, x: Tensor, y: Tensor, code: SparseCode, x_hat: Tensor) -> dict[str, Tensor]:
        return auxk_loss(self, self._x_in(x), y - x_hat, self.cfg.aux_k or self.d_in // 2, self.cfg.aux_alpha)
