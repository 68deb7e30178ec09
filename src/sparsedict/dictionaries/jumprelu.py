"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope) with straight-through threshold estimators.

``z = (x − b_dec) W_enc + b_enc`` (Gemma Scope: no b_dec subtraction, so ``apply_b_dec_to_input`` defaults
to False here), ``f = z · H(z − θ)``, ``θ = exp(log_threshold)`` learned per latent. Loss
``‖y − x̂‖² + λ_t Σ_i H(z_i − θ_i)`` (λ warmed up linearly), or with ``l0_target > 0`` the
dictionary_learning variant ``λ_t (L0 / l0_target − 1)²``.

The step H has no useful gradient, so both uses go through custom autograd Functions with a rectangle
kernel ``K(u) = 1[|u| < ½]`` of bandwidth ε (pseudo-derivatives, METHODS.md §1.4):

- :class:`JumpReLUFn`: ``∂f/∂z = H(z − θ)``, ``∂f/∂θ = −(θ/ε) K((z − θ)/ε)``;
- :class:`StepFn`: ``∂H/∂z = 0`` (no gradient to z through the L0 term), ``∂H/∂θ = −(1/ε) K((z − θ)/ε)``.

Autograd supplies the extra factor θ of ``θ = exp(t)``. The defaults (θ_init = ε = 0.001, Adam β1 = 0,
lr 7e-5 in Gemma Scope) assume inputs with **unit mean squared norm**
(``TrainConfig.normalise_inputs = "unit_msn"``): θ and ε are in activation units and must follow the
input scale. θ is in latent units, which the export fold (``fold_scaling``: ``W_enc *= c``,
``b_dec /= c``) leaves unchanged, so ``fold_extra`` has nothing to do; SAELens-style exports read
``θ = exp(log_threshold)`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, mse_loss, register
from sparsedict.dictionaries.relu import warmup_factor


@dataclass
class JumpReLUConfig(DictionaryConfig):
    architecture: str = "jumprelu"
    """Registered architecture name."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec before encoding (Gemma Scope does not)."""
    l0_coefficient: float = 1e-3
    """λ of the L0 penalty (for unit-mean-squared-norm inputs; per-token SSE is then O(1))."""
    l0_target: float = 0.0
    """If > 0, use the target-L0 loss λ (L0/l0_target − 1)² instead of λ·L0 (dictionary_learning)."""
    l0_warmup_steps: int = -1
    """Steps over which λ rises linearly from 0: -1 means 5% of the run's steps, 0 means no warmup."""
    threshold_init: float = 0.001
    """Initial θ for every latent (activation units of the normalised input)."""
    bandwidth: float = 0.001
    """ε, the width of the rectangle kernel of the straight-through estimators."""


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel ``K(u) = 1[|u| < ½]``."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """``f = z · H(z − θ)`` for ``z [B, n]``, ``θ [n]``; pseudo-derivative wrt θ via the rectangle kernel."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = g * (z > theta)
        gtheta = (g * (-theta / eps) * _rect((z - theta) / eps)).sum(0)
        return gz, gtheta, None


class StepFn(torch.autograd.Function):
    """``H(z − θ)``; no gradient to z, ``∂H/∂θ = −(1/ε) K((z − θ)/ε)``."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gtheta = (g * (-1.0 / eps) * _rect((z - theta) / eps)).sum(0)
        return None, gtheta, None


@register("jumprelu", JumpReLUConfig)
class JumpReLU(Dictionary):
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        if cfg.threshold_init <= 0 or cfg.bandwidth <= 0:
            raise ValueError(
                f"threshold_init ({cfg.threshold_init}) and bandwidth ({cfg.bandwidth}) must be > 0"
            )
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(cfg.threshold_init), dtype=getattr(torch, cfg.dtype))
        )
        self.l0_current = cfg.l0_coefficient

    @property
    def threshold(self) -> Tensor:
        """``θ = exp(log_threshold)`` ``[n]``."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> SparseCode:
        """Dense code ``values [B, n] = z · H(z − θ)``."""
        z = self.pre_acts(x)
        return SparseCode(
            JumpReLUFn.apply(z, self.threshold.to(z.dtype), self.cfg.bandwidth), None, self.n_latents
        )

    def on_step(self, step: int, total_steps: int) -> None:
        self.l0_current = self.cfg.l0_coefficient * warmup_factor(step, total_steps, self.cfg.l0_warmup_steps)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = x if target is None else target
        z = self.pre_acts(x)
        theta = self.threshold.to(z.dtype)
        code = SparseCode(JumpReLUFn.apply(z, theta, self.cfg.bandwidth), None, self.n_latents)
        x_hat = self.decode(code, x)
        l0 = StepFn.apply(z.float(), theta.float(), self.cfg.bandwidth).sum(-1).mean()
        if self.cfg.l0_target > 0:
            sparsity = (l0 / self.cfg.l0_target - 1).pow(2)
        else:
            sparsity = l0
        return Output(x_hat, code, {"mse": mse_loss(x_hat, y), "sparsity": self.l0_current * sparsity})
