"""Sparse decode (embedding bag): ``x̂ = b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]``.

Shapes: ``indices, values [B, k]``, ``W_dec [n, d]``, ``b_dec [d]``, upstream ``g = ∂L/∂x̂ [B, d]``.

* forward: ``_embedding_bag_kernel`` — one program per (row, d-block), fp32 accumulation over k.
* ``∂/∂values`` (SDDMM): ``gval[b, j] = <g_b, W_dec[idx[b, j]]>`` — ``_sddmm_kernel``.
* ``∂/∂W_dec``: ``G[i] = Σ_{(b,j): idx[b,j]=i} values[b, j] · g_b`` — the (b, j) pairs are grouped by latent
  (stable sort + counts, so the summation order is fixed and the result deterministic) and
  ``_grouped_sum_kernel`` sums the runs of 32 latents per program as a one-hot × gathered-rows ``tl.dot``
  (one program per latent is latency-bound: benchmarks/RESULTS_kernels.md); rows of unused latents get exact zeros. ``GROUPED_SUM_IMPL = 'torch'`` swaps in ``F.embedding_bag``
  with one bag per latent (also deterministic) for comparison.
* ``∂/∂b_dec = Σ_b g_b``.

The same three kernels serve the TopK encoder backward (see :mod:`sparsedict.kernels.topk_encode`).
``sparse_decode_ref`` is the plain-torch reference (``F.embedding_bag``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from sparsedict.kernels._common import LazyJit, check_float, interpreting, next_pow2
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


def _grouped_sum_kernel(
    Order, Lat, Offsets, Coef, X, Out, Sum, N, D, K, stride_x, stride_on, stride_od,
    HAS_SUM: tl.constexpr, LAT_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    LOW_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``Out[i, c] = Σ_{e in run(i)} Coef[e] · X[e // K, c]`` for LAT_BLOCK consecutive latents per program.

    ``Order`` lists flat (b·K + j) positions sorted (stably) by latent, ``Lat`` the latent of each sorted
    entry, ``Offsets [n+1]`` delimits each latent's run; the runs of latents i0..i0+LAT_BLOCK-1 are one
    contiguous stretch of the sorted list. It is walked BLOCK_E entries at a time: the gathered rows
    ``X [BLOCK_E, BLOCK_D]`` are multiplied by a ``[LAT_BLOCK, BLOCK_E]`` one-hot matrix holding the
    coefficients (one ``tl.dot``, fp32 accumulation), which sums every latent's entries in the sorted order —
    deterministic, no atomics. With LOW_PRECISION (bf16/fp16 X) the coefficients are rounded to X's dtype
    for the dot (exact for coefficients that are already bf16/fp16 numbers, as in the training paths).
    Grid (cdiv(n, LAT_BLOCK), cdiv(D, BLOCK_D)); rows of unused latents get exact zeros. Optionally
    ``Sum[i] = Σ Coef[e]`` (bias gradients, fp32).
    """
    i0 = tl.program_id(0) * LAT_BLOCK
    pd = tl.program_id(1)
    lats = i0 + tl.arange(0, LAT_BLOCK)
    lmask = lats < N
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(Offsets + i0)
    end = tl.load(Offsets + tl.minimum(i0 + LAT_BLOCK, N))
    acc = tl.zeros([LAT_BLOCK, BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([LAT_BLOCK], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        em = es < end
        e = tl.load(Order + es, mask=em, other=0)
        lat = tl.load(Lat + es, mask=em, other=-1)
        c = tl.load(Coef + e, mask=em, other=0.0).to(tl.float32)
        rows = e // K
        x = tl.load(
            X + rows[:, None] * stride_x + cols[None, :], mask=em[:, None] & dmask[None, :], other=0.0
        )
        oh = tl.where(lat[None, :] == lats[:, None], c[None, :], 0.0)  # [LAT_BLOCK, BLOCK_E]
        if LOW_PRECISION:
            ohq = oh.to(X.dtype.element_ty)
            if UPCAST:  # Triton's CPU interpreter gets bf16 dots wrong; bf16 products are exact in fp32
                acc = tl.dot(ohq.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(ohq, x, acc)
        else:
            acc = tl.dot(oh, x.to(tl.float32), acc, input_precision="ieee")
        if HAS_SUM:
            csum += tl.sum(oh, 1)
    out = Out + lats.to(tl.int64)[:, None] * stride_on + cols[None, :].to(tl.int64) * stride_od
    tl.store(out, acc.to(Out.dtype.element_ty), mask=lmask[:, None] & dmask[None, :])
    if HAS_SUM and pd == 0:
        tl.store(Sum + lats, csum, mask=lmask)


_embedding_bag = LazyJit(_embedding_bag_kernel)
_sddmm = LazyJit(_sddmm_kernel)
_grouped_sum = LazyJit(_grouped_sum_kernel)


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


GROUPED_SUM_IMPL = os.environ.get("SPARSEDICT_GROUPED_SUM", "tiled")
"""How the Triton autograd functions compute the grouped sums (``∂/∂W_dec`` and the encoder's ``∂/∂W_enc``):
``'tiled'`` (``_grouped_sum_kernel``) or ``'torch'`` (``F.embedding_bag`` with one bag per latent, the
reference's formulation). Both are deterministic. Set by ``SPARSEDICT_GROUPED_SUM`` at import, or assign."""

GROUPED_SUM_CONFIG: dict = {"LAT_BLOCK": 32, "BLOCK_E": 64, "BLOCK_D": 128, "num_warps": 4}
"""Tiles of ``_grouped_sum_kernel`` (BLOCK_D is capped at next_pow2(d)); benchmarks may override."""


def group_by_latent(indices: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(order [B·k], sorted latents [B·k], offsets [n+1])``: flat positions sorted stably by latent, the
    latent of each sorted entry, and each latent's run."""
    flat = indices.reshape(-1)
    lat, order = torch.sort(flat, stable=True)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return order, lat, offsets


def segment_sum(
    indices: Tensor, coef: Tensor, x: Tensor, n: int, grouping=None, with_sum: bool = False,
    out_dtype: torch.dtype = torch.float32, transpose_out: bool = False, impl: str | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``out[i] = Σ_{(b,j): idx=i} coef[b, j] · x_b`` (fp32 sums) and, with ``with_sum``, ``Σ coef`` per latent.

    ``out`` is ``[n, d]`` in ``out_dtype``, or its transpose ``[d, n]`` (contiguous) with ``transpose_out``.
    ``grouping``: a precomputed :func:`group_by_latent`; ``impl``: ``'tiled'`` / ``'torch'`` (None:
    :data:`GROUPED_SUM_IMPL`). Deterministic either way: the entries of each latent are summed in the
    order of a stable sort (the tiled kernel's dot order is fixed per config and GPU).
    """
    impl = impl or GROUPED_SUM_IMPL
    _B, K = indices.shape
    D = x.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    order, lat, offsets = grouping if grouping is not None else group_by_latent(indices, n)
    if impl == "torch":
        table = x.float()
        if with_sum:  # a column of ones gives Σ coef in the same (deterministic) bag sums
            table = torch.cat([table, torch.ones(table.shape[0], 1, device=x.device)], 1)
        rows = torch.div(order, K, rounding_mode="floor")
        outf = F.embedding_bag(
            rows, table, offsets[:-1], per_sample_weights=coef.reshape(-1)[order].float(), mode="sum"
        )
        csum = outf[:, D].contiguous() if with_sum else None
        outf = outf[:, :D]
        out = outf.T.contiguous().to(out_dtype) if transpose_out else outf.to(out_dtype)
        return out, csum
    if impl != "tiled":
        raise ValueError(f"segment_sum: impl must be 'tiled' or 'torch', not {impl!r}")
    cfg = {**GROUPED_SUM_CONFIG, **(config or {})}
    out = torch.empty((D, n) if transpose_out else (n, D), dtype=out_dtype, device=x.device)
    stride_on, stride_od = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    csum = torch.empty(n, dtype=torch.float32, device=x.device) if with_sum else None
    if n == 0:
        return out, csum
    L = cfg["LAT_BLOCK"]
    BLOCK_D = max(16, min(next_pow2(D), cfg["BLOCK_D"]))
    low = x.dtype != torch.float32
    launch = {"num_warps": cfg["num_warps"]} if x.is_cuda else {}
    _grouped_sum[(triton_cdiv(n, L), triton_cdiv(D, BLOCK_D))](
        order, lat, offsets, coef.contiguous(), x, out, csum if with_sum else out,
        n, D, K, x.stride(0), stride_on, stride_od,
        HAS_SUM=with_sum, LAT_BLOCK=L, BLOCK_E=cfg["BLOCK_E"], BLOCK_D=BLOCK_D,
        LOW_PRECISION=low, UPCAST=low and interpreting(), **launch,
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
            g_W = segment_sum(indices, values, g, W_dec.shape[0], out_dtype=W_dec.dtype)[0]
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
