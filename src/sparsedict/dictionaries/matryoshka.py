"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025) on a TopK or BatchTopK encoder.

One dictionary whose latents are split into nested prefixes ``m_1 < … < m_G = n``; every prefix must
reconstruct the target on its own:

``L = Σ_g w_g ‖y − (f[:, :m_g] W_dec[:m_g] + b_dec)‖² + α L_aux``

so early latents learn general features. The code comes from one encoder, ``selection = "topk"``
(per-token top-k, in training and at inference: exported to SAELens as ``topk`` with the same k) or
``"batchtopk"`` (batch top-k in training, the running-mean threshold θ in eval, as in
:mod:`~sparsedict.dictionaries.batchtopk`: exported as a JumpReLU with that θ). θ is estimated only for
``"batchtopk"``; a per-token top-k code has no single threshold (the batch minimum of per-token k-th values is a
far lower quantile, so a JumpReLU with it fires on many times k latents).

Kernels: with ``selection = "topk"`` the encoder is :func:`sparsedict.kernels.topk_encode` and every
reconstruction, the G − 1 inner prefixes included, is :func:`sparsedict.kernels.sparse_decode` (fused Triton
on CUDA, the reference elsewhere): prefix g decodes the k-sparse code with the values of latents ≥ m_g
masked to zero, so no ``[B, n]`` or ``[B, k, d]`` tensor is formed and W_dec's gradient reaches the selected
rows only. With ``selection = "batchtopk"`` the code comes from :class:`BatchTopK`'s encoder (fused per-row
candidates on CUDA when exact, see there); a dense code's G disjoint group blocks are decoded and
cumulatively summed. Group weights default to ``1/G`` each.

Init as BatchTopK (with either selection: by default ``W_enc`` scaled to the least-squares fit of the per-token
code's full reconstruction, and its LR by the same factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsedict.dictionaries.base import Output, SparseCode, register
from sparsedict.dictionaries.batchtopk import BatchTopK, BatchTopKConfig
from sparsedict.dictionaries.topk import auxk_loss
from sparsedict.kernels import sparse_decode, topk_encode


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    architecture: str = "matryoshka"
    """Registered architecture name."""
    selection: str = "batchtopk"
    """Encoder selection: 'topk' (per token) or 'batchtopk' (per batch; threshold θ at inference)."""
    group_sizes: tuple[int, ...] = ()
    """Sizes of the consecutive latent groups (sum = n_latents); empty: use group_fractions."""
    group_fractions: tuple[float, ...] = (1 / 32, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
    """Group sizes as fractions of n_latents (sum 1; rounded, the last group takes the remainder)."""
    group_weights: tuple[float, ...] = ()
    """Weight w_g of each prefix loss; empty means 1/G each."""

    def __post_init__(self) -> None:
        if self.selection not in ("topk", "batchtopk"):
            raise ValueError(f"selection must be 'topk' or 'batchtopk', not {self.selection!r}")
        self.group_sizes = tuple(int(s) for s in self.group_sizes)
        self.group_fractions = tuple(float(f) for f in self.group_fractions)
        self.group_weights = tuple(float(w) for w in self.group_weights)


def resolve_groups(cfg: MatryoshkaConfig) -> list[int]:
    """Prefix ends ``[m_1, …, m_G]`` (strictly increasing, last = n) from the config."""
    n = cfg.n_latents
    if cfg.group_sizes:
        sizes = list(cfg.group_sizes)
        if sum(sizes) != n or min(sizes) <= 0:
            raise ValueError(
                f"group_sizes {sizes} must be positive and sum to n_latents={n} (sum {sum(sizes)})"
            )
    else:
        fr = cfg.group_fractions
        if not fr or abs(sum(fr) - 1) > 1e-6 or min(fr) <= 0:
            raise ValueError(f"group_fractions {list(fr)} must be positive and sum to 1")
        sizes = [max(1, round(f * n)) for f in fr[:-1]]
        sizes.append(n - sum(sizes))
        if sizes[-1] <= 0:
            raise ValueError(f"group_fractions {list(fr)} leave no latents for the last group at n={n}")
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [int(e) for e in ends]


def prefix_reconstructions_sparse(code: SparseCode, W_dec: Tensor, ends: list[int]) -> Tensor:
    """``[B, G, d]``: row b, group g = ``Σ_{j: i_bj < m_g} v_bj W_dec[i_bj]`` (no bias).

    One :func:`~sparsedict.kernels.sparse_decode` per prefix with the values of latents ≥ m_g zeroed
    (fused kernel on CUDA; sparse W_dec gradient).
    """
    idx, vals = code.indices, code.values
    outs = [sparse_decode(idx, vals * (idx < m).to(vals.dtype), W_dec) for m in ends]
    return torch.stack(outs, dim=1)


def prefix_reconstructions_dense(f: Tensor, W_dec: Tensor, ends: list[int]) -> Tensor:
    """``[B, G, d]`` from a dense code ``f [B, n]``: decode each group block once, then cumulative sum."""
    starts = [0, *ends[:-1]]
    blocks = torch.stack([f[:, s:e] @ W_dec[s:e] for s, e in zip(starts, ends, strict=True)], dim=1)
    return blocks.cumsum(1)


@register("matryoshka", MatryoshkaConfig)
class Matryoshka(BatchTopK):
    cfg: MatryoshkaConfig

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__(cfg)
        self.ends = resolve_groups(cfg)
        G = len(self.ends)
        w = cfg.group_weights or tuple(1.0 / G for _ in range(G))
        if len(w) != G:
            raise ValueError(f"group_weights has {len(w)} entries but there are {G} groups")
        self.weights = [float(v) for v in w]

    def encode(self, x: Tensor) -> SparseCode:
        if self.cfg.selection == "topk":
            values, indices = topk_encode(self._x_in(x), self.W_enc, self.b_enc, self.cfg.k)
            return SparseCode(values, indices, self.n_latents)
        return super().encode(x)

    def inference_architecture(self) -> str:
        """``topk`` for per-token selection, else the JumpReLU with BatchTopK's threshold θ."""
        return "topk" if self.cfg.selection == "topk" else "jumprelu"

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """Estimate θ for batch selection only (per-token top-k needs none)."""
        if self.cfg.selection == "batchtopk":
            super().after_step(out)

    def prefix_reconstructions(self, code: SparseCode, ends: list[int] | None = None) -> Tensor:
        """``[B, G, d_out]`` prefix reconstructions without b_dec (and without the skip term).

        ``ends`` defaults to all G prefix ends; the loss asks for the G − 1 inner ones only.
        """
        ends = self.ends if ends is None else ends
        if code.indices is not None:
            return prefix_reconstructions_sparse(code, self.W_dec, ends)
        return prefix_reconstructions_dense(code.values, self.W_dec, ends)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Every prefix's loss; in CPU training with batch selection on the batch top-k entries only, all G
        prefix reconstructions from one sparse decode (:meth:`~sparsedict.dictionaries.active.Active.prefix_decodes`)."""
        self.check_input(x)
        y = x if target is None else target
        offset = self.b_dec if self.W_skip is None else self.b_dec + x @ self.W_skip.T
        act = self.batch_active(x) if self.cfg.selection == "batchtopk" else None
        if act is None:
            code = self.encode(x)
            x_hat = self.decode(code, x)
            inner = None
        else:
            self.remember(self._x_in(x))
            f = act.z.relu()
            code = act.code(f)
            prefixes = act.prefix_decodes(f, self.W_dec, self.ends) + offset.unsqueeze(-2)  # [B, G, d]
            x_hat, inner = prefixes[:, -1], prefixes[:, :-1]
        mse = (x_hat.float() - y.float()).pow(2).sum(-1).mean()  # the full dictionary's, unweighted
        prefix = self.weights[-1] * mse
        if len(self.ends) > 1:
            if inner is None:
                inner = self.prefix_reconstructions(code, self.ends[:-1]) + offset.unsqueeze(
                    -2
                )  # [B, G-1, d]
            sse = (inner.float() - y.float().unsqueeze(1)).pow(2).sum(-1).mean(0)  # [G-1]
            prefix = prefix + sum(w * s for w, s in zip(self.weights[:-1], sse, strict=True))
        losses = {"prefix": prefix}
        losses.update(
            auxk_loss(self, self._x_in(x), y - x_hat, self.cfg.aux_k or self.d_in // 2, self.cfg.aux_alpha)
        )
        return Output(x_hat, code, losses, logs={"mse": mse.detach()})
