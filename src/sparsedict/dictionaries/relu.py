"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic "Circuits Updates – April 2024").

``f = ReLU((x − b_dec) W_enc + b_enc)`` (the b_dec subtraction is the ``apply_b_dec_to_input`` flag;
Anthropic's spec has none, SAELens subtracts by default), ``x̂ = f W_dec + b_dec``.
Loss: ``‖y − x̂‖² + λ Σ_i f_i ‖W_dec[i]‖₂`` (per-token sum, mean over the batch). The decoder is *not*
norm-constrained; the norm weighting makes the penalty invariant to rescaling ``f_i ↔ W_dec[i]``.
λ is warmed up linearly from 0 (``l1_warmup_steps``). Init: decoder rows random directions of norm 0.1,
``W_enc = W_dec^T``, biases 0. The default λ = 5 assumes inputs scaled so ``E‖x‖ = √d``
(``TrainConfig.normalise_inputs = "sqrt_d"``); λ does not transfer across normalisations. For an isolated
latent the penalty soft-thresholds its coefficient c (in scaled units) to ``max(c − λ/2, 0)``, so λ should sit
well below twice the typical coefficient ``≈ √(d / L0)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparsedict.dictionaries.active import active_pre_acts, gemm_dtype
from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, mse_loss, register
from sparsedict.dictionaries.control import L0TargetFields, Steered


@dataclass
class ReLUConfig(L0TargetFields, DictionaryConfig):
    architecture: str = "relu"
    """Registered architecture name."""
    l1_coefficient: float = 5.0
    """λ of the decoder-norm-weighted L1 penalty (tuned for normalise_inputs='sqrt_d')."""
    l1_warmup_steps: int = -1
    """Steps over which λ rises linearly from 0: -1 means 5% of the run's steps, 0 means no warmup (not used
    with ``l0_target``: the steered λ starts at ``l1_coefficient``)."""
    decoder_init_norm: float = 0.1
    """Norm of the randomly oriented decoder rows at initialisation."""
    l0_control_steps: int = 150
    """With ``l0_target``: runs longer than this many steps steer with the integral gain scaled by
    ``l0_control_steps / total_steps`` (a fast controller kills latents over a long run; chosen by measurement:
    benchmarks/RESULTS_defaults.md); 0: the same gain at every run length."""


def warmup_factor(step: int, total_steps: int, warmup_steps: int, default_fraction: float = 0.05) -> float:
    """Linear 0→1 coefficient warmup; ``warmup_steps=-1`` means ``default_fraction`` of ``total_steps``."""
    steps = int(default_fraction * total_steps) if warmup_steps < 0 else warmup_steps
    if steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / steps)


@register("relu", ReLUConfig)
class ReLU(Steered, Dictionary):
    cfg: ReLUConfig
    # two thirds of the run-length LR (at batch 1024 a third of the rule it was chosen against), warmup at most
    # 10 % of the run; chosen by measurement: benchmarks/RESULTS_defaults.md
    auto_train: ClassVar[dict[str, Any]] = {
        "lr_rule": "budget",
        "budget_scale": 2 / 3,
        "warmup_fraction": 0.1,
    }
    unit_norm_decoder = False
    input_normalisation = "sqrt_d"
    saelens_architecture = "standard"
    sparsity_fields = ("l1_coefficient", "l0_target")
    init_l0_factor = (
        4.0  # the sparse start at 4 x l0_target; chosen by measurement: benchmarks/RESULTS_defaults.md
    )

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        with torch.no_grad():
            self.W_dec.mul_(cfg.decoder_init_norm)
            if self.d_out == self.d_in:
                self.W_enc.copy_(self.W_dec.T)
        # The coefficient in force for the current step (set by on_step; full λ outside training).
        self.l1_current = cfg.l1_coefficient
        self.init_steering(cfg.controller(cfg.l1_coefficient))

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec as in the base class, then ``b_enc`` from the data for a sparse start (``threshold_init_l0``)."""
        super().init_from_data(x, y)
        q = self.sparse_start(x, self.b_enc)
        if q is not None:
            self.b_enc -= q

    def firing_scores(self, x: Tensor) -> Tensor:
        return self.pre_acts(x)

    def shift_firing(self, delta: float) -> None:
        self.b_enc -= delta

    def encode(self, x: Tensor) -> SparseCode:
        """``f = ReLU(pre_acts(x))`` as a dense code ``values [B, n]``."""
        return SparseCode(self.pre_acts(x).relu(), None, self.n_latents)

    def on_step(self, step: int, total_steps: int) -> None:
        steered = self.steered_coefficient(step, total_steps)
        if steered is None:
            steered = self.cfg.l1_coefficient * warmup_factor(step, total_steps, self.cfg.l1_warmup_steps)
        self.l1_current = steered

    def after_step(self, out: Output) -> None:
        self.steer(out)

    def aux_losses(self, x: Tensor, y: Tensor, code: SparseCode, x_hat: Tensor) -> dict[str, Tensor]:
        """``λ_t · mean_b Σ_i f_bi ‖W_dec[i]‖₂`` (fp32)."""
        norms = self.W_dec.float().norm(dim=1)
        l1 = (code.values.float() @ norms).mean()
        return {"l1": self.l1_current * l1}

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """The dense forward, or in CPU training the same step on the active latents only
        (:func:`~sparsedict.dictionaries.active.active_pre_acts`); keeps the batch for the final L0
        calibration."""
        self.check_input(x)
        self.keep_recent(x)
        act = active_pre_acts(self, x, self.b_enc, None, gemm_dtype(x))
        if act is None:
            return super().forward(x, target)
        y = x if target is None else target
        f = act.z.relu()
        x_hat = act.reconstruct(self, f, x)
        l1 = act.mean_row_sum(f * self.W_dec.float().norm(dim=1)[act.indices])
        losses = {"mse": mse_loss(x_hat, y), "l1": self.l1_current * l1}
        return Output(x_hat, act.code(f), losses)
