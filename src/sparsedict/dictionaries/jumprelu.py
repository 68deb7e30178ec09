"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope) with straight-through threshold estimators.

``z = (x − b_dec) W_enc + b_enc`` (Gemma Scope: no b_dec subtraction, so ``apply_b_dec_to_input`` defaults
to False here), ``f = z · H(z − θ)`` with a per-latent threshold ``θ [n]`` learned **directly** (parameter
``threshold``, as dictionary_learning does; kept ≥ 0 after every optimiser step). Loss
``‖y − x̂‖² + λ_t Σ_i H(z_i − θ_i)`` (λ warmed up linearly). With ``l0_target > 0`` λ is steered during training
so the L0 meets the target (:class:`~sparsedict.dictionaries.control.L0Controller`, then frozen), or with
``l0_control=False`` the loss is the dictionary_learning variant ``λ_t (L0 / l0_target − 1)²``.

Why θ and not ``t = log θ`` (the Gemma Scope paper's parametrisation): under Adam every parameter moves by
about ``lr`` per step, so ``log θ`` climbs from ``log 0.001`` to ``log 0.1`` (the scale of pre-activations of
unit-mean-squared-norm inputs) in ``4.6 / lr`` steps — thousands of steps at ``lr = 2e-3``, during which the
L0 stays far above its target.

θ starts either at ``threshold_init`` (Gemma Scope) or, by default when ``l0_target`` is set, from the data:
``init_from_data`` puts θ_i at the quantile of latent i's initial pre-activations that makes it fire on
``l0_target / n`` of the sample, so the run starts at the target sparsity with every latent alive (a near-ReLU
start lets a few latents absorb everything). Measurements behind these choices and the defaults below:
benchmarks/RESULTS_defaults.md.

The step H has no useful gradient, so both uses go through custom autograd Functions with a rectangle
kernel ``K(u) = 1[|u| < ½]`` of bandwidth ε (pseudo-derivatives):

- :class:`JumpReLUFn`: ``∂f/∂z = H(z − θ)``, ``∂f/∂θ = −(θ/ε) K((z − θ)/ε)``;
- :class:`StepFn`: ``∂H/∂z = 0`` (no gradient to z through the L0 term), ``∂H/∂θ = −(1/ε) K((z − θ)/ε)``.

Gemma Scope's settings (θ_init = ε = 0.001, Adam β1 = 0, lr 7e-5) assume inputs with **unit mean squared
norm** (``TrainConfig.normalise_inputs = "unit_msn"``, the default here): θ and ε are in activation units and
must follow the input scale. By default ε is taken from the data instead, a fixed multiple of the latents'
typical pre-activation spread at initialisation: in a short run at the 'auto' LR a narrow window leaves most
θ_i without a gradient once the first steps have moved the pre-activations away from it, and those latents
stay dead. θ is in latent units, which the export fold (``fold_scaling``: ``W_enc *= c``,
``b_dec /= c``) leaves unchanged, so ``fold_extra`` has nothing to do. The forward uses ``max(θ, 0)``, so a
loaded threshold θ < 0 (SAELens ``ReLU(z)·1[z > θ]``) behaves as θ = 0, exactly like SAELens.

Precision: z, θ and both kernels are computed in fp32 even under ``autocast: bf16`` (the decoder still runs in
bf16). Rounded to bf16, z lies on a grid of spacing ``2^(⌊log2 θ⌋ − 7)``, which is wider than a kernel window
ε = 0.001 once θ ≳ 0.13, so the θ gradient would count grid points rather than nearby pre-activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedict import distributed
from sparsedict.dictionaries.active import active_pre_acts
from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, mse_loss, register
from sparsedict.dictionaries.control import L0TargetFields, Steered
from sparsedict.dictionaries.relu import ReLU, warmup_factor


@dataclass
class JumpReLUConfig(L0TargetFields, DictionaryConfig):
    architecture: str = "jumprelu"
    """Registered architecture name."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec before encoding. Gemma Scope does not; on inputs with a large mean subtracting it
    recovers far more atoms."""
    l0_coefficient: float = 1e-3
    """λ of the L0 penalty (for unit-mean-squared-norm inputs; per-token SSE is then O(1))."""
    l0_target: float = 0.0
    """If > 0, the L0 to train to: λ of the λ·L0 penalty is steered to it during training (starting at
    ``l0_coefficient``) and frozen at ``l0_freeze_fraction`` of the run; with ``l0_control=False`` the loss is
    dictionary_learning's target-L0 loss λ (L0/l0_target − 1)² at fixed λ instead."""
    l0_control: bool = True
    """With ``l0_target`` set: steer λ to the target (True) or use the fixed-λ target-L0 loss (False)."""
    l0_warmup_steps: int = -1
    """Steps over which λ rises linearly from 0: -1 means 5% of the run's steps, 0 means no warmup (not used
    while λ is steered)."""
    threshold_init: float = 0.001
    """Initial θ for every latent (activation units of the normalised input)."""
    bandwidth: float = -2.0
    """ε, the width of the rectangle kernel of the straight-through estimators (activation units of the
    normalised input, as θ). Negative: from the data, ``−bandwidth`` × the median over latents of the standard
    deviation of the initial pre-activations on the init sample (``init_from_data`` stores the value here), so the
    window follows the input scale; until then ``−bandwidth / √d_in``, the same for isotropic inputs of unit mean
    squared norm. The default −2 was chosen by measurement (benchmarks/RESULTS_defaults.md); Gemma Scope's
    0.001 is for runs of billions of tokens."""
    threshold_init_l0: float = -1.0
    """Data-driven start: if > 0, ``init_from_data`` sets θ_i to the ``1 − threshold_init_l0/n`` quantile of
    latent i's initial pre-activations on the sample, so every latent starts firing on the same fraction of
    tokens and the initial L0 ≈ threshold_init_l0 (a sparse start like TopK's). -1 means ``l0_target`` when
    that is set, else off; 0 means off (every θ_i = threshold_init)."""


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel ``K(u) = 1[|u| < ½]``."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """``f = z · H(z − θ)`` for ``z [B, n]`` and ``θ [n]`` (or a θ gathered to z's shape); pseudo-derivative
    wrt θ via the rectangle kernel."""

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
        gtheta = (g * (-theta / eps) * _rect((z - theta) / eps)).sum_to_size(theta.shape)
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
        gtheta = (g * (-1.0 / eps) * _rect((z - theta) / eps)).sum_to_size(theta.shape)
        return None, gtheta, None


@register("jumprelu", JumpReLUConfig)
class JumpReLU(Steered, Dictionary):
    """JumpReLU SAE / transcoder; parameters: the canonical ones plus ``threshold [n]`` (θ, latent units)."""

    cfg: JumpReLUConfig
    # as ReLU's (two thirds of the run-length LR); chosen by measurement: benchmarks/RESULTS_defaults.md
    auto_train: ClassVar[dict[str, Any]] = ReLU.auto_train
    input_normalisation = "unit_msn"
    saelens_architecture = "jumprelu"
    sparsity_fields = ("l0_coefficient", "l0_target")

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        if cfg.threshold_init <= 0 or cfg.bandwidth == 0:
            raise ValueError(
                f"threshold_init ({cfg.threshold_init}) must be > 0 and bandwidth ({cfg.bandwidth}) > 0, or < 0 "
                "(a multiple of the pre-activations' spread)"
            )
        self.bandwidth = cfg.bandwidth if cfg.bandwidth > 0 else -cfg.bandwidth / cfg.d_in**0.5
        """ε as used (the config's, or the data-driven one)."""
        self.threshold = nn.Parameter(
            torch.full((cfg.n_latents,), cfg.threshold_init, dtype=getattr(torch, cfg.dtype))
        )
        self.l0_current = cfg.l0_coefficient
        self.init_steering(cfg.controller(cfg.l0_coefficient) if cfg.l0_control else None)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec as in the base class, then θ from the quantiles of the pre-activations (see the config)."""
        super().init_from_data(x, y)
        q = self.sparse_start(x, self.b_enc)
        if q is not None:
            self.threshold.copy_(q.clamp_min(0.0).to(self.threshold.dtype))
        if self.cfg.bandwidth < 0:
            std = self.pre_acts(x[: self.init_rows]).std(0).median()
            self.set_bandwidth(-self.cfg.bandwidth * float(distributed.all_reduce_mean(std)))

    def set_bandwidth(self, eps: float) -> None:
        """Use ε = ``eps`` from now on and record it in the config (saved with the model)."""
        if not eps > 0:
            raise ValueError(f"bandwidth from the data must be > 0, got {eps} (constant pre-activations?)")
        self.bandwidth = self.cfg.bandwidth = float(eps)

    def firing_scores(self, x: Tensor) -> Tensor:
        """``z − θ``, below all others where ``z ≤ 0`` (no θ ≥ 0 fires those), so a shift clamped at θ = 0 is exact."""
        z = self.pre_acts(x)
        s = z - self.theta(z.dtype)
        return s.masked_fill(z <= 0, float(s.min()) - 1.0)

    def shift_firing(self, delta: float) -> None:
        self.threshold.clamp_(min=0.0).add_(delta).clamp_(min=0.0)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``z [B, n]`` in fp32 at least, outside autocast (the threshold path needs them exact)."""
        dtype = torch.promote_types(self.W_enc.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return self._x_in(x.to(dtype)) @ self.W_enc.to(dtype) + self.b_enc.to(dtype)

    def theta(self, dtype: torch.dtype) -> Tensor:
        """The threshold as used in the forward pass, ``max(θ, 0)`` ``[n]`` (gradient passes at θ ≥ 0)."""
        return self.threshold.clamp_min(0.0).to(dtype)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """Keep θ ≥ 0 after each optimiser step (Adam momentum could otherwise push it below zero); steer λ."""
        self.threshold.clamp_(min=0.0)
        self.steer(out)

    def encode(self, x: Tensor) -> SparseCode:
        """Dense code ``values [B, n] = z · H(z − θ)`` for ``x [B, d_in]``."""
        z = self.pre_acts(x)
        return SparseCode(JumpReLUFn.apply(z, self.theta(z.dtype), self.bandwidth), None, self.n_latents)

    def train_state(self) -> dict[str, Any]:
        return {**super().train_state(), "bandwidth": self.bandwidth}

    def load_train_state(self, state: dict[str, Any]) -> None:
        super().load_train_state(state)
        if "bandwidth" in state:
            self.set_bandwidth(state["bandwidth"])

    def on_step(self, step: int, total_steps: int) -> None:
        steered = self.steered_coefficient(step, total_steps)
        if steered is None:
            steered = self.cfg.l0_coefficient * warmup_factor(step, total_steps, self.cfg.l0_warmup_steps)
        self.l0_current = steered

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Dense, or in CPU training on the latents with ``z > θ − ε`` only (the code's support and the
        estimators' window; :func:`~sparsedict.dictionaries.active.active_pre_acts`): a sparse code."""
        self.check_input(x)
        self.keep_recent(x)
        y = x if target is None else target
        eps = self.bandwidth
        dtype = torch.promote_types(self.W_enc.dtype, torch.float32)
        theta = self.theta(dtype)
        act = active_pre_acts(self, x, self.b_enc, (eps - theta).detach(), dtype)
        if act is None:
            z = self.pre_acts(x)
            code = SparseCode(JumpReLUFn.apply(z, theta, eps), None, self.n_latents)
            l0 = StepFn.apply(z.float(), theta.float(), eps).sum(-1).mean()
            x_hat = self.decode(code, x)
        else:
            theta_sel = theta[act.indices]
            f = JumpReLUFn.apply(act.z, theta_sel, eps)
            l0 = act.mean_row_sum(StepFn.apply(act.z, theta_sel, eps))
            code = act.code(f)
            x_hat = act.reconstruct(self, f, x)
        if self.cfg.l0_target > 0 and self.l0_controller is None:
            sparsity = (l0 / self.cfg.l0_target - 1).pow(2)
        else:
            sparsity = l0
        losses = {"mse": mse_loss(x_hat, y), "sparsity": self.l0_current * sparsity}
        return Output(x_hat, code, losses)
