"""BatchTopK SAE (Bussmann, Leask, Nanda 2024) with an inference threshold and AuxK.

Training: ``a = ReLU((x − b_dec) W_enc + b_enc)``; keep the ``k·B`` largest entries of the flattened
``[B, n]`` matrix (per-token L0 varies, its batch mean is k). A token's code therefore depends on the
rest of the batch, so evaluation uses a global threshold instead: ``f = a · 1[a > θ]`` (a JumpReLU with a
single θ). Thresholding at the smallest kept activation of a batch keeps, on that batch, exactly its
top ``k·B`` entries, so θ estimates the expected minimum positive kept activation ``m_t`` of a training
batch, updated in ``after_step`` and saved in the checkpoint as the buffer ``threshold`` (−1 while unset;
an eval-mode forward with an unset θ falls back to batch top-k). θ must describe the *final* weights, so:

- only batches from ``threshold_start_step`` on enter the estimate (default: the last 20 % of the run,
  from ``int(0.8 · total_steps)``, the trainer's default LR-decay phase, where the weights move least);
  earlier batches come from weights whose activation scale differs from the final one, and the smallest
  kept activation keeps falling while the LR is high (measured: benchmarks/RESULTS_defaults.md);
- the estimate is a bias-corrected running mean: the j-th batch since the start enters with rate
  ``max(r, 1/j)`` (``θ ← (1 − ρ) θ + ρ m_t``), i.e. the plain mean of the first 1/r batches, then an EMA
  with rate r that keeps following the late weights on long runs. No single batch dominates (a plain EMA
  seeded with the first value gives it weight ``(1 − r)^(j−1)``). j is derived from the step number
  (``step − start + 1``), so a resumed run continues the same average from the checkpointed θ.

With ``threshold_calibration_rows`` > 0, θ is recalibrated at the last training step on the final weights:
the training batches of the estimate phase (up to that many of the most recent rows) are encoded again, and
θ becomes the mean over them of each batch's ``k·B``-th largest pre-activation, so on recent training rows
the mean number of latents above θ is k (what batch top-k keeps in expectation), without the lag of an
average over batches encoded by earlier weights. The running mean is θ until then (a mid-run evaluation uses
it), and the default keeps it: rows the model has just trained on fire less than new rows, so the
recalibrated θ overshoots k on held-out rows. A run that repeats its rows trains on every row before the
estimate phase sees it again, so there the trainer holds rows out of training (``TrainConfig.calibration_rows``)
and θ is set on them after the last step (:meth:`calibrate`).

Unit-norm decoder, AuxK and init as TopK (``W_enc = W_dec^T``, b_dec from a data sample), then (by default,
``encoder_scale_init``) ``W_enc`` scaled by the least-squares factor s of the per-token top-k code's
reconstruction of that sample, and the encoder's LR (``W_enc``, ``b_enc``) by the same s: the unscaled first
code overshoots the rows, most of all under batch selection, which gives rows of large norm hundreds of
latents at once.
θ is in latent units, which the export fold (``fold_scaling``) leaves unchanged, so it needs no folding.

Kernels: when :func:`sparsedict.kernels.use_triton` holds (CUDA), training selection runs on per-row
candidates from the fused :func:`~sparsedict.kernels.topk_encode` (``k_c = min(4k, 128, n)`` per row, no
``[B, n]`` tensor), takes the global top ``k·B`` among the ``B·k_c`` candidates and decodes with
:func:`~sparsedict.kernels.sparse_decode`. This equals the dense batch top-k (up to the order among
entries tied at the selection boundary) unless some row has all ``k_c`` candidates selected — then its
``k_c + 1``-th entry might also belong to the batch top-k, so the step is recomputed on the dense path.
k above 128 (the fused kernel's limit) always uses the dense path. On the CPU kernels, training selects
the batch top-k from the dense pre-activations without sorting them and runs the rest of the step on the
selected entries (:mod:`~sparsedict.dictionaries.active`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparsedict import distributed
from sparsedict.dictionaries import active
from sparsedict.dictionaries.active import Active, gemm_dtype, selected_pre_acts
from sparsedict.dictionaries.base import Dictionary, Output, SparseCode, mse_loss, register
from sparsedict.dictionaries.topk import TopK, TopKConfig, auxk_loss
from sparsedict.kernels import topk_encode, use_triton
from sparsedict.kernels.active_cpu import select_batch_topk
from sparsedict.kernels.topk_encode import MAX_K

THRESHOLD_START_FRACTION = 0.8
"""Default start of the θ estimate as a fraction of the run (``threshold_start_step = -1``)."""


@dataclass
class BatchTopKConfig(TopKConfig):
    architecture: str = "batchtopk"
    """Registered architecture name."""
    k: int = 32
    """Mean active latents per token (k·B entries are kept per batch of B tokens)."""
    threshold_rate: float = 0.01
    """Floor r of the rate of the running estimate of the inference threshold θ: the j-th batch since
    ``threshold_start_step`` enters with rate max(r, 1/j) (a plain mean for the first 1/r batches, then an
    EMA with rate r; SAELens uses a plain EMA with 0.01, dictionary_learning 0.001)."""
    threshold_start_step: int = -1
    """Training step from which θ is estimated (earlier batches are ignored); -1 means the last 20 % of
    the run (``int(0.8 · total_steps)``, from ``on_step``; 0 when no ``on_step`` call gave the run length)."""
    threshold_calibration_rows: int = 0
    """If > 0, at the last training step θ is recalibrated on the final weights from up to this many of the
    most recent training rows since ``threshold_start_step`` (whole batches, at least the last one; kept on
    the training device until then; after a resume, those seen since); 0 keeps the running mean (the default:
    on held-out rows it lands closer to k, benchmarks/RESULTS_defaults.md)."""
    encoder_scale_init: bool = True
    """Scale ``W_enc`` at initialisation by the least-squares factor s of the reconstruction of the init sample
    from the code ``encoder_scale_code`` (see :meth:`BatchTopK.fit_encoder_scale`); False keeps
    ``W_enc = W_dec^T``. On by default, with the per-token code and the encoder's LR scaled by s (chosen by
    measurement: benchmarks/RESULTS_defaults.md)."""
    encoder_scale_code: str = "token"
    """The code whose reconstruction s fits: 'token' (per-token top-k, k latents in every row) or 'batch' (the
    training selection, batch top-k). The batch code gives rows of large norm hundreds of latents, so its s
    (fitted mostly to those rows) leaves the other rows' codes too small, and short runs then end with many
    dead latents at small k."""
    encoder_scale_lr: bool = True
    """With ``encoder_scale_init``, multiply the LR of ``W_enc`` and ``b_enc`` by s, so that Adam's steps (of a
    size set by the LR, whatever the parameter's scale) stay the same relative to the scaled encoder as to the
    unscaled one; False keeps the optimiser's LR."""


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the ``k·B`` largest entries of ``acts [B, n]`` (flattened), zero the rest; differentiable.

    Returns the dense ``[B, n]`` code; gradient flows to the kept entries only.
    """
    B, n = acts.shape
    flat = acts.reshape(-1)
    vals, idx = flat.topk(min(k * B, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view(B, n)


def batch_topk_candidates(vals: Tensor, k: int, complete: bool = False) -> Tensor | None:
    """Batch top-k over per-row candidates ``vals [B, k_c]`` (each row's top ``k_c``, sorted descending).

    Returns the candidate values with the non-selected ones zeroed ``[B, k_c]`` (gradient to the kept ones),
    or None when the result might differ from the dense batch top-k: some row has all ``k_c`` candidates
    selected with a positive last one, so entries beyond its candidates could belong to the top ``k·B``.
    ``complete=True`` says the candidates are whole rows (``k_c = n``), where the selection is always exact.
    """
    B, kc = vals.shape
    keep = torch.zeros(vals.numel(), dtype=torch.bool, device=vals.device)
    keep[vals.detach().reshape(-1).topk(min(k * B, vals.numel()), sorted=False).indices] = True
    keep = keep.view(B, kc)
    if not complete and bool((keep[:, -1] & (vals[:, -1].detach() > 0)).any()):
        return None
    return vals * keep


def running_threshold_step(theta: Tensor, m: Tensor, updates: int, floor: float) -> None:
    """``θ ← (1 − ρ) θ + ρ m`` in place, ``ρ = max(floor, 1/updates)`` (ρ = 1 where θ is still unset, < 0).

    ``theta`` and ``m`` are a scalar or one entry per group (e.g. per layer); a non-finite entry of ``m`` (no
    kept activation in that group) leaves its θ unchanged.
    """
    rate = torch.where(theta < 0, torch.ones_like(theta), torch.full_like(theta, max(floor, 1.0 / updates)))
    rate = torch.where(torch.isfinite(m), rate, torch.zeros_like(rate))
    theta.mul_(1 - rate).add_(rate * torch.nan_to_num(m.to(theta.dtype), posinf=0.0))


def threshold_code(acts: Tensor, theta: Tensor) -> Tensor:
    """``acts · 1[acts > θ]`` for ``acts [B, n]`` and a scalar or ``[n]`` threshold."""
    return acts * (acts > theta.to(acts.dtype))


@register("batchtopk", BatchTopKConfig)
class BatchTopK(Dictionary):
    cfg: BatchTopKConfig
    # TopK's preset (the same encoder and decoder); chosen by measurement: benchmarks/RESULTS_defaults.md
    auto_train: ClassVar[dict[str, Any]] = TopK.auto_train
    saelens_architecture = "jumprelu"  # the inference threshold θ
    sparsity_fields = ("k",)

    def __init__(self, cfg: BatchTopKConfig):
        if cfg.encoder_scale_code not in ("token", "batch"):
            raise ValueError(f"encoder_scale_code must be 'token' or 'batch', not {cfg.encoder_scale_code!r}")
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float32))
        self._step = 0
        self._start = max(0, cfg.threshold_start_step)  # resolved from the run length in on_step
        self._updates = 0  # batches averaged into θ so far (j − 1 for the next one)
        self._total = 0  # the run length, from on_step (0: unknown)
        self._recent: list[Tensor] = []  # recent training inputs for the final calibration of θ

    def select(self, acts: Tensor) -> Tensor:
        """Training: batch top-k. Eval: the threshold θ (batch top-k while θ is unset)."""
        if self.training or float(self.threshold) < 0:
            return batch_topk(acts, self.cfg.k)
        return threshold_code(acts, self.threshold)

    def encode(self, x: Tensor) -> SparseCode:
        """Code of ``x [B, d_in]``: dense ``values [B, n]`` (zeros inactive), or on the fused path (training
        on CUDA, see the module docstring) k_c-sparse ``values, indices [B, k_c]`` with unselected zeros."""
        x_in = self._x_in(x)
        self.remember(x_in)
        if self.training and use_triton(x_in):
            code = self.fused_batch_topk(x_in)
            if code is not None:
                return code
        acts = (x_in @ self.W_enc + self.b_enc).relu()
        return SparseCode(self.select(acts), None, self.n_latents)

    def remember(self, x_in: Tensor) -> None:
        """Keep a training batch's encoder input for the final calibration of θ (from the estimate's start)."""
        if self.training and self._total and self._step >= self._start:
            self.keep_recent(x_in.detach())

    def batch_active(self, x: Tensor) -> Active | None:
        """Training on the CPU kernels: the batch top-k entries of the pre-activations, selected without a
        ``[B, n]`` sort (:func:`~sparsedict.kernels.active_cpu.select_batch_topk`), for the sparse step; None
        elsewhere (the dense or fused path)."""
        if not self.training:
            return None
        count = self.cfg.k * x.shape[0]
        cap = int(active.MAX_ACTIVE_FRACTION * x.shape[0] * self.n_latents)
        return selected_pre_acts(
            self, x, self.b_enc, lambda z: select_batch_topk(z, count, cap), gemm_dtype(x)
        )

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """The dense (or fused) forward, or in CPU training the same step on the batch top-k entries only."""
        self.check_input(x)
        act = self.batch_active(x)
        if act is None:
            return super().forward(x, target)
        self.remember(self._x_in(x))
        y = x if target is None else target
        f = act.z.relu()
        x_hat = act.reconstruct(self, f, x)
        code = act.code(f)
        losses = {"mse": mse_loss(x_hat, y)}
        losses.update(self.aux_losses(x, y, code, x_hat))
        return Output(x_hat, code, losses)

    def fused_batch_topk(self, x_in: Tensor) -> SparseCode | None:
        """Exact batch top-k from fused per-row candidates, or None where that is not exact / applicable."""
        k = self.cfg.k
        if k > MAX_K:
            return None
        kc = min(4 * k, MAX_K, self.n_latents)
        vals, idx = topk_encode(x_in, self.W_enc, self.b_enc, kc)
        kept = batch_topk_candidates(vals, k, complete=kc == self.n_latents)
        return None if kept is None else SparseCode(kept, idx, self.n_latents)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        super().init_from_data(x, y)
        if self.cfg.encoder_scale_init:
            self.fit_encoder_scale(x, x if y is None else y)

    @torch.no_grad()
    def fit_encoder_scale(self, x: Tensor, y: Tensor, rows: int = 8192) -> None:
        """``W_enc *= s`` with ``s = ⟨y − b_dec, x̂₀⟩ / ‖x̂₀‖²`` over up to ``rows`` sample rows, where ``x̂₀`` is the
        reconstruction (without b_dec) of the initial weights' code ``encoder_scale_code`` (per-token or batch
        top-k); with ``encoder_scale_lr`` s also becomes the LR factor of ``W_enc`` and ``b_enc``
        (``lr_factors``).

        The selection of that code does not change with s (b_enc is 0), so s is the exact least-squares scale
        of its reconstruction: the initial encoder's projections summed over k or more latents overshoot the
        row, and s removes that before the first step.
        """
        x, y = x[:rows], y[:rows]
        if self.cfg.encoder_scale_code == "token":
            code = SparseCode(*topk_encode(self._x_in(x), self.W_enc, self.b_enc, self.cfg.k), self.n_latents)
        else:
            was_training, total = self.training, self._total
            self.train()
            self._total = 0  # not a training batch: kept out of θ's calibration rows
            code = self.encode(x)
            self._total = total
            self.train(was_training)
        r = (y - self.b_dec).double()
        x_hat = (self.decode(code) - self.b_dec).double()
        den = float(x_hat.pow(2).sum())
        if den > 0:
            s = float((r * x_hat).sum()) / den
            if s > 0:
                self.W_enc.mul_(s)
                if self.cfg.encoder_scale_lr:
                    self.lr_factors.update(W_enc=s, b_enc=s)

    def aux_losses(self, x: Tensor, y: Tensor, code: SparseCode, x_hat: Tensor) -> dict[str, Tensor]:
        return auxk_loss(self, self._x_in(x), y - x_hat, self.cfg.aux_k or self.d_in // 2, self.cfg.aux_alpha)

    def keep_recent(self, x_in: Tensor) -> None:
        """Remember the encoder input of a training batch (whole batches, the most recent up to
        ``threshold_calibration_rows`` rows; none when that is 0)."""
        limit = self.cfg.threshold_calibration_rows
        if limit <= 0:
            return
        self._recent.append(x_in)
        while len(self._recent) > 1 and sum(len(r) for r in self._recent[1:]) >= limit:
            self._recent.pop(0)

    def on_step(self, step: int, total_steps: int) -> None:
        self._step, self._total = step, total_steps
        start = self.cfg.threshold_start_step
        self._start = int(THRESHOLD_START_FRACTION * total_steps) if start < 0 else start
        # batches before this step that entered θ: also right after a resume (θ comes from the checkpoint)
        self._updates = max(self._updates, step - self._start)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """Update θ from this batch's smallest positive kept activation (from ``threshold_start_step`` on)."""
        if not self.training or self._step < self._start:
            return
        self.update_threshold(out.code)
        if self._total and self._step == self._total - 1 and self._recent:
            self.calibrate_threshold(self._recent)
            self._recent = []

    @property
    def calibrates(self) -> bool:
        return True

    @torch.no_grad()
    def calibrate(self, batches: list[Tensor]) -> None:
        """θ from ``batches`` of inputs (:meth:`calibrate_threshold` on their encoder inputs)."""
        self.calibrate_threshold([self._x_in(x) for x in batches])

    @torch.no_grad()
    def calibrate_threshold(self, batches: list[Tensor]) -> None:
        """θ ← the mean over ``batches`` (encoder inputs ``[B, d_in]``) of each one's ``k·B``-th largest
        pre-activation under the current weights (over ranks too): recent rows then have mean L0 ≈ k at θ."""
        kth = []
        for x_in in batches:
            acts = (x_in @ self.W_enc + self.b_enc).relu().reshape(-1).float()
            kth.append(acts.topk(min(self.cfg.k * len(x_in), acts.numel()), sorted=False).values.min())
        m = distributed.all_reduce_mean(torch.stack(kth).mean())
        if float(m) > 0:
            self.threshold.fill_(float(m))

    @torch.no_grad()
    def update_threshold(self, code: SparseCode) -> None:
        """``θ ← (1 − ρ) θ + ρ · min(kept > 0)`` with ``ρ = max(r, 1/j)`` for the j-th batch (j = 1: θ = min)."""
        v = code.values.detach().float()
        pos = v[v > 0]
        if pos.numel() == 0:
            return
        m = distributed.all_reduce_mean(pos.min())  # each rank selects over its own batch: one θ for all
        self._updates += 1
        running_threshold_step(self.threshold, m, self._updates, self.cfg.threshold_rate)
