"""Sparse decode (embedding bag): ``x̂ = b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]``.

Shapes: ``indices, values [B, k]``, ``W_dec [n, d]``, ``b_dec [d]``, upstream ``g = ∂L/∂x̂ [B, d]``.

* forward: ``_embedding_bag_kernel`` — one program per (row, d-block), fp32 accumulation over k.
* ``∂/∂values`` (SDDMM): ``gval[b, j] = <g_b, W_dec[idx[b, j]]>`` — ``_sddmm_kernel``.
* ``∂/∂W_dec``: ``G[i] = Σ_{(b,j): idx[b,j]=i} values[b, j] · g_b`` — the (b, j) pairs are grouped by latent
  (stable argsort + counts, so the summation order is fixed and the result deterministic) and
  ``_segment_sum_kernel`` sums each latent's run; rows of unused latents get exact zeros.
* ``∂/∂b_dec = Σ_b g_b``.

The same three kernels serve the TopK encoder backward (see :mod:`sparsedict.kernels.topk_encode`).
``sparse_decode_ref`` is the plain-torch reference (``F.embedding_bag``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sparsedict.kernels._common import LazyJit, check_float, next_pow2
from torch import Tensor

tl = None  # triton.language, bound by LazyJit at first launch (importing this module never imports Triton)


def sparse_decode_ref(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Plain-torch reference. ``indices, values [B, k]``, ``W_dec [n, d]``, ``b_dec [d]`` -> ``[B, d]``."""
    check_decode_args(indices, values, W_dec, b_dec)
    if W_dec.is_cuda and W_dec.dtype != torch.float32:
        # torch's CUDA embedding_bag has no bf16/fp16 backward for per_sample_weights: gather + weighted sum
        out = torch.einsum("bk,bkd->bd", values.to(W_dec.dtype), W_dec[indices])
    else:
        out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec


def check_decode_args(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> None:
    if indices.shape != values.shape or indices.ndim != 2:
        raise ValueError(
            f"sparse_decode: indices {list(indices.shape)} and values {list(values.shape)} must both be [B, k]"
        )
    if W_dec.ndim != 2:
        raise ValueError(f"sparse_decode: W_dec must be [n, d], got {list(W_dec.shape)}")
    if b_dec is not None and b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"sparse_decode: b_dec {list(b_dec.shape)} must be [d={W_dec.shape[1]}]")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sparse_decode: indices must be int64 or int32, got {indices.dtype}")


# ---------------------------------------------------------------------------------------------------
# Triton kernels (plain functions; LazyJit decorates them at first launch)


def _embedding_bag_kernel(
    Idx, Coef, T, Bias, Out, D, K, stride_t, stride_o,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``Out[b, c] = Bias[c] + Σ_j Coef[b, j] · T[Idx[b, j], c]``; grid (B, cdiv(D, BLOCK_D))."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        jm = js < K
        i = tl.load(Idx + b * K + js, mask=jm, other=0).to(tl.int64)
        c = tl.load(Coef + b * K + js, mask=jm, other=0.0).to(tl.float32)
        t = tl.load(T + i[:, None] * stride_t + cols[None, :], mask=jm[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * t.to(tl.float32), 0)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=dmask, other=0.0).to(tl.float32)
    tl.store(Out + b * stride_o + cols, acc.to(Out.dtype.element_ty), mask=dmask)


def _sddmm_kernel(Idx, G, T, Out, D, K, stride_t, stride_g, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Out[b, j] = Σ_c G[b, c] · T[Idx[b, j], c]`` (fp32); grid (B, cdiv(K, BLOCK_K))."""
    b = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jm = js < K
    i = tl.load(Idx + b * K + js, mask=jm, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dmask = cols < D
        g = tl.load(G + b * stride_g + cols, mask=dmask, other=0.0).to(tl.float32)
        t = tl.load(T + i[:, None] * stride_t + cols[None, :], mask=jm[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(t.to(tl.float32) * g[None, :], 1)
    tl.store(Out + b * K + js, acc, mask=jm)


def _segment_sum_kernel(
    Order, Offsets, Coef, X, Out, Sum, D, K, stride_x, stride_o,
    HAS_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``Out[i, c] = Σ_{e in run(i)} Coef[e] · X[e // K, c]`` over latent i's run of the sorted pairs.

    ``Order`` lists flat (b·K + j) positions sorted by latent, ``Offsets [n+1]`` delimits each latent's
    run. Grid (n, cdiv(D, BLOCK_D)). Optionally ``Sum[i] = Σ Coef[e]`` (bias gradients).
    """
    i = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(Offsets + i)
    end = tl.load(Offsets + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        em = es < end
        e = tl.load(Order + es, mask=em, other=0)
        c = tl.load(Coef + e, mask=em, other=0.0).to(tl.float32)
        rows = e // K
        x = tl.load(
            X + rows[:, None] * stride_x + cols[None, :], mask=em[:, None] & dmask[None, :], other=0.0
        )
        acc += tl.sum(c[:, None] * x.to(tl.float32), 0)
        csum += c
    tl.store(Out + i * stride_o + cols, acc.to(Out.dtype.element_ty), mask=dmask)
    if HAS_SUM and pd == 0:
        tl.store(Sum + i, tl.sum(csum, 0))


_embedding_bag = LazyJit(_embedding_bag_kernel)
_sddmm = LazyJit(_sddmm_kernel)
_segment_sum = LazyJit(_segment_sum_kernel)


# ---------------------------------------------------------------------------------------------------
# Launchers


def embedding_bag_fwd(indices: Tensor, coef: Tensor, table: Tensor, bias: Tensor | None, out_dtype) -> Tensor:
    """``[B, d]`` = ``bias + Σ_j coef[:, j] · table[indices[:, j]]`` with fp32 accumulation."""
    B, K = indices.shape
    D = table.shape[1]
    table = table if table.stride(1) == 1 else table.contiguous()
    out = torch.empty(B, D, dtype=out_dtype, device=table.device)
    if B == 0:
        return out
    BLOCK_D = min(next_pow2(D), 256)
    BLOCK_K = min(next_pow2(K), 32)
    grid = (B, triton_cdiv(D, BLOCK_D))
    _embedding_bag[grid](
        indices.contiguous(), coef.contiguous(), table, bias if bias is not None else table, out,
        D, K, table.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


def sddmm(indices: Tensor, g: Tensor, table: Tensor) -> Tensor:
    """``[B, k]`` fp32: ``out[b, j] = <g_b, table[indices[b, j]]>``."""
    B, K = indices.shape
    D = table.shape[1]
    table = table if table.stride(1) == 1 else table.contiguous()
    g = g if g.stride(1) == 1 else g.contiguous()
    out = torch.empty(B, K, dtype=torch.float32, device=g.device)
    if B == 0:
        return out
    BLOCK_K = min(next_pow2(K), 32)
    BLOCK_D = min(next_pow2(D), 128)
    _sddmm[(B, triton_cdiv(K, BLOCK_K))](
        indices.contiguous(),
        g,
        table,
        out,
        D,
        K,
        table.stride(0),
        g.stride(0),
        BLOCK_K=BLOCK_K,
        BLOCK_D=BLOCK_D,
    )
    return out


def group_by_latent(indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(order [B·k], offsets [n+1])``: flat positions sorted (stably) by latent, and each latent's run."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return order, offsets


def segment_sum(
    indices: Tensor, coef: Tensor, x: Tensor, n: int, grouping=None, with_sum: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``out [n, d]`` fp32 with ``out[i] = Σ_{(b,j): idx=i} coef[b, j] · x_b`` (and ``Σ coef`` per latent)."""
    _B, K = indices.shape
    D = x.shape[1]
    order, offsets = grouping if grouping is not None else group_by_latent(indices, n)
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(n, D, dtype=torch.float32, device=x.device)
    csum = torch.empty(n, dtype=torch.float32, device=x.device) if with_sum else None
    BLOCK_D = min(next_pow2(D), 256)
    _segment_sum[(n, triton_cdiv(D, BLOCK_D))](
        order, offsets, coef.contiguous(), x, out, csum if with_sum else out, D, K, x.stride(0), out.stride(0),
        HAS_SUM=with_sum, BLOCK_E=16, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out, csum


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# Autograd


class SparseDecodeFn(torch.autograd.Function):
    """Triton embedding-bag forward; backward = SDDMM (values), grouped segment sums (W_dec), column sum."""

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None):
        out = embedding_bag_fwd(indices, values, W_dec, b_dec, W_dec.dtype)
        ctx.save_for_backward(indices, values, W_dec)
        ctx.has_bias = b_dec is not None
        ctx.values_dtype = values.dtype
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        indices, values, W_dec = ctx.saved_tensors
        g = g.contiguous()
        g_val = g_W = g_b = None
        if ctx.needs_input_grad[1]:
            g_val = sddmm(indices, g, W_dec).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            g_W = segment_sum(indices, values, g, W_dec.shape[0])[0].to(W_dec.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g.float().sum(0).to(W_dec.dtype)
        return None, g_val, g_W, g_b


def sparse_decode_triton(
    indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None
) -> Tensor:
    """Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``); same contract as :func:`sparse_decode_ref`."""
    check_decode_args(indices, values, W_dec, b_dec)
    for name, t in (("values", values), ("W_dec", W_dec)):
        check_float(name, "sparse_decode", t)
    if W_dec.stride(1) != 1:
        raise ValueError(
            "sparse_decode: the Triton path needs W_dec with contiguous rows (W_dec.stride(1) == 1)"
        )
    return SparseDecodeFn.apply(indices, values, W_dec, b_dec)
