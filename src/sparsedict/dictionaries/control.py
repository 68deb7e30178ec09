"""A controller that steers a sparsity coefficient to a target L0 during training, then freezes it.

Architectures whose sparsity is set by a penalty coefficient λ (ReLU and Gated's L1, JumpReLU's L0) reach a
requested L0 only for one λ, which depends on the data, the width and the run. With ``l0_target`` set they
hand λ to :class:`L0Controller`: after every optimiser step it reads the batch's mean L0 (averaged over
ranks, so every replica holds the same λ) and moves ``log λ`` by a velocity-form PI step on the log error
``e = log(L0 / target)``:

``log λ ← log λ + k_i · e_t + k_p · (e_t − e_{t−1})``, each step's change clipped to ``±max_step``.

The proportional term damps the loop: while L0 is already falling fast toward the target λ stops rising
(the encoder needs many steps to follow a change of λ, and a pure integral step would overshoot). From
``int(freeze_fraction · total_steps)`` on, λ is frozen, so the end of the run (the LR decay) trains one
fixed objective. The state (λ, the last error, whether it is frozen) is part of the training checkpoint
(:meth:`state_dict`), so a resumed run continues exactly. Defaults and their measurements:
benchmarks/RESULTS_defaults.md.
"""

from __future__ import annotations

import math
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

    def controller(self, coefficient: float) -> L0Controller | None:
        """The controller for these fields starting at ``coefficient`` (None when no target is set)."""
        if self.l0_target <= 0:
            return None
        return L0Controller(self.l0_target, coefficient, self.l0_control_gain, self.l0_control_damping,
                            self.l0_freeze_fraction)  # fmt: skip


class L0Controller:
    """Steer coefficient λ so the training L0 meets ``target`` until ``freeze_fraction`` of the run."""

    def __init__(self, target: float, coefficient: float, k_i: float, k_p: float, freeze_fraction: float,
                 max_step: float = 0.1) -> None:  # fmt: skip
        if target <= 0 or coefficient <= 0:
            raise ValueError(f"l0_target ({target}) and the starting coefficient ({coefficient}) must be > 0")
        if not 0.0 <= freeze_fraction <= 1.0:
            raise ValueError(f"l0_freeze_fraction must be in [0, 1], got {freeze_fraction}")
        self.target, self.k_i, self.k_p = float(target), float(k_i), float(k_p)
        self.freeze_fraction, self.max_step = float(freeze_fraction), float(max_step)
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
        delta = self.k_i * error + (0.0 if self.last_error is None else self.k_p * (error - self.last_error))
        self.log_coefficient += max(-self.max_step, min(self.max_step, delta))
        self.last_error = error

    def state_dict(self) -> dict[str, float | None]:
        return {"log_coefficient": self.log_coefficient, "last_error": self.last_error}

    def load_state_dict(self, state: dict) -> None:
        self.log_coefficient = float(state["log_coefficient"])
        self.last_error = None if state["last_error"] is None else float(state["last_error"])


class Steered:
    """Mixin for a :class:`~sparsedict.dictionaries.base.Dictionary` whose penalty coefficient may be steered:
    call :meth:`init_steering` in ``__init__``, take :meth:`steered_coefficient` in ``on_step`` (None: not
    steered) and call :meth:`steer` in ``after_step``. The controller's state is the model's ``train_state``."""

    l0_controller: L0Controller | None

    def init_steering(self, controller: L0Controller | None) -> None:
        self.l0_controller = controller
        self._step, self._total = 0, 0

    def steered_coefficient(self, step: int, total_steps: int) -> float | None:
        """The coefficient for training step ``step`` when steered (None otherwise)."""
        self._step, self._total = step, total_steps
        return None if self.l0_controller is None else self.l0_controller.coefficient

    def steer(self, out: Any) -> None:
        """One control step from a training step's output (nothing outside training or when not steered)."""
        if self.l0_controller is not None and self.training:
            self.l0_controller.update(out.code.values, self._step, self._total)

    def train_state(self) -> dict[str, Any]:
        return {} if self.l0_controller is None else {"l0_controller": self.l0_controller.state_dict()}

    def load_train_state(self, state: dict[str, Any]) -> None:
        if self.l0_controller is not None and "l0_controller" in state:
            self.l0_controller.load_state_dict(state["l0_controller"])
