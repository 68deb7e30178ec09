"""Latent-parallel (tensor-parallel) TopK: each rank owns ``n / R`` latents of one dictionary.

Rank ``r`` holds latents ``[r·n/R, (r+1)·n/R)``: those columns of ``W_enc``, that slice of ``b_enc`` and
those rows of ``W_dec``; ``b_dec`` and ``input_scale`` are replicated, and every rank sees the same
batch ``x [B, d]``. One forward:

1. local pre-activations and local top-k (``k' = k``, the fused kernel on CUDA) ``[B, k]``;
2. all-gather candidate values and global indices ``[R, B, k]``; every rank selects the same global
   top-k (ties towards the lower latent index, as the unsharded encoder does);
3. each rank decodes only the winners it owns (a partial ``[B, d]``), the partials are all-reduce-summed
   and ``b_dec`` is added once.

With ``k' = k`` the selection is exact (every global winner is in its shard's local top-k), so training
matches the unsharded dictionary up to floating-point summation order. Gradients: ``W_enc``/``b_enc``/
``W_dec`` gradients are local and complete; the encoder input ``x − b_dec`` passes through
:class:`~sparsedict.distributed.CopyToShards` (identity forward, all-reduce of the gradient backward), so ``b_dec``'s gradient
is complete and identical on every rank. The loss is replicated, so no gradient averaging is needed
(``latent_sharded = True`` makes ``all_reduce_grads`` skip these models). AuxK uses the same
gather/select/partial-decode scheme over the dead latents.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsedict import distributed as dist
from sparsedict.dictionaries.base import Dictionary, SparseCode, build
from sparsedict.dictionaries.topk import TopK, residual_variance
from sparsedict.distributed import CopyToShards, ReduceFromShards
from sparsedict.kernels import sparse_decode, topk_encode


def global_topk(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Select the global top-k from every rank's candidates.

    ``values, indices [B, k']``: this rank's candidates, sorted by value descending with ties by index
    (global latent ids). Returns ``(top_values [B, k], top_indices [B, k], own [B, k], slot [B, k])``:
    ``own`` marks winners held by this rank and ``slot`` their position among its ``k'`` candidates.
    Identical on every rank (a stable sort over the gathered candidates, ties towards lower ids).
    """
    B, kc = values.shape
    cand_v = dist.all_gather(values.detach()).permute(1, 0, 2).reshape(B, -1)  # [B, R·k'] rank-major
    cand_i = dist.all_gather(indices).permute(1, 0, 2).reshape(B, -1)
    _, order = cand_v.sort(dim=1, descending=True, stable=True)
    pos = order[:, :k]
    own = pos // kc == dist.rank()
    slot = torch.where(own, pos % kc, torch.zeros_like(pos))
    return cand_v.gather(1, pos), cand_i.gather(1, pos), own, slot


class ShardedTopK(TopK):
    """This rank's slice of a :class:`TopK` dictionary; ``cfg`` (and ``n_latents``) describe the whole one."""

    latent_sharded = True
    supports_latent_sharding = False  # already a slice

    def __init__(self, full: TopK, rank: int, world: int):
        nn.Module.__init__(self)
        self.cfg = full.cfg
        self.meta = full.meta
        self._dead_mask = None
        n, k = full.n_latents, full.cfg.k
        if n % world:
            raise ValueError(
                f"n_latents={n} is not divisible by {world} ranks: pick a width that is (shard_latents)"
            )
        if n // world < k:
            raise ValueError(f"each of {world} ranks would own {n // world} latents < k={k}: use fewer ranks")
        if full.W_skip is not None:
            raise ValueError("shard_latents does not support skip transcoders yet; train them data-parallel")
        self.rank, self.world, self.n_local = rank, world, n // world
        self.lo = rank * self.n_local
        sl = slice(self.lo, self.lo + self.n_local)
        self.W_dec = nn.Parameter(full.W_dec.detach()[sl].clone())
        self.W_enc = nn.Parameter(full.W_enc.detach()[:, sl].clone())
        self.b_enc = nn.Parameter(full.b_enc.detach()[sl].clone())
        self.b_dec = nn.Parameter(full.b_dec.detach().clone())
        self.W_skip = None
        self.register_buffer("input_scale", full.input_scale.detach().clone())

    def replicated_tensors(self) -> list[Tensor]:
        """Tensors that every rank holds whole (kept identical by broadcasting rank 0's)."""
        return [self.b_dec.data, self.input_scale]

    def _owned(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        own = (indices >= self.lo) & (indices < self.lo + self.n_local)
        return own, torch.where(own, indices - self.lo, torch.zeros_like(indices))

    def encode(self, x: Tensor) -> SparseCode:
        """Global code ``[B, k]`` (global latent ids); values this rank owns carry its gradient."""
        x_in = CopyToShards.apply(self._x_in(x))
        vals, idx = topk_encode(x_in, self.W_enc, self.b_enc, self.cfg.k)
        top_v, top_i, own, slot = global_topk(vals, idx + self.lo, self.cfg.k)
        values = torch.where(own, vals.gather(1, slot), top_v.to(vals.dtype))
        return SparseCode(values, top_i, self.n_latents)

    def decode(self, code: SparseCode, x: Tensor | None = None) -> Tensor:
        """Partial decode of the owned entries, summed over ranks, plus ``b_dec``: ``[B, d]``."""
        if code.indices is None:
            raise ValueError("ShardedTopK decodes k-sparse codes only")
        own, local = self._owned(code.indices)
        vals = torch.where(own, code.values, torch.zeros_like(code.values))
        return ReduceFromShards.apply(sparse_decode(local, vals, self.W_dec)) + self.b_dec

    def aux_losses(self, x: Tensor, y: Tensor, code: SparseCode, x_hat: Tensor) -> dict[str, Tensor]:
        """AuxK over the dead latents of all shards (same maths as ``topk.auxk_loss``)."""
        dead = self._dead_mask
        alpha = self.cfg.aux_alpha
        if not self.training or alpha <= 0 or dead is None or not bool(dead.any()):
            return {}
        k_aux = min(self.cfg.aux_k or self.d_in // 2, int(dead.sum()))
        dead_loc = dead[self.lo : self.lo + self.n_local].nonzero().squeeze(1)
        x_in = CopyToShards.apply(self._x_in(x))
        B = x.shape[0]
        kk = min(k_aux, dead_loc.numel())
        pre = x_in @ self.W_enc[:, dead_loc] + self.b_enc[dead_loc]  # [B, n_dead_local]
        v, j = pre.topk(kk, dim=-1)  # sorted descending, as global_topk expects
        gi = dead_loc[j] + self.lo
        pad = k_aux - kk  # every rank offers k_aux candidates; padding never wins (-inf)
        v = torch.cat([v, v.new_full((B, pad), float("-inf"))], 1)
        gi = torch.cat([gi, gi.new_full((B, pad), self.lo)], 1)
        _, top_i, own, slot = global_topk(v, gi, k_aux)
        vals = torch.where(own, v.gather(1, slot), torch.zeros_like(own, dtype=v.dtype)).relu()
        _, local = self._owned(top_i)
        e_hat = ReduceFromShards.apply(sparse_decode(local, vals.to(self.W_dec.dtype), self.W_dec))
        residual = (y - x_hat).detach().float()
        loss = (e_hat.float() - residual).pow(2).sum(-1).mean() / residual_variance(residual)
        return {"auxk": alpha * loss}

    @torch.no_grad()
    def unshard(self) -> TopK | None:
        """Collective: the whole dictionary as a plain :class:`TopK` on rank 0 (None on other ranks)."""
        w_enc = dist.all_gather(self.W_enc.detach())  # [R, d, n/R]
        b_enc = dist.all_gather(self.b_enc.detach())
        w_dec = dist.all_gather(self.W_dec.detach())
        if not dist.is_main():
            return None
        full = build(self.cfg)
        full.W_enc.copy_(torch.cat(list(w_enc), 1))
        full.b_enc.copy_(b_enc.reshape(-1))
        full.W_dec.copy_(w_dec.reshape(-1, w_dec.shape[-1]))
        full.b_dec.copy_(self.b_dec)
        full.input_scale.copy_(self.input_scale)
        return full.cpu()


def shard(model: Dictionary, rank: int, world: int) -> Dictionary:
    """Rank ``rank``'s slice of ``model`` among ``world`` ranks (architectures with ``supports_latent_sharding``:
    TopK here, others through their own ``shard(rank, world)``, e.g. the cross-layer transcoder's)."""
    if not type(model).supports_latent_sharding:
        raise ValueError(
            f"shard_latents supports 'topk' and 'clt' dictionaries only; this one is {model.architecture!r}: "
            "train it data-parallel (train.shard_latents: false)"
        )
    if isinstance(model, TopK):
        return ShardedTopK(model, rank, world)
    return model.shard(rank, world)
