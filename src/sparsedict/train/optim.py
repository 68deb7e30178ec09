"""Optimisers and the decoder-normalised update.

:class:`DictionaryOptimizer` wraps the optimiser of one dictionary and performs the whole update:
remove the gradient component parallel to each decoder row (unit-norm architectures), clip, step,
renormalise the decoder rows. Two optimisers: Adam (bias-corrected), and sign-SGD with momentum under
the ``schedulefree`` wrapper (sparsify's default), whose evaluation point must be swapped in with
:meth:`DictionaryOptimizer.eval` before measuring or exporting. ``optimizer='auto'`` is Adam with the
architecture's preset (:func:`auto_preset`: betas, a run-length LR rule, W_dec's LR multiplier, a warmup
cap); each parameter is its own param group carrying an ``lr_scale`` that :meth:`DictionaryOptimizer.set_step`
applies to the scheduled LR, and an ``lr_factor`` the model may set at initialisation
(:meth:`DictionaryOptimizer.apply_lr_factors`).

Fused decoder update: with Adam and a unit-norm decoder, the projection, the bias-corrected Adam step
and the row renormalisation of ``W_dec`` run as one pass (:func:`sparsedict.kernels.normalised_adam_step`:
Triton on CUDA, numba on CPU for fp32), its state kept in the torch optimiser's ``state[W_dec]`` with
torch's layout, so checkpoints are the same either way. Without Triton/numba the unfused sequence is used.

Schedule-free (``signum_sf``): in train mode the parameters hold the gradient point ``y``; the wrapper
keeps ``z`` in its state and the evaluation point ``x = (y − (1−β) z)/β`` is swapped in by :meth:`eval`
(:meth:`set_step` swaps back before the next forward). The decoder rows are renormalised at ``y`` after each
step (as sparsify does), so ``x``'s rows are near, not exactly, unit norm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsedict import distributed
from sparsedict.train.config import TrainConfig
from sparsedict.train.schedule import BUDGET_MAX_STEPS, budget_lr, lr_factor, width_lr

DEFAULT_WARMUP = 100
"""LR warmup steps when ``TrainConfig.warmup_steps`` is -1 (an 'auto' preset may cap it to a fraction of the run)."""


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


def _schedule_free(base: torch.optim.Optimizer, momentum: float):
    """``schedulefree.ScheduleFreeWrapper`` whose x/z swap exchanges storages instead of XOR-ing bytes.

    The package swaps ``z`` and the parameter with three in-place XOR passes (to be safe for any
    tensor); exchanging the two tensors' ``.data`` is the same swap with no pass over memory (the
    parameter object, its ``.grad`` and the state dict entries keep their identity).
    """
    import schedulefree

    class _Wrapper(schedulefree.ScheduleFreeWrapper):
        @staticmethod
        def swap(x: torch.Tensor, y: torch.Tensor) -> None:
            x.data, y.data = y.data, x.data

    return _Wrapper(base, momentum=momentum)


def auto_preset(model: nn.Module, name: str) -> dict:
    """The training preset that ``optimizer='auto'`` applies: ``model.auto_train`` (empty otherwise).

    Keys: ``betas``, ``lr_rule`` ('budget': :func:`~sparsedict.train.schedule.budget_lr`; else the width
    rule), ``budget_scale`` (a factor on the run-length rule's LR), ``lr_dec_scale`` (W_dec's LR multiplier) and ``warmup_fraction`` (warmup capped to this
    fraction of the run). Explicit TrainConfig values (lr, betas, lr_dec_scale, warmup_steps) take precedence.
    """
    return dict(getattr(model, "auto_train", {})) if name == "auto" else {}


class DictionaryOptimizer:
    """Optimiser + schedule + decoder normalisation for one dictionary.

    ``fused``: None picks the one-pass decoder update where it is faster (Adam, unit-norm decoder, Triton
    usable for W_dec, or the numba CPU kernels for an fp32 W_dec); True/False force it on/off (without
    either, True runs the torch reference of the fused step).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, fused: bool | None = None):
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.name = "adam" if cfg.optimizer == "auto" else cfg.optimizer  # 'auto': Adam with the preset
        preset = auto_preset(model, cfg.optimizer)
        if cfg.lr:
            self.base_lr, lr_from = cfg.lr, "set in the config"
        elif preset.get("lr_rule") == "budget" and total_steps <= BUDGET_MAX_STEPS:
            scale = preset.get("budget_scale", 1.0)
            self.base_lr = scale * budget_lr(model.n_latents, total_steps, cfg.batch_size)
            lr_from = (f"'auto' run-length rule{f' x {scale:.3g}' if scale != 1 else ''}: {total_steps} steps "
                       f"of {cfg.batch_size}, {model.n_latents} latents")  # fmt: skip
        elif preset.get("lr_rule") == "budget":  # beyond the run lengths the rule was measured on
            self.base_lr = width_lr(model.n_latents, self.name)
            lr_from = (f"width rule: {model.n_latents} latents; the 'auto' run-length rule is measured up to "
                       f"{BUDGET_MAX_STEPS} steps, this run has {total_steps}")  # fmt: skip
        else:
            self.base_lr = width_lr(model.n_latents, self.name)
            lr_from = f"width rule: {model.n_latents} latents"
        if cfg.warmup_steps >= 0:
            self.warmup_steps, warmup_from = cfg.warmup_steps, "set in the config"
        elif "warmup_fraction" in preset:
            cap = math.ceil(preset["warmup_fraction"] * total_steps)
            self.warmup_steps = min(DEFAULT_WARMUP, cap)
            warmup_from = (
                f"default {DEFAULT_WARMUP}, 'auto' cap {preset['warmup_fraction']:.0%} of the run = {cap}"
            )
        else:
            self.warmup_steps, warmup_from = DEFAULT_WARMUP, "default"
        betas = tuple(cfg.betas or preset.get("betas", (0.9, 0.999)))
        dec_scale = cfg.lr_dec_scale or preset.get("lr_dec_scale", 1.0)

        def source(explicit: object, key: str) -> str:
            return "set in the config" if explicit else ("'auto' preset" if key in preset else "default")

        self.settings = {"optimizer": self.name, "lr": self.base_lr, "lr_from": lr_from, "lr_dec_scale": dec_scale,
                         "lr_dec_from": source(cfg.lr_dec_scale, "lr_dec_scale"), "betas": betas,
                         "betas_from": source(cfg.betas, "betas"), "warmup_steps": self.warmup_steps,
                         "warmup_from": warmup_from}  # fmt: skip
        """What this run gets and where each value comes from (:meth:`describe`)."""
        # one param group per parameter with its LR multipliers (``lr_scale``: W_dec's lr_dec_scale;
        # ``lr_factor``: the model's, from apply_lr_factors), so set_step can scale
        params = [
            {"params": [p], "name": name, "lr_scale": dec_scale if name == "W_dec" else 1.0, "lr_factor": 1.0}
            for name, p in model.named_parameters()
            if p.requires_grad
        ]
        if self.name == "adam":
            # torch's fused Adam: one vectorised pass per parameter on CPU (3-4x the foreach ops,
            # same results to 1e-10; benchmarks/RESULTS_training.md); foreach elsewhere
            cpu = all(p.device.type == "cpu" and p.is_floating_point() for p in model.parameters())
            kind = {"fused": True} if cpu else {"foreach": True}
            self.opt = torch.optim.Adam(params, lr=self.base_lr, betas=betas, eps=cfg.eps, **kind)
        else:
            self.opt = _schedule_free(SignSGD(params, lr=self.base_lr), cfg.momentum)
            self.opt.train()
        self.schedule_free = self.name != "adam"
        self.fused_param = self._fused_decoder(fused)

    def apply_lr_factors(self) -> None:
        """Take the model's ``lr_factors`` (by parameter name, set by ``init_from_data``) into the param groups:
        call after it. Rank 0's factors are used on every rank (as its initial weights are); they are then part
        of the optimiser's state, so a resumed run keeps them."""
        factors = getattr(self.model, "lr_factors", {})
        groups = self.opt.param_groups
        f = torch.tensor([float(factors.get(g.get("name", ""), 1.0)) for g in groups], dtype=torch.float64,
                         device=groups[0]["params"][0].device)  # fmt: skip
        distributed.broadcast_tensors([f])
        for group, value in zip(groups, f.tolist(), strict=True):
            group["lr_factor"] = value

    def describe(self) -> str:
        """One line: the optimiser, LR (and W_dec's), betas and warmup this run gets, with their sources."""
        s = self.settings
        lr = f"lr {s['lr']:.3g} ({s['lr_from']})"
        if s["lr_dec_scale"] != 1.0:
            lr += f", W_dec lr {s['lr'] * s['lr_dec_scale']:.3g} (x{s['lr_dec_scale']:g}, {s['lr_dec_from']})"
        for group in self.opt.param_groups:
            if group.get("lr_factor", 1.0) != 1.0:
                lr += f", {group.get('name', '?')} lr x{group['lr_factor']:.3g} (set at init)"
        if self.schedule_free:
            return f"{s['optimizer']}, {lr}, constant (schedule-free), momentum {self.cfg.momentum:g}"
        decay = (
            f", decay to 0 over the last {self.cfg.decay_fraction:.0%}" if self.cfg.decay_fraction > 0 else ""
        )
        betas = ", ".join(f"{b:g}" for b in s["betas"])
        return (f"{s['optimizer']}, {lr}, betas ({betas}) ({s['betas_from']}), warmup {s['warmup_steps']} steps ({s['warmup_from']})"
                f"{decay} of {self.total_steps} steps")  # fmt: skip

    def _fused_decoder(self, fused: bool | None) -> nn.Parameter | None:
        """W_dec when its update runs through ``normalised_adam_step``; None for the unfused sequence."""
        from sparsedict.kernels import use_triton
        from sparsedict.kernels._common import use_cpu_kernels

        m = self.model
        w = getattr(m, "W_dec", None)
        eligible = (
            not self.schedule_free
            and m.unit_norm_decoder
            and isinstance(w, nn.Parameter)
            and w.requires_grad
            and w.ndim == 2
            # the fused step reproduces the base class's projection/renormalisation, not overrides of them
            and m.fused_decoder_update
        )
        if not eligible:
            if fused:
                raise ValueError(
                    "fused decoder update needs Adam and a Dictionary with a unit-norm W_dec [n, d]"
                )
            return None
        if fused is None:
            fused = use_triton(w) or (use_cpu_kernels(w) and w.dtype == torch.float32)
        return w if fused else None

    def set_step(self, step: int) -> float:
        """Set the LR for ``step`` (call before the forward); puts a schedule-free optimiser in train mode."""
        if self.schedule_free:
            self.opt.train()  # no-op unless eval() swapped the evaluation point in
            lr = self.base_lr
        else:
            lr = self.base_lr * lr_factor(step, self.total_steps, self.warmup_steps, self.cfg.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * group.get("lr_factor", 1.0)
        return lr

    def step(self) -> float:
        """Project, clip, step, renormalise. Returns the global gradient norm (before clipping).

        With the fused decoder update and no clipping, the returned norm is taken before W_dec's gradient
        is projected (the projection happens inside the fused step).
        """
        unit = self.model.unit_norm_decoder
        fused = self.fused_param
        if unit and (fused is None or self.cfg.grad_clip > 0):
            self.model.remove_parallel_grad()
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        else:  # logged every step (wandb/JSONL); norm only, gradients untouched
            grad_norm = float(
                torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            )
        if fused is not None and fused.grad is not None:
            from sparsedict.kernels import normalised_adam_step

            g, fused.grad = fused.grad, None  # torch's Adam skips parameters without a gradient
            self.opt.step()
            fused.grad = g
            group = next(gr for gr in self.opt.param_groups if any(p is fused for p in gr["params"]))
            normalised_adam_step(fused, self.opt.state[fused], lr=group["lr"], betas=group["betas"],
                                 eps=group["eps"], weight_decay=group["weight_decay"])  # fmt: skip
        else:
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
