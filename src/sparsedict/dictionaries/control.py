"""A controller that steers a sparsity coefficient to a target L0 during training, then freezes it.

Architectures whose sparsity is set by a penalty coefficient λ (ReLU and Gated's L1, JumpReLU's L0) reach a
requested L0 only for one λ, which depends on the data, the width and the run. With ``l0_target`` set they
hand λ to :class:`L0Controller`: after every optimiser step it reads the batch's mean L0 (averaged over
ranks, so every replica holds the same λ) and moves ``log λ`` by a velocity-form PI step on the log error
``e = log(L0 / target)``:

``log λ ← log λ + k_i · e_t + k_p · (e_t − e_{t−1})``, each step's change clipped to ``±max_step`` (with
``l0_control_steps`` set, k_i shrinks in proportion in runs longer than that).

The proportional term damps the loop: while L0 is already falling fast toward the target λ stops rising
(the encoder needs many steps to follow a change of λ, and a pure integral step would overshoot). From
``int(freeze_fraction · total_steps)`` on, λ is frozen, so the end of the run (the LR decay) trains one
fixed objective. The state (λ, the last error, whether it is frozen) is part of the training checkpoint
(:meth:`state_dict`), so a resumed run continues exactly.

In a short run the L0 follows λ only over tens of steps, so two more pieces make the target land:

- a sparse start (:func:`firing_quantiles`): each latent's firing threshold (ReLU ``b_enc``, Gated ``b_gate``,
  JumpReLU θ) starts at the quantile of its initial pre-activations that makes it fire on a given fraction of
  the sample, instead of half the latents firing on every token;
- a final calibration (:meth:`Steered.calibrate_l0`): at the last step every latent's firing threshold moves by
  one common shift so the frozen phase's most recent training rows have mean L0 = the target under the final
  weights; a run that repeats its rows calibrates instead on rows the trainer held out of training
  (``TrainConfig.calibration_rows``: rows trained on fire fewer latents than new rows).

Defaults and their measurements: benchmarks/RESULTS_defaults.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparsedict import distributed


@dataclass
class L0TargetFields:
    """Config fields of an architecture whose penalty coefficient can be steered to a target L0 (a mixin)."""

    l0_target: float = 0.0
    """If > 0, the penalty coefficient is steered during training so the training L0 meets this target (the
    configured coefficient is the starting value), then frozen at ``l0_freeze_fraction`` of the run."""
    l0_freeze_fraction: float = 0.8
    """Fraction of the run after which the steered coefficient stays fixed (0.8: the start of the default LR
    decay)."""
    l0_control_gain: float = 0.05
    """Integral gain k_i of the controller: ``log λ`` moves by k_i · log(L0 / target) per step."""
    l0_control_damping: float = 1.0
    """Proportional gain k_p on the change of the log error (damping)."""
    l0_control_steps: int = 0
    """If > 0, a run longer than this many steps steers with the integral gain scaled by
    ``l0_control_steps / total_steps``, so λ settles over the same fraction of a longer run; 0: the same gain at
    every run length."""
    threshold_init_l0: float = -1.0
    """Data-driven sparse start: if > 0, ``init_from_data`` sets each latent's firing threshold to the
    ``1 − threshold_init_l0/n`` quantile of its initial pre-activations on the sample (:func:`firing_quantiles`),
    so the initial L0 ≈ threshold_init_l0 with every latent alive. -1 means the architecture's multiple of
    ``l0_target`` (``Steered.init_l0_factor``) when that is set, else off; 0 means off."""
    l0_calibration_rows: int = 8192
    """With ``l0_target``: at the last training step the firing threshold is shifted on the final weights so
    the most recent training rows (up to this many, from the frozen phase) have mean L0 = ``l0_target``
    (:meth:`Steered.calibrate_l0`); 0 leaves the trained threshold."""

    def controller(self, coefficient: float) -> L0Controller | None:
        """The controller for these fields starting at ``coefficient`` (None when no target is set)."""
        if self.l0_target <= 0:
            return None
        return L0Controller(self.l0_target, coefficient, self.l0_control_gain, self.l0_control_damping,
                            self.l0_freeze_fraction, gain_steps=self.l0_control_steps)  # fmt: skip


class L0Controller:
    """Steer coefficient λ so the training L0 meets ``target`` until ``freeze_fraction`` of the run."""

    def __init__(self, target: float, coefficient: float, k_i: float, k_p: float, freeze_fraction: float,
                 max_step: float = 0.1, gain_steps: int = 0) -> None:  # fmt: skip
        if target <= 0 or coefficient <= 0:
            raise ValueError(f"l0_target ({target}) and the starting coefficient ({coefficient}) must be > 0")
        if not 0.0 <= freeze_fraction <= 1.0:
            raise ValueError(f"l0_freeze_fraction must be in [0, 1], got {freeze_fraction}")
        self.target, self.k_i, self.k_p = float(target), float(k_i), float(k_p)
        self.freeze_fraction, self.max_step = float(freeze_fraction), float(max_step)
        self.gain_steps = int(gain_steps)
        self.log_coefficient = math.log(coefficient)
        self.last_error: float | None = None

    @property
    def coefficient(self) -> float:
        return math.exp(self.log_coefficient)

    def frozen(self, step: int, total_steps: int) -> bool:
        return step >= int(self.freeze_fraction * total_steps)

    @torch.no_grad()
    def update(self, code_values: Tensor, step: int, total_steps: int) -> None:
        """One control step from the code of training step ``step`` (``[B, n]`` or ``[B, k]`` values)."""
        if self.frozen(step, total_steps):
            return
        l0 = (code_values.detach() != 0).sum(-1).float().mean()
        l0 = float(distributed.all_reduce_mean(l0))
        error = math.log(max(l0, 1e-2) / self.target)
        k_i = self.k_i * min(1.0, self.gain_steps / total_steps) if self.gain_steps > 0 else self.k_i
        delta = k_i * error + (0.0 if self.last_error is None else self.k_p * (error - self.last_error))
        self.log_coefficient += max(-self.max_step, min(self.max_step, delta))
        self.last_error = error

    def state_dict(self) -> dict[str, float | None]:
        return {"log_coefficient": self.log_coefficient, "last_error": self.last_error}

    def load_state_dict(self, state: dict) -> None:
        self.log_coefficient = float(state["log_coefficient"])
        self.last_error = None if state["last_error"] is None else float(state["last_error"])


@torch.no_grad()
def firing_quantiles(scores: Callable[[slice], Tensor], n: int, rows: int, l0: float) -> Tensor:
    """Per latent, the value of ``scores(cols) [rows, len(cols)]`` exceeded on ``l0 / n`` of the rows ``[n]``.

    Shifting latent i's firing threshold to this value makes it fire on ``l0 / n`` of the sample, so the mean L0
    is ``l0`` with every latent alive (the data-driven sparse start). Columns go 4096 at a time (bounded memory).
    """
    if not 0 < l0 < n:
        raise ValueError(f"the initial L0 ({l0}) must be in (0, n_latents = {n})")
    k = max(1, min(rows, math.ceil((1.0 - l0 / n) * rows)))
    return torch.cat([scores(slice(s, min(s + 4096, n))).float().kthvalue(k, dim=0).values
                      for s in range(0, n, 4096)])  # fmt: skip


class Steered:
    """Mixin for a :class:`~sparsedict.dictionaries.base.Dictionary` whose penalty coefficient may be steered:
    call :meth:`init_steering` in ``__init__``, take :meth:`steered_coefficient` in ``on_step`` (None: not
    steered) and call :meth:`steer` in ``after_step``. The controller's state is the model's ``train_state``."""

    l0_controller: L0Controller | None
    init_rows: int = 8192
    """At most this many sample rows are used for the data-driven sparse start."""
    init_l0_factor: float = 1.0
    """``threshold_init_l0 = -1`` starts at this multiple of ``l0_target``."""

    def init_steering(self, controller: L0Controller | None) -> None:
        self.l0_controller = controller
        self._step, self._total = 0, 0
        self._recent: list[Tensor] = []  # training inputs of the frozen phase, for the final calibration

    def init_l0(self) -> float:
        """The L0 of the data-driven sparse start (0: none), from ``threshold_init_l0`` and ``l0_target``."""
        l0 = self.cfg.threshold_init_l0
        return self.init_l0_factor * self.cfg.l0_target if l0 < 0 else l0

    @torch.no_grad()
    def sparse_start(self, x: Tensor, bias: Tensor) -> Tensor | None:
        """:func:`firing_quantiles` of ``x_in W_enc + bias`` on the first ``init_rows`` rows of the sample ``x``, for
        an initial L0 of :meth:`init_l0` (None when that is 0)."""
        l0 = self.init_l0()
        if l0 <= 0:
            return None
        x_in = self._x_in(x[: self.init_rows].to(self.W_enc.dtype))
        q = firing_quantiles(lambda c: x_in @ self.W_enc[:, c] + bias[c], self.n_latents, len(x_in), l0)
        return q.to(bias.dtype)

    def firing_scores(self, x: Tensor) -> Tensor:
        """``[B, n]`` scores of ``x``: latent i fires where its score is > 0 (implemented by the architecture)."""
        raise NotImplementedError

    def shift_firing(self, delta: float) -> None:
        """Raise every latent's firing threshold by ``delta`` in score units (implemented by the architecture)."""
        raise NotImplementedError

    def keep_recent(self, x: Tensor) -> None:
        """Remember a training batch's input in the frozen phase (the most recent, up to
        ``l0_calibration_rows`` rows, whole batches) for :meth:`calibrate_l0`."""
        c, limit = self.l0_controller, getattr(self.cfg, "l0_calibration_rows", 0)
        if (
            c is None
            or limit <= 0
            or not self.training
            or not self._total
            or not c.frozen(self._step, self._total)
        ):
            return
        self._recent.append(x.detach())
        while len(self._recent) > 1 and sum(len(r) for r in self._recent[1:]) >= limit:
            self._recent.pop(0)

    @torch.no_grad()
    def calibrate_l0(self, batches: list[Tensor]) -> None:
        """Shift the firing threshold so ``batches`` (N rows in all) have mean L0 = the target under the current
        weights: to the cut between their ``target·N`` largest firing scores and the rest (the midpoint of the
        ``target·N``-th and the next, pooled over the batches: each batch's top ``target·N + 1`` scores contain the
        pooled ones), averaged over ranks."""
        k = max(1, round(self.l0_controller.target * sum(len(x) for x in batches)))
        top = []
        for x in batches:
            s = self.firing_scores(x).reshape(-1).float()
            top.append(s.topk(min(k + 1, s.numel())).values)
        top = torch.cat(top)
        cut = top.topk(min(k + 1, top.numel())).values[-2:].mean()
        self.shift_firing(float(distributed.all_reduce_mean(cut)))

    @property
    def calibrates(self) -> bool:
        """Steered to ``l0_target`` with the final calibration on (``l0_calibration_rows`` > 0)."""
        return self.l0_controller is not None and getattr(self.cfg, "l0_calibration_rows", 0) > 0

    def calibrate(self, batches: list[Tensor]) -> None:
        """The final L0 calibration (:meth:`calibrate_l0`) on ``batches`` instead of the last training rows."""
        self.calibrate_l0(batches)

    def steered_coefficient(self, step: int, total_steps: int) -> float | None:
        """The coefficient for training step ``step`` when steered (None otherwise)."""
        self._step, self._total = step, total_steps
        return None if self.l0_controller is None else self.l0_controller.coefficient

    def steer(self, out: Any) -> None:
        """One control step from a training step's output (nothing outside training or when not steered)."""
        if self.l0_controller is not None and self.training:
            self.l0_controller.update(out.code.values, self._step, self._total)
            if self._total and self._step == self._total - 1 and self._recent:
                self.calibrate_l0(self._recent)
                self._recent = []

    def train_state(self) -> dict[str, Any]:
        return {} if self.l0_controller is None else {"l0_controller": self.l0_controller.state_dict()}

    def load_train_state(self, state: dict[str, Any]) -> None:
        if self.l0_controller is not None and "l0_controller" in state:
            self.l0_controller.load_state_dict(state["l0_controller"])
