"""TopK encode: ``TopK(ReLU(x W_enc + b_enc))`` -> (values [B, k], indices [B, k]).

The reference computes the dense pre-activation once, selects with ``torch.topk`` and backpropagates
through the selected entries only (:class:`TopKEncodeRefFn`): the encoder weight gradient is an
index-add over the B·k selected columns, never a dense ``[B, n]`` gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TopKEncodeRefFn(torch.autograd.Function):
    """Dense forward, sparse backward (grad flows only through the k selected pre-activations)."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int):
        pre = torch.addmm(b_enc.to(x.dtype), x, W_enc.to(x.dtype))
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.relu_()
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_idx):
        x, W_enc, values, indices = ctx.saved_tensors
        g = torch.where(values > 0, g_values, torch.zeros_like(g_values))  # ReLU
        B, k = indices.shape
        n = W_enc.shape[1]
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            # gx[b] = Σ_j g[b,j] W_enc[:, idx[b,j]]  (embedding bag over columns of W_enc)
            gx = torch.nn.functional.embedding_bag(
                indices, W_enc.T.to(g.dtype), per_sample_weights=g, mode="sum"
            ).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_idx = indices.reshape(-1)
            gb = torch.zeros(n, dtype=torch.float32, device=g.device).index_add_(0, flat_idx, g.reshape(-1).float())
            if ctx.needs_input_grad[1]:
                # gW[:, i] = Σ_{(b,j): idx=i} g[b,j] x_b  -> rows of gW^T
                contrib = (g.unsqueeze(-1).float() * x.unsqueeze(1).float()).reshape(B * k, -1)
                gWt = torch.zeros(n, x.shape[1], dtype=torch.float32, device=g.device)
                gWt.index_add_(0, flat_idx, contrib)
                gW = gWt.T.to(W_enc.dtype)
            gb = gb.to(W_enc.dtype)
        return gx, gW, gb, None


def topk_encode_ref(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-torch reference of the fused TopK encoder. ``x [B, d]``, ``W_enc [d, n]``, ``b_enc [n]``."""
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(f"topk_encode: x {list(x.shape)} and W_enc {list(W_enc.shape)} do not match ([B, d] @ [d, n])")
    if not 0 < k <= W_enc.shape[1]:
        raise ValueError(f"topk_encode: k={k} must be in 1..n={W_enc.shape[1]}")
    return TopKEncodeRefFn.apply(x, W_enc, b_enc, k)
