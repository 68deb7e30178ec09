"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014).

``π = (x − b_dec) W_enc`` (W_enc is the paper's W_gate), gate ``1[π + b_gate > 0]``, magnitude
``ReLU(exp(r_mag) ⊙ π + b_mag)`` (W_mag = W_gate with a per-latent scale), ``f = gate · magnitude``,
``x̂ = f W_dec + b_dec``. Loss (paper version, unit-norm decoder):

``‖y − x̂‖² + λ ‖ReLU(π + b_gate)‖₁ + ‖y − (ReLU(π + b_gate) W_dec* + b_dec*)‖²``

where ``*`` marks a stop-gradient copy: the auxiliary reconstruction trains the gate path only. The
state dict has ``b_gate, b_mag, r_mag [n]`` and **no** ``b_enc`` (SAELens naming). For a skip
transcoder the auxiliary reconstruction includes the (also frozen) skip term. All extra parameters are
in latent units, which the export fold (``fold_scaling``) leaves unchanged.

Init: unit-norm random decoder rows, ``W_enc = encoder_init_norm · W_dec^T`` (0.1, as the April-update
ReLU init where encoder and decoder start at norm 0.1; the decoder here must stay unit norm, so only the
encoder carries the small scale), ``r_mag = b_mag = b_gate = 0``. With unit-norm ``W_enc`` about half of
the latents fire at init and ``x̂`` overshoots ``x`` about ``n / 2d``-fold (4x at expansion 8); the first
few hundred steps then go to shrinking the encoder, and Adam's per-coordinate steps rotate unit-norm
columns slowly (measured: benchmarks/RESULTS_defaults.md).

λ: the gate's L1 with the frozen-decoder reconstruction sets a firing threshold: a latent whose
coefficient c satisfies ``c < λ/2`` is cheaper off (``min_f (c − f)² + λf``). Under the default input
normalisation ``E‖x‖ = √d`` (``TrainConfig.normalise_inputs = "sqrt_d"``) typical coefficients are
``≈ √(d / L0)`` (≈ 3 for d = 576 with L0 ≈ 50), so λ = 2 gates off only coefficients under a third of
typical. Unlike the ReLU SAE, the magnitudes are not shrunk by λ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedict.dictionaries.active import active_pre_acts, gemm_dtype
from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, mse_loss, register
from sparsedict.dictionaries.control import L0TargetFields, Steered
from sparsedict.dictionaries.relu import ReLU


@dataclass
class GatedConfig(L0TargetFields, DictionaryConfig):
    architecture: str = "gated"
    """Registered architecture name."""
    l1_coefficient: float = 2.0
    """λ of the L1 penalty on the gate pre-activations ReLU(π + b_gate) (for normalise_inputs='sqrt_d')."""
    l1_warmup_steps: int = -1
    """Steps over which λ rises linearly from 0: -1 means 5% of the run's steps, 0 means no warmup (not used
    with ``l0_target``: the steered λ starts at ``l1_coefficient``)."""
    encoder_init_norm: float = 0.1
    """Norm of the encoder columns at init (``W_enc = encoder_init_norm · W_dec^T``); 1 is the plain transpose."""
    l0_control_steps: int = 150
    """With ``l0_target``: runs longer than this many steps steer with the integral gain scaled by
    ``l0_control_steps / total_steps`` (fewer dead latents over a long run at the same FVU; chosen by measurement:
    benchmarks/RESULTS_defaults.md); 0: the same gain at every run length."""


@register("gated", GatedConfig)
class Gated(Steered, Dictionary):
    cfg: GatedConfig
    # as ReLU's (two thirds of the run-length LR, warmup at most 10 % of the run); chosen by measurement:
    # benchmarks/RESULTS_defaults.md
    auto_train: ClassVar[dict[str, Any]] = ReLU.auto_train
    input_normalisation = "sqrt_d"
    saelens_architecture = "gated"
    sparsity_fields = ("l1_coefficient", "l0_target")

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        dtype = getattr(torch, cfg.dtype)
        with torch.no_grad():
            self.W_enc.mul_(cfg.encoder_init_norm / self.W_enc.norm(dim=0).clamp_min(1e-12))
        n = cfg.n_latents
        self.b_gate = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.l1_current = cfg.l1_coefficient
        self.init_steering(cfg.controller(cfg.l1_coefficient))

    def _init_encoder(self, w_dec: Tensor) -> None:
        """``W_enc`` (the paper's W_gate) without ``b_enc``: the gate and magnitude have their own biases."""
        super()._init_encoder(w_dec, bias=False)

    def pi(self, x: Tensor) -> Tensor:
        """``π = (x − b_dec) W_enc`` ``[B, n]`` (no bias)."""
        return self._x_in(x) @ self.W_enc

    def pre_acts(self, x: Tensor) -> Tensor:
        """Gate pre-activations ``π + b_gate`` ``[B, n]``."""
        return self.pi(x) + self.b_gate

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec as in the base class, then ``b_gate`` from the data for a sparse start (``threshold_init_l0``)."""
        super().init_from_data(x, y)
        q = self.sparse_start(x, self.b_gate)
        if q is not None:
            self.b_gate -= q

    def firing_scores(self, x: Tensor) -> Tensor:
        """The gate pre-activations, below all others where the magnitude is 0 (no shift of b_gate fires those)."""
        pi = self.pi(x)
        u = pi + self.b_gate
        return u.masked_fill((self.r_mag.exp() * pi + self.b_mag) <= 0, float(u.min()) - 1.0)

    def shift_firing(self, delta: float) -> None:
        self.b_gate -= delta

    def _code(self, pi: Tensor) -> Tensor:
        gate = (pi + self.b_gate) > 0
        mag = (self.r_mag.exp() * pi + self.b_mag).relu()
        return gate * mag

    def encode(self, x: Tensor) -> SparseCode:
        """Dense code ``values [B, n] = 1[π + b_gate > 0] · ReLU(exp(r_mag) π + b_mag)``."""
        return SparseCode(self._code(self.pi(x)), None, self.n_latents)

    # the same L1 coefficient as ReLU's: steered to l0_target, else warmed up to l1_coefficient
    on_step = ReLU.on_step
    after_step = ReLU.after_step

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Dense, or in CPU training on the open gates ``π + b_gate > 0`` only (the support of the code and
        of ``ReLU(π + b_gate)``; :func:`~sparsedict.dictionaries.active.active_pre_acts`): a sparse code."""
        self.check_input(x)
        self.keep_recent(x)
        y = x if target is None else target
        act = active_pre_acts(self, x, None, self.b_gate.detach(), gemm_dtype(x))
        if act is None:
            pi = self.pi(x)
            code = SparseCode(self._code(pi), None, self.n_latents)
            x_hat = self.decode(code, x)
            gate_act = (pi + self.b_gate).relu()
            x_aux = gate_act @ self.W_dec.detach() + self.b_dec.detach()
            l1 = gate_act.float().sum(-1).mean()
        else:
            pi = act.z
            gated = pi + self.b_gate[act.indices]
            f = (gated > 0) * (self.r_mag.exp()[act.indices] * pi + self.b_mag[act.indices]).relu()
            code = act.code(f)
            x_hat = act.reconstruct(self, f, x)
            gate_act = gated.relu()
            x_aux = act.decode(gate_act, self.W_dec.detach(), self.b_dec.detach())
            l1 = act.mean_row_sum(gate_act.float())
        # The auxiliary reconstruction goes through a frozen copy of the decoder (and skip): it trains the
        # gate path only.
        if self.W_skip is not None:
            x_aux = x_aux + x @ self.W_skip.detach().T
        losses = {
            "mse": mse_loss(x_hat, y),
            "l1": self.l1_current * l1,
            "aux": mse_loss(x_aux, y),
        }
        return Output(x_hat, code, losses)
