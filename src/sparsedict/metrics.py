"""Every reconstruction and sparsity metric, defined once: the evaluator and the trainer's logs use these.

All metrics are ratios of streaming sums accumulated in fp64, so they do not depend on how the
evaluated tokens were split into batches and merge exactly across batches and ranks (``merge``, or
``packed``/``from_packed`` around a sum all-reduce):

- ``S_res = Σ_t ‖y_t − ŷ_t‖²``, ``S_1 = Σ_t y_t`` ``[d]``, ``S_2 = Σ_t ‖y_t‖²``, ``T`` tokens.
- **FVU** ``= S_res / Σ_t ‖y_t − μ‖²`` with the per-dimension mean ``μ = S_1 / T`` of the same tokens,
  and ``Σ_t ‖y_t − μ‖² = S_2 − ‖S_1‖² / T``. Explained variance ``= 1 − FVU``.
- **MSE** per element ``= S_res / (T·d)``; per-token SSE ``= S_res / T``.
- **cosine** ``= mean_t ⟨y_t, ŷ_t⟩ / (‖y_t‖‖ŷ_t‖)``.
- **L0** ``= mean_t |{i : f_ti ≠ 0}|`` (and its histogram over tokens).
- **dead %** = fraction of latents with zero firings over the evaluated tokens; **dense %** = fraction
  firing on more than ``dense_threshold`` (10 %) of tokens.
- **relative reconstruction bias** ``γ = Σ‖ŷ‖² / Σ⟨y, ŷ⟩`` (< 1 means shrinkage).
- **L2 ratio** ``= Σ_t ‖ŷ_t‖ / Σ_t ‖y_t‖`` (ratio of summed norms).
- **L0 distribution**: quantiles of the per-token L0 read off its exact histogram (lower quantile:
  the smallest L0 whose cumulative token count reaches ``q·T``); standard deviation
  ``sqrt(Σ_t l0_t²/T − L0²)``.
- **firing-frequency histogram**: counts of latents per ``log10(freq)`` bin, ``freq_i = fires_i / T``;
  dead latents (``freq = 0``) counted separately.
- **per layer** (:class:`LayerwiseStats`, multi-layer dictionaries with outputs ``[B, L, d]``): the metrics
  above of every output layer with its own latents, beside those of the L outputs taken as one vector.

Spliced-model metrics (:class:`SpliceStats`), over the kept positions ``t`` of held-out contexts,
with ``p`` the next-token distribution at ``t`` and ``x_{t+1}`` the true next token:

- ``CE = mean_t −log p(x_{t+1})`` for the clean, spliced, zero-ablated and mean-ablated model.
- **CE-loss recovered** ``= (CE_zero − CE_spliced) / (CE_zero − CE_clean)``; the same with the
  mean-ablation baseline; **ΔLM loss** ``= CE_spliced − CE_clean``. The zero and mean baselines replace only
  the positions the dictionary replaces (excluded positions such as BOS and attention sinks keep their
  activations), so they are not SAELens' ``ce_loss_score``, whose zero-ablation replaces every position; that
  baseline is ``ce_recovered_zero_all`` (CE still over the kept positions).
- **KL**(clean‖spliced) ``= mean_t Σ_v p_clean(v) (log p_clean(v) − log p_spliced(v))``;
  ``kl_div_score = (KL_zero − KL_spliced) / KL_zero``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


def fvu(y: Tensor, y_hat: Tensor) -> float:
    """Fraction of variance unexplained of ``y_hat`` for ``y`` ``[T, d]`` (per-dimension mean of y)."""
    stats = ReconstructionStats()
    stats.update(y, y_hat)
    return stats.fvu


UPDATE_ELEMENTS = 1 << 24
"""``ReconstructionStats.update`` converts at most this many entries of ``y`` (and ``ŷ``) to fp64 at a time."""
_SUMS = ("tokens", "s_res", "s_2", "s_cross", "s_hat2", "s_cos", "s_l0", "s_l0sq", "s_norm", "s_norm_hat")
_TENSOR_SUMS = ("s_1", "fired", "l0_hist")


@dataclass
class ReconstructionStats:
    """Streaming sums for reconstruction and sparsity metrics; ``update`` per batch, ``merge`` across."""

    n_latents: int = 0
    dense_threshold: float = 0.1
    tokens: int = 0
    s_res: float = 0.0
    s_2: float = 0.0
    s_cross: float = 0.0
    s_hat2: float = 0.0
    s_cos: float = 0.0
    s_l0: float = 0.0
    s_l0sq: float = 0.0
    s_norm: float = 0.0
    s_norm_hat: float = 0.0
    s_1: Tensor | None = None
    fired: Tensor | None = None
    l0_hist: Tensor | None = field(default=None)

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, code=None) -> None:
        """Add a batch: targets ``y [B, d]``, reconstructions ``y_hat [B, d]``, their ``SparseCode`` (optional)."""
        if y.shape != y_hat.shape:
            raise ValueError(f"y {list(y.shape)} and y_hat {list(y_hat.shape)} must have the same shape")
        rows = max(1, UPDATE_ELEMENTS // max(1, y.shape[-1]))
        for a in range(0, y.shape[0], rows):  # fp64 copies of at most UPDATE_ELEMENTS entries at a time
            self._add(y[a : a + rows], y_hat[a : a + rows])
        if code is not None:
            self._add_code(code)

    def _add(self, y: Tensor, y_hat: Tensor) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.tokens += y.shape[0]
        self.s_res += float((y - y_hat).pow(2).sum())
        self.s_2 += float(y.pow(2).sum())
        self.s_cross += float((y * y_hat).sum())
        self.s_hat2 += float(y_hat.pow(2).sum())
        cos = (y * y_hat).sum(-1) / (y.norm(dim=-1) * y_hat.norm(dim=-1)).clamp_min(1e-30)
        self.s_cos += float(cos.sum())
        self.s_norm += float(y.norm(dim=-1).sum())
        self.s_norm_hat += float(y_hat.norm(dim=-1).sum())
        s1 = y.sum(0)
        self.s_1 = s1 if self.s_1 is None else self.s_1 + s1

    def _add_code(self, code) -> None:
        n = code.n_latents
        self.n_latents = n
        l0 = code.l0()
        self.s_l0 += float(l0.sum())
        self.s_l0sq += float(l0.double().pow(2).sum())
        hist = torch.bincount(l0.cpu(), minlength=n + 1)[: n + 1]
        self.l0_hist = hist if self.l0_hist is None else self.l0_hist + hist
        active = code.active().cpu()
        self.fired = active if self.fired is None else self.fired + active

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        out = ReconstructionStats(self.n_latents or other.n_latents, self.dense_threshold)
        for name in _SUMS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in _TENSOR_SUMS:
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, a if b is None else b if a is None else a + b)
        return out

    def packed(self) -> Tensor:
        """Every sum in one fp64 vector (for a sum all-reduce over ranks); needs at least one update with a code."""
        parts = [torch.tensor([float(getattr(self, n)) for n in _SUMS], dtype=torch.float64)]
        parts += [getattr(self, n).double().cpu() for n in _TENSOR_SUMS]
        return torch.cat(parts)

    def from_packed(self, vec: Tensor) -> ReconstructionStats:
        """The statistics whose sums are ``vec`` (the :meth:`packed` layout of these statistics)."""
        out = ReconstructionStats(self.n_latents, self.dense_threshold)
        vec = vec.double().cpu()
        for i, name in enumerate(_SUMS):
            setattr(out, name, int(vec[i]) if name == "tokens" else float(vec[i]))
        at = len(_SUMS)
        for name in _TENSOR_SUMS:
            like = getattr(self, name)
            setattr(out, name, vec[at : at + like.numel()].to(like.dtype))
            at += like.numel()
        return out

    @property
    def total_variance(self) -> float:
        if self.tokens == 0 or self.s_1 is None:
            return float("nan")
        return self.s_2 - float(self.s_1.pow(2).sum()) / self.tokens

    @property
    def fvu(self) -> float:
        return self.s_res / self.total_variance

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def mse(self) -> float:
        d = self.s_1.numel() if self.s_1 is not None else 1
        return self.s_res / max(1, self.tokens * d)

    @property
    def sse_per_token(self) -> float:
        return self.s_res / max(1, self.tokens)

    @property
    def cosine(self) -> float:
        return self.s_cos / max(1, self.tokens)

    @property
    def shrinkage(self) -> float:
        return self.s_hat2 / self.s_cross if self.s_cross else float("nan")

    @property
    def l0(self) -> float:
        return self.s_l0 / max(1, self.tokens)

    @property
    def firing_frequency(self) -> Tensor:
        return self.fired.double() / max(1, self.tokens)

    @property
    def dead_fraction(self) -> float:
        return float((self.fired == 0).double().mean()) if self.fired is not None else float("nan")

    @property
    def dense_fraction(self) -> float:
        if self.fired is None:
            return float("nan")
        return float((self.firing_frequency > self.dense_threshold).double().mean())

    @property
    def l2_ratio(self) -> float:
        return self.s_norm_hat / self.s_norm if self.s_norm else float("nan")

    @property
    def l0_std(self) -> float:
        if self.tokens == 0:
            return float("nan")
        return max(0.0, self.s_l0sq / self.tokens - self.l0**2) ** 0.5

    def l0_quantiles(self, qs: tuple[float, ...] = (0.01, 0.1, 0.5, 0.9, 0.99)) -> dict[str, int]:
        """Per-token L0 quantiles from the exact histogram: the smallest L0 with ``cum count ≥ q·T``."""
        if self.l0_hist is None:
            return {}
        cum = self.l0_hist.double().cumsum(0)
        total = float(cum[-1])
        out = {}
        for q in qs:
            idx = int(torch.searchsorted(cum, torch.tensor(max(q * total, 1e-9), dtype=cum.dtype)))
            out[f"p{round(q * 100):02d}"] = min(idx, cum.numel() - 1)
        out["max"] = int(self.l0_hist.nonzero().max()) if bool(self.l0_hist.any()) else 0
        return out

    def firing_histogram(self, decades: int = 8) -> dict[str, list[float] | int]:
        """Latent counts per ``log10(freq)`` bin, ``edges = [-decades, ..., 0]``; dead latents apart."""
        if self.fired is None:
            return {}
        freq = self.firing_frequency
        alive = freq[freq > 0]
        edges = torch.arange(-decades, 1, dtype=torch.float64)
        logf = alive.log10().clamp(-decades, 0.0)
        counts = (
            torch.histc(logf, bins=decades, min=-decades, max=0.0) if alive.numel() else torch.zeros(decades)
        )
        return {"log10_edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()],
                "dead": int((freq == 0).sum())}  # fmt: skip

    def summary(self) -> dict[str, float]:
        out = {
            "tokens": self.tokens,
            "fvu": self.fvu,
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "sse_per_token": self.sse_per_token,
            "cosine": self.cosine,
            "shrinkage": self.shrinkage,
            "l2_ratio": self.l2_ratio,
        }
        if self.fired is not None:
            out.update(l0=self.l0, dead_fraction=self.dead_fraction, dense_fraction=self.dense_fraction)
            out.update(l0_std=self.l0_std, n_latents=self.n_latents)
        return out

    def distributions(self) -> dict[str, dict]:
        """The L0 quantiles and the firing-frequency histogram (for reports and plots)."""
        return {"l0_quantiles": self.l0_quantiles(), "firing_histogram": self.firing_histogram()}

    def logged(self) -> dict[str, float]:
        """What the trainer logs on its log steps: FVU and L0."""
        return {"fvu": self.fvu, "l0": self.l0}


def layer_code(code, lo: int, n: int):
    """The part of a code ``[B, ·]`` on latents ``[lo, lo + n)``, renumbered from 0 (a ``SparseCode`` of n)."""
    if code.indices is None:
        return dataclasses.replace(code, values=code.values[:, lo : lo + n], n_latents=n)
    own = (code.indices >= lo) & (code.indices < lo + n)
    values = torch.where(own, code.values, torch.zeros_like(code.values))
    return dataclasses.replace(
        code, values=values, indices=torch.where(own, code.indices - lo, 0), n_latents=n
    )


class LayerwiseStats:
    """Reconstruction statistics of a multi-layer dictionary (a CLT or a transcoder set), whole and per layer.

    Targets and outputs are ``[B, L, d]``; the code holds the latents of every layer, those of layer ``i`` (the
    ``i``-th entry of ``layers``) at ``[i·n, (i+1)·n)``. ``total`` treats a row's L outputs as one vector
    (its L0 is the number of active features per token over all layers); ``per_layer[i]`` covers output ``i``
    and the latents of layer ``i``. Each is a :class:`ReconstructionStats`, so the sums merge across batches
    and ranks the same way (``packed`` concatenates them).
    """

    def __init__(self, layers: list[int], n_per_layer: int, dense_threshold: float = 0.1) -> None:
        self.layers, self.n_per_layer = list(layers), n_per_layer
        self.total = ReconstructionStats(n_per_layer * len(self.layers), dense_threshold)
        self.per_layer = [ReconstructionStats(n_per_layer, dense_threshold) for _ in self.layers]

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, code=None) -> None:
        """Add a batch: ``y``, ``y_hat`` ``[B, L, d]`` and the code over all ``L·n`` latents (optional)."""
        if y.ndim != 3 or y.shape[1] != len(self.layers) or y.shape != y_hat.shape:
            raise ValueError(
                f"y {list(y.shape)} and y_hat {list(y_hat.shape)} must both be [batch, {len(self.layers)} layers, d]"
            )
        self.total.update(y.flatten(1), y_hat.flatten(1), code)
        n = self.n_per_layer
        for i, stats in enumerate(self.per_layer):
            stats.update(y[:, i], y_hat[:, i], None if code is None else layer_code(code, i * n, n))

    def _parts(self) -> list[ReconstructionStats]:
        return [self.total, *self.per_layer]

    def _with(self, parts: list[ReconstructionStats]) -> LayerwiseStats:
        out = LayerwiseStats(self.layers, self.n_per_layer, self.total.dense_threshold)
        out.total, out.per_layer = parts[0], parts[1:]
        return out

    def merge(self, other: LayerwiseStats) -> LayerwiseStats:
        return self._with([a.merge(b) for a, b in zip(self._parts(), other._parts(), strict=True)])

    def packed(self) -> Tensor:
        """Every sum of the whole and of each layer in one fp64 vector (for a sum all-reduce)."""
        return torch.cat([s.packed() for s in self._parts()])

    def from_packed(self, vec: Tensor) -> LayerwiseStats:
        parts, at = [], 0
        for s in self._parts():
            size = s.packed().numel()
            parts.append(s.from_packed(vec[at : at + size]))
            at += size
        return self._with(parts)

    @property
    def tokens(self) -> int:
        return self.total.tokens

    @property
    def fvu(self) -> float:
        """FVU of the L outputs as one vector (layers with a larger variance weigh more)."""
        return self.total.fvu

    @property
    def l0(self) -> float:
        """Active features per token, over every layer."""
        return self.total.l0

    @property
    def fvu_layer_mean(self) -> float:
        """Mean over the layers of each layer's FVU."""
        return sum(s.fvu for s in self.per_layer) / len(self.per_layer)

    def layer_metrics(self) -> dict[str, float]:
        """``layer{l}/fvu`` and ``layer{l}/l0`` of every layer, and the mean per-layer FVU."""
        out = {"fvu_layer_mean": self.fvu_layer_mean}
        for layer, s in zip(self.layers, self.per_layer, strict=True):
            out[f"layer{layer}/fvu"] = s.fvu
            if s.fired is not None:
                out[f"layer{layer}/l0"] = s.l0
        return out

    def summary(self) -> dict[str, float]:
        return {**self.total.summary(), **self.layer_metrics()}

    def distributions(self) -> dict[str, dict]:
        return self.total.distributions()

    def logged(self) -> dict[str, float]:
        return {**self.total.logged(), **self.layer_metrics()}


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy ``−log softmax(logits)[target]`` per row: ``logits [N, V]``, ``targets [N]`` -> ``[N]`` fp32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def token_kl(logp_clean: Tensor, logp_other: Tensor) -> Tensor:
    """``KL(clean‖other) = Σ_v p_clean (log p_clean − log p_other)`` per row of log-probs ``[N, V]`` -> ``[N]``.

    Tokens the clean model gives probability 0 (``log p_clean = −inf``, a masked vocabulary entry) add 0, as
    ``0 · log 0 = 0``; a token the clean model allows and the other forbids gives ``+inf``.
    """
    term = logp_clean.exp() * (logp_clean - logp_other)
    return torch.where(torch.isneginf(logp_clean), torch.zeros_like(term), term).sum(-1)


@dataclass
class SpliceStats:
    """Streaming sums of per-token CE and KL over kept positions, for one spliced dictionary.

    ``update`` takes per-token tensors ``[N]`` for the same N positions (already masked); ``ce_mean``
    and ``kl_mean`` (mean-ablation) are optional. All sums in fp64; merges across batches and ranks.
    """

    tokens: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    ce_mean: float = 0.0
    kl_spliced: float = 0.0
    kl_zero: float = 0.0
    kl_mean: float = 0.0
    has_mean: bool = False
    ce_zero_all: float = 0.0
    """Zero-ablation of every position (SAELens' ``ce_loss_score`` baseline), CE over the same kept positions."""
    has_zero_all: bool = False

    def update(self, ce_clean: Tensor, ce_spliced: Tensor, ce_zero: Tensor, kl_spliced: Tensor, kl_zero: Tensor,
               ce_mean: Tensor | None = None, kl_mean: Tensor | None = None,
               ce_zero_all: Tensor | None = None) -> None:  # fmt: skip
        self.tokens += int(ce_clean.numel())
        self.ce_clean += float(ce_clean.double().sum())
        self.ce_spliced += float(ce_spliced.double().sum())
        self.ce_zero += float(ce_zero.double().sum())
        self.kl_spliced += float(kl_spliced.double().sum())
        self.kl_zero += float(kl_zero.double().sum())
        if ce_mean is not None and kl_mean is not None:
            self.has_mean = True
            self.ce_mean += float(ce_mean.double().sum())
            self.kl_mean += float(kl_mean.double().sum())
        if ce_zero_all is not None:
            self.has_zero_all = True
            self.ce_zero_all += float(ce_zero_all.double().sum())

    def merge(self, other: SpliceStats) -> SpliceStats:
        out = SpliceStats(
            has_mean=self.has_mean or other.has_mean, has_zero_all=self.has_zero_all or other.has_zero_all
        )
        for name in (
            "tokens",
            "ce_clean",
            "ce_spliced",
            "ce_zero",
            "ce_mean",
            "kl_spliced",
            "kl_zero",
            "kl_mean",
            "ce_zero_all",
        ):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def _mean(self, total: float) -> float:
        return total / self.tokens if self.tokens else float("nan")

    @property
    def ce_recovered(self) -> float:
        """``(CE_zero − CE_spliced) / (CE_zero − CE_clean)``."""
        gap = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_spliced) / gap if gap else float("nan")

    @property
    def ce_recovered_mean_ablation(self) -> float:
        """``(CE_mean − CE_spliced) / (CE_mean − CE_clean)`` (mean-ablation baseline)."""
        gap = self.ce_mean - self.ce_clean
        return (self.ce_mean - self.ce_spliced) / gap if self.has_mean and gap else float("nan")

    @property
    def ce_recovered_zero_all(self) -> float:
        """``(CE_zero_all − CE_spliced) / (CE_zero_all − CE_clean)``: the baseline zero-ablates every position,
        BOS and attention sinks included, as SAELens' ``ce_loss_score`` does."""
        gap = self.ce_zero_all - self.ce_clean
        return (self.ce_zero_all - self.ce_spliced) / gap if self.has_zero_all and gap else float("nan")

    @property
    def delta_lm_loss(self) -> float:
        """``CE_spliced − CE_clean`` (nats per token)."""
        return self._mean(self.ce_spliced - self.ce_clean)

    @property
    def kl_div_score(self) -> float:
        """``(KL_zero − KL_spliced) / KL_zero``."""
        return (self.kl_zero - self.kl_spliced) / self.kl_zero if self.kl_zero else float("nan")

    def summary(self) -> dict[str, float]:
        out = {
            "splice_tokens": self.tokens,
            "ce_clean": self._mean(self.ce_clean),
            "ce_spliced": self._mean(self.ce_spliced),
            "ce_zero_ablation": self._mean(self.ce_zero),
            "ce_recovered": self.ce_recovered,
            "delta_lm_loss": self.delta_lm_loss,
            "kl": self._mean(self.kl_spliced),
            "kl_zero_ablation": self._mean(self.kl_zero),
            "kl_div_score": self.kl_div_score,
        }
        if self.has_mean:
            out.update(ce_mean_ablation=self._mean(self.ce_mean), kl_mean_ablation=self._mean(self.kl_mean),
                       ce_recovered_mean_ablation=self.ce_recovered_mean_ablation)  # fmt: skip
        if self.has_zero_all:
            out.update(
                ce_zero_ablation_all=self._mean(self.ce_zero_all),
                ce_recovered_zero_all=self.ce_recovered_zero_all,
            )
        return out
