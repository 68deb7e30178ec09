"""Cross-layer transcoder (CLT; Anthropic, "Circuit Tracing", 2025): features read one layer, write to every later one.

Over a contiguous block range ``layers = [ℓ_0, …, ℓ_{L−1}]`` (positions ``i = 0 … L−1``), layer i's ``F``
features read that layer's input ``x_i`` (``hookpoint``, e.g. ``mlp_in``: the MLP input after its norm) and
write to the output ``y_j`` (``target``, e.g. ``mlp_out``) of every layer ``j ≥ i``:

    z_i = x_i W_enc[i] + b_enc[i]                                   W_enc [L, d_in, F], b_enc [L, F]
    f_i = σ(z_i)                                                    per layer, see below
    ŷ_j = Σ_{i ≤ j} f_i W_dec[i][:, j − i] + b_dec[j] (+ x_j W_skip[j]ᵀ)   W_dec[i] [F, L − i, d_out]

so there are L(L+1)/2 decoder blocks (``W_dec`` is a list of L tensors, the layout circuit-tracer stores).
Batches are ``x [B, L, d_in]``, ``y [B, L, d_out]`` (a source of several hookpoints). The code is one
:class:`SparseCode` over the ``L·F`` latents, layer i's at ``[i·F, (i+1)·F)``, so the trainer's dead-latent
counters and its L0 (active features per token over all layers) apply unchanged; :meth:`new_stats` gives the
per-layer FVU and L0 (:class:`~sparsedict.metrics.LayerwiseStats`). ``cfg.n_latents`` is F, the features per
layer (circuit-tracer's ``d_transcoder``); the model's ``n_latents`` is the total ``L·F``.

Loss: ``Σ_j mean_t ‖y_j − ŷ_j‖² / v_j`` with ``v_j = mean_t ‖y_j − ȳ_j‖²`` the variance of target j measured on
the initialisation sample (buffer ``target_variance``): each layer weighs as its FVU, so layers with large MLP
outputs do not dominate.

Activations (``activation``), each layer's features competing among themselves:

- ``topk``: the k largest ReLU'd pre-activations of each layer per token (the TopK SAE's ``topk_encode``);
- ``batchtopk``: per layer, the ``k·B`` largest of the batch (``batchtopk.batch_topk``); in eval mode a
  threshold θ per layer, ``f = z · 1[z > θ]``, estimated as BatchTopK does (running mean of the smallest kept
  activation from ``threshold_start_step`` on). :meth:`CLT.to_jumprelu` turns it into the equal JumpReLU CLT
  (θ per feature), the form circuit-tracer reads;
- ``jumprelu``: ``f = z · H(z − θ)`` with θ per feature (``jumprelu.JumpReLUFn`` and its straight-through
  estimator, whose gradient to θ comes from every pre-activation near θ, so training decodes the code densely), plus Circuit Tracing's tanh sparsity penalty ``λ_S Σ tanh(c · f · ‖W_dec,f‖)`` and pre-activation
  loss ``λ_P Σ ReLU(θ − z) ‖W_dec,f‖``, where ``‖W_dec,f‖`` is the norm of feature f's decoder rows
  concatenated over all the layers it writes to; θ is kept ≥ 0 while training, but a loaded θ < 0 acts as
  written (``z · 1[z > θ]``, no ReLU: circuit-tracer's JumpReLU);
- ``relu``: ``f = ReLU(z)`` with the tanh penalty (no threshold, no pre-activation loss).

TopK and BatchTopK keep every feature's concatenated decoder row at unit norm and add AuxK over the dead
features (their top ``aux_k`` pre-activations per layer, decoded without bias to all their layers, fitted to the
residual, each layer normalised by the residual's batch variance); JumpReLU and ReLU leave the decoder free
(the penalties weigh the activations by the decoder norms). Optional skip connection per target layer:
``W_skip [L, d_out, d_in]``, zero-initialised.

Latent sharding (``train.shard_latents``): :class:`ShardedCLT` holds ``F / R`` features of every layer on
each rank (the machinery of :mod:`sparsedict.dictionaries.sharded`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from sparsedict import distributed as dist
from sparsedict.dictionaries.attach import LayeredAttachment
from sparsedict.dictionaries.base import (
    Dictionary,
    DictionaryConfig,
    LayerRange,
    Output,
    SparseCode,
    build,
    geometric_median,
    register,
)
from sparsedict.dictionaries.batchtopk import (
    THRESHOLD_START_FRACTION,
    batch_topk,
    running_threshold_step,
    threshold_code,
)
from sparsedict.dictionaries.jumprelu import JumpReLUFn
from sparsedict.dictionaries.relu import warmup_factor
from sparsedict.dictionaries.sharded import global_topk
from sparsedict.dictionaries.topk import TopK
from sparsedict.distributed import CopyToShards, ReduceFromShards
from sparsedict.kernels import sparse_decode, topk_encode
from sparsedict.metrics import LayerwiseStats, layer_code

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
SPARSE_FRACTION = 8
"""A layer's code is decoded sparsely when its densest row holds at most ``F / SPARSE_FRACTION`` features."""


@dataclass
class CLTConfig(DictionaryConfig):
    architecture: str = "clt"
    """Registered architecture name."""
    hookpoint: str = "mlp_in"
    """Input of every layer: an alias kind (``mlp_in`` -> ``mlp_in.{layer}``) or a template with ``{layer}``."""
    target: str = "mlp_out"
    """Output of every layer the features write to (alias kind or ``{layer}`` template)."""
    n_latents: int = 0
    """Features per layer F (0 means ``expansion * d_in``); the CLT has ``len(layers) · F`` in all."""
    apply_b_dec_to_input: bool = False
    """Not used: a CLT reads its inputs as they are (no b_dec subtraction)."""
    b_dec_init: str = "mean"
    """Initialise each layer's b_dec from a data sample: 'mean', 'median' (geometric) or 'zero'."""
    activation: str = "batchtopk"
    """'topk', 'batchtopk' (BatchTopK training, threshold θ per layer in eval), 'jumprelu' or 'relu'."""
    k: int = 32
    """topk: active features per token in each layer; batchtopk: their batch mean; jumprelu: the initial
    L0 per layer of the data-driven thresholds (see ``threshold_init_l0``)."""
    aux_k: int = 0
    """Dead features per layer used by AuxK (topk/batchtopk); 0 means d_in // 2."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss (0 turns it off)."""
    threshold_rate: float = 0.01
    """batchtopk: floor of the rate of the running estimate of θ (as BatchTopK's ``threshold_rate``)."""
    threshold_start_step: int = -1
    """batchtopk: step from which θ is estimated; -1 means the last 20 % of the run."""
    sparsity_coefficient: float = 1e-3
    """λ_S of the tanh sparsity penalty (jumprelu, relu), per token, summed over features and layers."""
    tanh_scale: float = 4.0
    """c in ``tanh(c · f · ‖W_dec,f‖)``."""
    preact_coefficient: float = 3e-6
    """λ_P of the pre-activation loss ``ReLU(θ − z) ‖W_dec,f‖`` (jumprelu; revives features that never fire)."""
    sparsity_warmup_steps: int = -1
    """Steps over which λ_S rises linearly from 0: -1 means 5 % of the run's steps, 0 means no warmup."""
    threshold_init: float = 0.001
    """jumprelu: θ of every feature when ``threshold_init_l0`` is off (activation units of the input)."""
    threshold_init_l0: float = -1.0
    """jumprelu: if > 0, ``init_from_data`` puts feature f's θ at the quantile of its initial pre-activations
    that makes it fire on ``threshold_init_l0 / F`` of the sample (initial L0 per layer ≈ this); -1 means k,
    0 means off."""
    bandwidth: float = 0.05
    """ε of the rectangle kernel of JumpReLU's straight-through estimator (activation units)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        self.layers = [int(layer) for layer in self.layers]


def compact(f: Tensor) -> SparseCode:
    """A dense layer code ``f [B, F]`` as a k-sparse one (k = the most features any row holds), or dense
    when that is more than ``F / SPARSE_FRACTION`` (a GEMM is cheaper then). Differentiable in the values."""
    n = f.shape[1]
    k = int((f.detach() != 0).sum(1).max()) if f.numel() else 0
    if k * SPARSE_FRACTION > n:
        return SparseCode(f, None, n)
    idx = f.detach().abs().topk(max(k, 1), dim=1, sorted=False).indices
    return SparseCode(f.gather(1, idx), idx, n)


def concat_codes(parts: list[SparseCode]) -> SparseCode:
    """Layer codes (local ids) -> one code over all of them (layer i's ids offset by ``i·F``)."""
    n = parts[0].n_latents
    if all(p.is_sparse for p in parts):
        idx = torch.cat([p.indices + i * n for i, p in enumerate(parts)], 1)
        return SparseCode(torch.cat([p.values for p in parts], 1), idx, n * len(parts))
    return SparseCode(torch.cat([p.to_dense() for p in parts], 1), None, n * len(parts))


def layer_var(e: Tensor) -> Tensor:
    """``mean_t ‖e_j − ē_j‖²`` of every layer j of ``e [B, L, d]`` (fp32) -> ``[L]``."""
    e = e.float()
    return (e - e.mean(0)).pow(2).sum(-1).mean(0).clamp_min(1e-12)


@register("clt", CLTConfig)
class CLT(LayerRange, Dictionary):
    """Cross-layer transcoder over ``cfg.layers`` (see the module docstring for the maths and layout)."""

    cfg: CLTConfig
    layered: ClassVar[bool] = True
    supports_latent_sharding = True
    fused_decoder_update = False
    unit_norm_decoder = False  # per instance: True for topk/batchtopk
    input_normalisation = "unit_msn"
    sparsity_fields = ("activation", "k", "sparsity_coefficient")
    init_rows: int = 8192
    """At most this many sample rows are used for the data-driven θ initialisation."""

    @property
    def auto_train(self) -> dict:  # type: ignore[override]
        """TopK's preset without its W_dec LR factor for the topk/batchtopk activations (chosen by measurement:
        benchmarks/RESULTS.md); plain Adam at the width rule for jumprelu/relu, which were not measured."""
        if self.cfg.activation not in ("topk", "batchtopk"):
            return {}
        return {key: v for key, v in TopK.auto_train.items() if key != "lr_dec_scale"}

    def __init__(self, cfg: CLTConfig):
        nn.Module.__init__(self)
        self.cfg, self.meta, self._dead_mask = cfg, {}, None
        layers = list(cfg.layers)
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(
                f"a clt needs a contiguous increasing layer range in 'layers' (e.g. [3, 4, 5, 6]), got {layers}"
            )
        L, d, n, d_out = len(layers), cfg.d_in, cfg.n_latents, cfg.d_out or cfg.d_in
        dtype = getattr(torch, cfg.dtype)
        self.unit_norm_decoder = cfg.activation in ("topk", "batchtopk")
        w_dec = []
        for i in range(L):
            w = torch.randn(n, L - i, d_out, dtype=dtype)
            w_dec.append(nn.Parameter(w / w.flatten(1).norm(dim=1)[:, None, None]))
        self.W_dec = nn.ParameterList(w_dec)
        self.W_enc = nn.Parameter(torch.randn(L, d, n, dtype=dtype) / d**0.5)
        self.b_enc = nn.Parameter(torch.zeros(L, n, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(L, d_out, d, dtype=dtype)) if cfg.skip else None
        if cfg.activation == "jumprelu":
            if cfg.threshold_init <= 0 or cfg.bandwidth <= 0:
                raise ValueError(
                    f"threshold_init ({cfg.threshold_init}) and bandwidth ({cfg.bandwidth}) must be > 0"
                )
            self.threshold = nn.Parameter(torch.full((L, n), cfg.threshold_init, dtype=dtype))
        elif cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.full((L,), -1.0, dtype=torch.float32))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("target_variance", torch.ones(L, dtype=torch.float32))
        self.sparsity_current = cfg.sparsity_coefficient
        self._step, self._updates = 0, 0
        self._start = max(0, cfg.threshold_start_step)

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def n_per_layer(self) -> int:
        """Features per layer F."""
        return self.cfg.n_latents

    @property
    def n_latents(self) -> int:
        """All features, ``L · F``."""
        return self.n_layers * self.cfg.n_latents

    @property
    def n_decoders(self) -> int:
        """Decoder blocks ``L(L+1)/2`` (one per source layer and later target layer)."""
        return self.n_layers * (self.n_layers + 1) // 2

    def check_input(self, x: Tensor, what: str = "input", dim: int | None = None) -> None:
        dim = self.d_in if dim is None else dim
        if x.ndim != 3 or x.shape[1:] != (self.n_layers, dim):
            raise ValueError(
                f"CLT expects {what} of shape [batch, {self.n_layers} layers, {dim}] but got {list(x.shape)}: it "
                f"reads {self.cfg.hookpoint!r} of layers {self.layers} (a source of several hookpoints)"
            )

    def new_stats(self) -> LayerwiseStats:
        return LayerwiseStats(self.layers, self.n_per_layer)

    def decoder_norms(self) -> Tensor:
        """``‖W_dec,f‖`` of every feature, its decoder rows concatenated over its target layers: ``[L, F]``."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])

    # -- encoding -------------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """``z [B, L, F]`` of ``x [B, L, d_in]``."""
        return torch.einsum("bld,ldf->blf", x, self.W_enc) + self.b_enc

    def _theta(self, dtype: torch.dtype) -> Tensor:
        return self.threshold.to(dtype)

    def _dense_acts(self, z: Tensor) -> Tensor:
        """``f [B, L, F]`` from ``z`` (batchtopk, jumprelu, relu)."""
        act = self.cfg.activation
        if act == "jumprelu":
            return JumpReLUFn.apply(z, self._theta(z.dtype), self.cfg.bandwidth)
        a = z.relu()
        if act == "relu":
            return a
        if self.training or bool((self.threshold < 0).any()):
            return torch.stack([batch_topk(a[:, i], self.cfg.k) for i in range(self.n_layers)], 1)
        return threshold_code(a, self.threshold[:, None])

    def encode_parts(self, x: Tensor) -> tuple[list[SparseCode], Tensor | None, Tensor | None]:
        """``(per-layer codes with local ids, z [B, L, F] or None, dense f [B, L, F] or None)`` of ``x``."""
        if self.cfg.activation == "topk":
            parts = [
                SparseCode(*topk_encode(x[:, i], self.W_enc[i], self.b_enc[i], self.cfg.k), self.n_per_layer)
                for i in range(self.n_layers)
            ]
            return parts, None, None
        z = self.pre_acts(x)
        f = self._dense_acts(z)
        if self.cfg.activation == "jumprelu" and self.training:  # θ's pseudo-gradient reaches zeros too
            return [SparseCode(f[:, i], None, self.n_per_layer) for i in range(self.n_layers)], z, f
        return [compact(f[:, i]) for i in range(self.n_layers)], z, f

    def encode(self, x: Tensor) -> SparseCode:
        """Code of ``x [B, L, d_in]`` over all ``L·F`` features."""
        self.check_input(x)
        return concat_codes(self.encode_parts(x)[0])

    def split_code(self, code: SparseCode) -> list[SparseCode]:
        """A code over all features -> one per layer (local ids)."""
        n = self.n_per_layer
        return [layer_code(code, i * n, n) for i in range(self.n_layers)]

    # -- decoding -------------------------------------------------------------------------------------
    def _contribution(self, code: SparseCode, i: int) -> Tensor:
        """Layer i's features decoded to layers ``i … L−1``: ``[B, L − i, d_out]`` (no bias)."""
        w = self.W_dec[i]
        flat = w.reshape(w.shape[0], -1)
        if code.indices is None:
            out = code.values.to(flat.dtype) @ flat
        else:
            out = sparse_decode(code.indices, code.values, flat)
        return out.view(-1, w.shape[1], w.shape[2])

    def _decode_parts(self, parts: list[SparseCode], x: Tensor | None = None, bias: bool = True) -> Tensor:
        contrib = [self._contribution(p, i) for i, p in enumerate(parts)]
        outs = []
        for j in range(self.n_layers):
            y = sum(contrib[i][:, j - i] for i in range(j + 1))
            outs.append(y + self.b_dec[j] if bias else y)
        out = torch.stack(outs, 1)
        if self.W_skip is not None and x is not None:
            out = out + torch.einsum("bld,lod->blo", x.to(self.W_skip.dtype), self.W_skip)
        return out

    def decode(self, code: SparseCode, x: Tensor | None = None) -> Tensor:
        """``ŷ [B, L, d_out]`` from a code over all features (+ the skip connection when ``x`` is given)."""
        return self._decode_parts(self.split_code(code), x)

    # -- the forward pass and its losses ---------------------------------------------------------------
    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = x if target is None else target
        self.check_input(y, "targets", self.d_out)
        parts, z, f = self.encode_parts(x)
        x_hat = self._decode_parts(parts, x)
        err = (x_hat.float() - y.float()).pow(2).sum(-1).mean(0)  # [L]
        losses = {"mse": (err / self.target_variance).sum()}
        act = self.cfg.activation
        if act in ("jumprelu", "relu"):
            norms = self.decoder_norms().float()
            tanh = torch.tanh(self.cfg.tanh_scale * f.float() * norms).sum((1, 2)).mean()
            losses["sparsity"] = self.sparsity_current * tanh
            if act == "jumprelu" and self.cfg.preact_coefficient > 0:
                pre = ((self.threshold.float() - z.float()).relu() * norms).sum((1, 2)).mean()
                losses["preact"] = self.cfg.preact_coefficient * pre
        else:
            losses.update(self._auxk(x, y - x_hat))
        return Output(x_hat, concat_codes(parts), losses)

    def _dead_candidates(self, x: Tensor, i: int, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
        """Top ``k_aux`` pre-activations among layer i's dead features ``(values, local ids) [B, ·]``."""
        pre = x[:, i] @ self.W_enc[i][:, dead] + self.b_enc[i][dead]
        vals, j = pre.topk(min(k_aux, dead.numel()), dim=-1, sorted=False)
        return vals.relu(), dead[j]

    def _auxk(self, x: Tensor, residual: Tensor) -> dict[str, Tensor]:
        """AuxK: the dead features' top pre-activations, decoded without bias, fitted to the residual."""
        dead = self._dead_mask
        if not self.training or self.cfg.aux_alpha <= 0 or dead is None or not bool(dead.any()):
            return {}
        n, k_aux = self.n_per_layer, self.cfg.aux_k or self.d_in // 2
        parts = []
        for i in range(self.n_layers):
            idx = dead[i * n : (i + 1) * n].nonzero().squeeze(1)
            if idx.numel() == 0:  # a code with one zero entry: decodes to nothing
                parts.append(SparseCode(x.new_zeros(x.shape[0], 1), idx.new_zeros(x.shape[0], 1), n))
                continue
            parts.append(SparseCode(*self._dead_candidates(x, i, idx, k_aux), n))
        e_hat = self._decode_parts(parts, bias=False).float()
        residual = residual.detach().float()
        loss = ((e_hat - residual).pow(2).sum(-1).mean(0) / layer_var(residual)).sum()
        return {"auxk": self.cfg.aux_alpha * loss}

    # -- training hooks ------------------------------------------------------------------------------------
    def on_step(self, step: int, total_steps: int) -> None:
        self._step = step
        cfg = self.cfg
        self.sparsity_current = cfg.sparsity_coefficient * warmup_factor(
            step, total_steps, cfg.sparsity_warmup_steps
        )
        start = cfg.threshold_start_step
        self._start = int(THRESHOLD_START_FRACTION * total_steps) if start < 0 else start
        self._updates = max(self._updates, step - self._start)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """jumprelu: keep θ ≥ 0. batchtopk: update θ of every layer from this batch (from the start step on)."""
        if self.cfg.activation == "jumprelu":
            self.threshold.clamp_(min=0.0)
        elif self.cfg.activation == "batchtopk" and self.training and self._step >= self._start:
            self.update_threshold(out.code)

    @torch.no_grad()
    def update_threshold(self, code: SparseCode) -> None:
        """θ of each layer ← running mean of its smallest positive kept activation (as BatchTopK, per layer)."""
        mins = []
        for part in self.split_code(code):
            v = part.values.detach().float()
            pos = v[v > 0]
            mins.append(pos.min() if pos.numel() else v.new_tensor(float("inf")))
        m = dist.all_reduce_mean(torch.stack(mins))  # one θ per layer for all ranks
        self._updates += 1
        running_threshold_step(self.threshold, m, self._updates, self.cfg.threshold_rate)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec and the target variances from a sample ``x [N, L, d_in]``, ``y [N, L, d_out]``; jumprelu: θ."""
        y = x if y is None else y
        how = self.cfg.b_dec_init
        if how not in ("mean", "median", "zero"):
            raise ValueError(f"b_dec_init must be 'median', 'mean' or 'zero', not {how!r}")
        for j in range(self.n_layers):
            if how == "mean":
                self.b_dec[j].copy_(y[:, j].double().mean(0).to(self.b_dec.dtype))
            elif how == "median":
                self.b_dec[j].copy_(geometric_median(y[:, j]).to(self.b_dec.dtype))
        self.target_variance.copy_(layer_var(y))
        if self.unit_norm_decoder:
            self.match_encoder_scale(x, y)
        l0 = self.cfg.threshold_init_l0
        l0 = self.cfg.k if l0 < 0 else l0
        if self.cfg.activation != "jumprelu" or l0 <= 0:
            return
        n = self.n_per_layer
        if l0 >= n:
            raise ValueError(f"threshold_init_l0={l0} must be below the {n} features per layer")
        x = x[: self.init_rows].to(self.W_enc.dtype)
        q = max(1, min(x.shape[0], math.ceil((1.0 - l0 / n) * x.shape[0])))
        for i in range(self.n_layers):
            z = (x[:, i] @ self.W_enc[i] + self.b_enc[i]).float()
            self.threshold[i] = z.kthvalue(q, dim=0).values.clamp_min(0.0).to(self.threshold.dtype)

    @torch.no_grad()
    def match_encoder_scale(self, x: Tensor, y: Tensor) -> None:
        """Scale ``W_enc[i]`` by ``rms‖y_j − b_dec[j]‖`` over the layers ``j ≥ i`` it writes to, over ``rms‖x_i‖``.

        A feature's decoder rows over its ``L − i`` target layers start as one random unit vector, so the
        activation its reconstruction needs is about the per-layer target norm over ``√d_out`` (as for a
        transcoder, :meth:`Dictionary.match_encoder_scale`); a random encoder gives ``‖x_i‖ / √d_in``. MLP
        outputs are several times larger than the normalised MLP inputs, and a CLT left at the input's scale
        loses about half its features to dead latents while its encoder grows (benchmarks/RESULTS.md).
        """
        residual = (y - self.b_dec).float().pow(2).sum(-1).mean(0)  # [L]: E‖y_j − b_dec[j]‖²
        source = x.float().pow(2).sum(-1).mean(0).sqrt()  # [L]
        for i in range(self.n_layers):
            target = residual[i:].mean().sqrt()
            if float(source[i]) > 0 and float(target) > 0:
                self.W_enc[i].mul_((target / source[i]).to(self.W_enc.dtype))

    # -- decoder normalisation (topk, batchtopk) ---------------------------------------------------------
    @torch.no_grad()
    def normalise_decoder(self, eps: float = 1e-8) -> None:
        for w in self.W_dec:
            w.div_(w.flatten(1).norm(dim=1)[:, None, None] + eps)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        for w in self.W_dec:
            if w.grad is None:
                continue
            u = w / (w.flatten(1).norm(dim=1)[:, None, None] + 1e-8)
            w.grad.sub_((w.grad * u).sum((1, 2), keepdim=True) * u)

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """As the base class (``W_enc *= c``, decoders and ``b_dec /= c``; θ is in latent units); the target
        variances return to raw units."""
        c = float(self.input_scale)
        if c == 1.0:
            return
        self.W_enc.mul_(c)
        for w in self.W_dec:
            w.div_(c)
        self.b_dec.div_(c)
        self.target_variance.div_(c * c)
        self.input_scale.fill_(1.0)

    # -- layer by layer (running inside a model) -------------------------------------------------------
    def encode_layer(self, i: int, x: Tensor) -> SparseCode:
        """Code of layer position i from its raw input ``x [M, d_in]`` (local ids); eval-mode activations."""
        c = float(self.input_scale)
        x = x.to(self.W_enc.dtype) * c
        if self.cfg.activation == "topk":
            return SparseCode(*topk_encode(x, self.W_enc[i], self.b_enc[i], self.cfg.k), self.n_per_layer)
        z = x @ self.W_enc[i] + self.b_enc[i]
        act = self.cfg.activation
        if act == "jumprelu":
            f = z * (z > self.threshold[i].to(z.dtype))
        elif act == "relu" or self.training or float(self.threshold[i]) < 0:
            f = z.relu() if act == "relu" else batch_topk(z.relu(), self.cfg.k)
        else:
            f = threshold_code(z.relu(), self.threshold[i])
        return compact(f)

    def decode_layer(self, j: int, codes: list[SparseCode], x: Tensor | None = None,
                     contributions: dict[int, Tensor] | None = None) -> Tensor:  # fmt: skip
        """Raw output of layer position j from the codes of layers ``0 … j`` (and its raw input for the skip).

        ``contributions`` (a dict the caller keeps for one set of codes) holds each layer's decoded features to
        all later layers once computed, so decoding every layer of one forward decodes each layer's code once."""
        if contributions is None:
            contributions = {}
        for i in range(j + 1):
            if i not in contributions:
                contributions[i] = self._contribution(codes[i], i)
        out = self.b_dec[j] + sum(contributions[i][:, j - i] for i in range(j + 1))
        if self.W_skip is not None and x is not None:
            out = out + (x.to(self.W_skip.dtype) * float(self.input_scale)) @ self.W_skip[j].T
        return out / float(self.input_scale)

    def hook(self, model: nn.Module, mode: str = "splice", exclude_first: int = 0) -> LayeredAttachment:
        """Context manager replacing every MLP output of the range at once (the replacement model)."""
        return LayeredAttachment(self, model, mode, exclude_first)

    # -- conversion, sharding ------------------------------------------------------------------------------
    def to_jumprelu(self) -> CLT:
        """The JumpReLU CLT computing this BatchTopK CLT's inference function (θ of each layer for every feature)."""
        if self.cfg.activation == "jumprelu":
            return copy.deepcopy(self)
        if self.cfg.activation != "batchtopk" or bool((self.threshold < 0).any()):
            raise ValueError(
                f"to_jumprelu needs a batchtopk CLT with its inference thresholds set (this one: "
                f"{self.cfg.activation}{', θ unset' if self.cfg.activation == 'batchtopk' else ''}); a topk CLT "
                "has no threshold: train with activation batchtopk or jumprelu"
            )
        cfg = dataclasses.replace(self.cfg, activation="jumprelu")
        out = build(cfg)
        state = {k: v for k, v in self.state_dict().items() if k != "threshold"}
        out.load_state_dict(state, strict=False)
        with torch.no_grad():
            out.threshold.copy_(self.threshold[:, None].expand_as(out.threshold).clamp_min(0.0))
        out.meta = dict(self.meta)
        return out.to(self.W_enc.device)

    def shard(self, rank: int, world: int) -> ShardedCLT:
        return ShardedCLT(self, rank, world)


class ShardedCLT(CLT):
    """This rank's slice of a :class:`CLT`: features ``[r·F/R, (r+1)·F/R)`` of every layer.

    Every rank reads the same batch. Encoder columns, ``b_enc`` and θ are sliced per layer, the decoder rows of
    the owned features too; ``b_dec``, ``W_skip``, ``input_scale`` and ``target_variance`` are replicated.
    topk: each layer's local top-k candidates are all-gathered and every rank keeps the same global top-k
    (``sharded.global_topk``: exact, ties towards lower ids); batchtopk: each layer's local top ``k·B`` values
    are all-gathered and the ``k·B``-th largest is every rank's cut; jumprelu/relu need no exchange. Each
    rank decodes its own features; :class:`~sparsedict.distributed.ReduceFromShards` sums the partial outputs
    (its backward passes the replicated gradient), and the penalties' local sums are reduced the same way, so the
    loss, ``b_dec``'s and ``W_skip``'s gradients are replicated and the sliced gradients complete. Codes carry
    global feature ids, so the dead-latent counters and the logged metrics see the whole CLT.
    """

    latent_sharded = True
    supports_latent_sharding = False  # already a slice

    def __init__(self, full: CLT, rank: int, world: int):
        nn.Module.__init__(self)
        self.cfg, self.meta, self._dead_mask = full.cfg, full.meta, None
        n, k = full.n_per_layer, full.cfg.k
        if n % world:
            raise ValueError(
                f"{n} features per layer are not divisible by {world} ranks: pick a width that is"
            )
        if full.cfg.activation == "topk" and n // world < k:
            raise ValueError(
                f"each of {world} ranks would own {n // world} features per layer < k={k}: use fewer ranks"
            )
        self.rank, self.world, self.n_local = rank, world, n // world
        self.lo = rank * self.n_local
        sl = slice(self.lo, self.lo + self.n_local)
        self.unit_norm_decoder = full.unit_norm_decoder
        self.W_dec = nn.ParameterList([nn.Parameter(w.detach()[sl].clone()) for w in full.W_dec])
        self.W_enc = nn.Parameter(full.W_enc.detach()[:, :, sl].clone())
        self.b_enc = nn.Parameter(full.b_enc.detach()[:, sl].clone())
        self.b_dec = nn.Parameter(full.b_dec.detach().clone())
        self.W_skip = None if full.W_skip is None else nn.Parameter(full.W_skip.detach().clone())
        if full.cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(full.threshold.detach()[:, sl].clone())
        elif full.cfg.activation == "batchtopk":
            self.register_buffer("threshold", full.threshold.detach().clone())
        self.register_buffer("input_scale", full.input_scale.detach().clone())
        self.register_buffer("target_variance", full.target_variance.detach().clone())
        self.sparsity_current = full.sparsity_current
        self._step, self._updates, self._start = full._step, full._updates, full._start

    def replicated_tensors(self) -> list[Tensor]:
        """Tensors that every rank holds whole (kept identical by broadcasting rank 0's)."""
        out = [self.b_dec.data, self.input_scale, self.target_variance]
        if self.W_skip is not None:
            out.append(self.W_skip.data)
        if self.cfg.activation == "batchtopk":
            out.append(self.threshold)
        return out

    def _local(self, code: SparseCode) -> SparseCode:
        """The entries of a layer code (global ids) this rank owns, with local ids (others zeroed)."""
        return layer_code(code, self.lo, self.n_local)

    def _select(self, z: Tensor) -> list[SparseCode]:
        """Per-layer codes with global ids, equal on every rank, from the local pre-activations ``z [B, L, F/R]``."""
        act, k, B = self.cfg.activation, self.cfg.k, z.shape[0]
        parts = []
        for i in range(self.n_layers):
            a = z[:, i].relu() if act != "jumprelu" else z[:, i]
            if act == "batchtopk" and (self.training or float(self.threshold[i]) < 0):
                flat = a.reshape(-1)
                kk = min(k * B, flat.numel())
                cand = flat.detach().topk(kk, sorted=False).values
                cut = (
                    dist.all_gather(cand).reshape(-1).topk(min(k * B, cand.numel() * self.world)).values.min()
                )
                f = a * (a >= cut)
            elif act == "batchtopk":
                f = threshold_code(a, self.threshold[i])
            elif act == "jumprelu":
                f = JumpReLUFn.apply(a, self.threshold[i].to(a.dtype), self.cfg.bandwidth)
                if self.training:
                    parts.append(self._gather_dense(f))
                    continue
            else:
                f = a
            parts.append(self._gather_code(f))
        return parts

    def _gather_dense(self, f: Tensor) -> SparseCode:
        """A local dense layer code ``f [B, F/R]`` -> the whole layer's dense code, the same on every rank; the
        columns this rank owns carry their gradient (JumpReLU training: θ's pseudo-gradient reaches zeros)."""
        parts = list(dist.all_gather(f.detach().contiguous()))
        parts[self.rank] = f
        return SparseCode(torch.cat(parts, 1), None, self.n_per_layer)

    def _gather_code(self, f: Tensor) -> SparseCode:
        """A local dense layer code ``f [B, F/R]`` -> the whole layer's k-sparse code (global ids), the same on
        every rank; the entries this rank owns carry their gradient."""
        k = int((f.detach() != 0).sum(1).max()) if f.numel() else 0
        k = max(1, int(dist.all_gather(torch.tensor(k, device=f.device)).max()))  # one width for the gather
        idx = f.detach().abs().topk(min(k, f.shape[1]), dim=1, sorted=False).indices
        vals = f.gather(1, idx)
        if vals.shape[1] < k:  # fewer local features than the widest rank's code: pad with zeros
            pad = k - vals.shape[1]
            vals, idx = (
                torch.cat([vals, vals.new_zeros(f.shape[0], pad)], 1),
                torch.cat([idx, idx[:, :1].expand(-1, pad)], 1),
            )
        B = f.shape[0]
        all_v = dist.all_gather(vals.detach().contiguous()).permute(1, 0, 2).reshape(B, -1)
        all_i = dist.all_gather((idx + self.lo).contiguous()).permute(1, 0, 2).reshape(B, -1)
        mine = torch.zeros_like(all_v, dtype=torch.bool)
        mine[:, self.rank * k : (self.rank + 1) * k] = True
        values = torch.where(mine, vals.repeat(1, self.world), all_v.to(vals.dtype))
        return SparseCode(values, all_i, self.n_per_layer)

    def _topk_parts(self, x: Tensor) -> list[SparseCode]:
        """topk: each layer's global top-k from the local candidates (``sharded.global_topk``)."""
        k, parts = self.cfg.k, []
        for i in range(self.n_layers):
            vals, idx = topk_encode(x[:, i], self.W_enc[i], self.b_enc[i], k)  # sorted, ties to the lower id
            top_v, top_i, own, slot = global_topk(vals, idx + self.lo, k)
            values = torch.where(own, vals.gather(1, slot), top_v.to(vals.dtype))
            parts.append(SparseCode(values, top_i, self.n_per_layer))
        return parts

    def encode_parts(self, x: Tensor) -> tuple[list[SparseCode], Tensor | None, Tensor | None]:
        x = CopyToShards.apply(x)
        if self.cfg.activation == "topk":
            return self._topk_parts(x), None, None
        z = self.pre_acts(x)
        return self._select(z), z, None

    def _contribution(self, code: SparseCode, i: int) -> Tensor:
        """The owned features' part, summed over ranks (global code in, whole contribution out)."""
        return ReduceFromShards.apply(super()._contribution(self._local(code), i))

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = x if target is None else target
        parts, z, _ = self.encode_parts(x)
        x_hat = self._decode_parts(parts, x)
        err = (x_hat.float() - y.float()).pow(2).sum(-1).mean(0)
        losses = {"mse": (err / self.target_variance).sum()}
        act = self.cfg.activation
        if act in ("jumprelu", "relu"):
            norms = self.decoder_norms().float()
            f = torch.stack([self._local(p).to_dense() for p in parts], 1).float()
            tanh = torch.tanh(self.cfg.tanh_scale * f * norms).sum((1, 2)).mean()
            losses["sparsity"] = self.sparsity_current * ReduceFromShards.apply(tanh)
            if act == "jumprelu" and self.cfg.preact_coefficient > 0:
                pre = ((self.threshold.float() - z.float()).relu() * norms).sum((1, 2)).mean()
                losses["preact"] = self.cfg.preact_coefficient * ReduceFromShards.apply(pre)
        else:
            losses.update(self._auxk(x, y - x_hat))
        return Output(x_hat, concat_codes(parts), losses)

    def _auxk(self, x: Tensor, residual: Tensor) -> dict[str, Tensor]:
        """AuxK as the whole CLT's: each layer's top ``k_aux`` dead pre-activations over all ranks."""
        dead = self._dead_mask
        if not self.training or self.cfg.aux_alpha <= 0 or dead is None or not bool(dead.any()):
            return {}
        n, k_aux, B = self.n_per_layer, self.cfg.aux_k or self.d_in // 2, x.shape[0]
        x = CopyToShards.apply(x)
        parts = []
        for i in range(self.n_layers):
            layer_dead = dead[i * n : (i + 1) * n]
            kk = min(k_aux, int(layer_dead.sum()))
            loc = layer_dead[self.lo : self.lo + self.n_local].nonzero().squeeze(1)
            if kk == 0:
                parts.append(SparseCode(x.new_zeros(B, 1), loc.new_zeros(B, 1) + self.lo, n))
                continue
            pre = x[:, i] @ self.W_enc[i][:, loc] + self.b_enc[i][loc]
            v, j = pre.topk(min(kk, loc.numel()), dim=-1)
            gi = loc[j] + self.lo
            pad = kk - v.shape[1]  # every rank offers kk candidates; padding never wins (-inf)
            v = torch.cat([v, v.new_full((B, pad), float("-inf"))], 1)
            gi = torch.cat([gi, gi.new_full((B, pad), self.lo)], 1)
            _, top_i, own, slot = global_topk(v, gi, kk)
            vals = torch.where(own, v.gather(1, slot), torch.zeros_like(own, dtype=v.dtype)).relu()
            parts.append(SparseCode(vals, top_i, n))
        e_hat = self._decode_parts(parts, bias=False).float()
        residual = residual.detach().float()
        loss = ((e_hat - residual).pow(2).sum(-1).mean(0) / layer_var(residual)).sum()
        return {"auxk": self.cfg.aux_alpha * loss}

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec and the target variances as the whole CLT; jumprelu thresholds of the owned features."""
        CLT.init_from_data(self, x, y)

    @torch.no_grad()
    def normalise_decoder(self, eps: float = 1e-8) -> None:
        CLT.normalise_decoder(self, eps)  # each feature's rows are all on its own rank

    @torch.no_grad()
    def unshard(self) -> CLT | None:
        """Collective: the whole CLT on rank 0 (None on other ranks)."""
        w_enc = dist.all_gather(self.W_enc.detach())  # [R, L, d, F/R]
        b_enc = dist.all_gather(self.b_enc.detach())
        w_dec = [dist.all_gather(w.detach()) for w in self.W_dec]
        theta = dist.all_gather(self.threshold.detach()) if self.cfg.activation == "jumprelu" else None
        if not dist.is_main():
            return None
        full = build(self.cfg)
        full.W_enc.copy_(torch.cat(list(w_enc), 2))
        full.b_enc.copy_(torch.cat(list(b_enc), 1))
        for w, parts in zip(full.W_dec, w_dec):
            w.copy_(torch.cat(list(parts), 0))
        full.b_dec.copy_(self.b_dec)
        if self.W_skip is not None:
            full.W_skip.copy_(self.W_skip)
        if theta is not None:
            full.threshold.copy_(torch.cat(list(theta), 1))
        elif self.cfg.activation == "batchtopk":
            full.threshold.copy_(self.threshold)
        full.input_scale.copy_(self.input_scale)
        full.target_variance.copy_(self.target_variance)
        full.meta = self.meta
        return full.cpu()


__all__ = ["CLT", "CLTConfig", "ShardedCLT"]
