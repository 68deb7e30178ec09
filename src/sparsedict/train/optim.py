"""Optimisers and the decoder-normalised update.

:class:`DictionaryOptimizer` wraps the optimiser of one dictionary and performs the whole update:
remove the gradient component parallel to each decoder row (unit-norm architectures), clip, step,
renormalise the decoder rows. Two optimisers: Adam (bias-corrected), and sign-SGD with momentum under
the ``schedulefree`` wrapper (sparsify's default), whose evaluation point must be swapped in with
:meth:`DictionaryOptimizer.eval` before measuring or exporting.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedict.train.config import TrainConfig
from sparsedict.train.schedule import lr_factor, width_lr


class SignSGD(torch.optim.Optimizer):
    """``p -= lr · sign(g)``: the base optimiser that the schedule-free wrapper turns into Signum."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class DictionaryOptimizer:
    """Optimiser + schedule + decoder normalisation for one dictionary."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int):
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.base_lr = cfg.lr or width_lr(model.n_latents, cfg.optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=self.base_lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
        else:
            import schedulefree

            self.opt = schedulefree.ScheduleFreeWrapper(SignSGD(params, lr=self.base_lr), momentum=cfg.momentum)
            self.opt.train()
        self.schedule_free = cfg.optimizer != "adam"

    def set_step(self, step: int) -> float:
        if self.schedule_free:
            lr = self.base_lr
        else:
            lr = self.base_lr * lr_factor(step, self.total_steps, self.cfg.warmup_steps, self.cfg.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> float:
        """Project, clip, step, renormalise. Returns the global gradient norm (before clipping)."""
        unit = getattr(self.model, "unit_norm_decoder", False)
        if unit:
            self.model.remove_parallel_grad()
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        else:  # logged every step (wandb/JSONL); norm only, gradients untouched
            grad_norm = float(
                torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            )
        self.opt.step()
        if unit:
            self.model.normalise_decoder()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def eval(self) -> None:
        """Swap in the evaluation point (schedule-free averages); a no-op for Adam."""
        if self.schedule_free:
            self.opt.eval()

    def train(self) -> None:
        if self.schedule_free:
            self.opt.train()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
