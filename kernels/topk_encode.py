"""TopK encode: ``TopK(ReLU(x W_enc + b_enc))`` -> (values [B, k], indices [B, k]).

Selection is on the pre-activations ``pre = x W_enc + b_enc``; ties are broken towards the **lower latent
index** (both paths), ``values = ReLU(pre[indices])`` and ``indices`` are int64. Backward flows only
through the k selected entries: with ``gp = g_values · [values > 0]``,
``gx_b = Σ_j gp[b, j] · W_enc[:, idx[b, j]]`` (embedding bag over W_enc's columns),
``gW_enc[:, i] = Σ_{(b,j): idx=i} gp[b, j] · x_b`` and ``gb_enc[i] = Σ gp`` (grouped sums) — never a dense
``[B, n]`` gradient.

* ``topk_encode_ref`` / :class:`TopKEncodeRefFn`: plain torch; the ``[B, n]`` pre-activation is computed
  once in the input dtype (torch's GEMM accumulates in fp32); output sorted by value, descending.
* ``topk_encode_fwd``: the fused Triton forward. ``_topk_encode_fwd_kernel`` runs a GEMM over
  ``[BLOCK_M, BLOCK_N]`` tiles with fp32 accumulation, adds the bias and merges each tile into a running
  per-row top-``K_PAD`` held in registers; the latent axis is split S ways for occupancy and
  ``_topk_merge_kernel`` sorts the ``[B, S·K_PAD]`` candidates (exact: each split keeps its own top-k).
  Each candidate is packed into one int64 key ``(order-preserving float bits << 32) | (2^31−1−index)``
  so a single integer max gives "largest value, lowest index". The ``[B, n]`` pre-activation never
  reaches memory. Selection uses the fp32 accumulator; for bf16 inputs the reference rounds the
  pre-activations to bf16 first, so the two agree exactly only where that rounding does not tie values.
* :class:`TopKEncodeFn`: fused forward + the sparse backward on the Triton kernels of
  :mod:`sparsedict.kernels.sparse_decode`.
"""

from __future__ import annotations

import torch
from sparsedict.kernels import topk_cpu
from sparsedict.kernels._common import LazyJit, check_float, interpreting, next_pow2, num_sms
from sparsedict.kernels.sparse_decode import embedding_bag_fwd, group_by_latent, segment_sum, triton_cdiv
from torch import Tensor

tl = None  # triton.language, bound by LazyJit at first launch (importing this module never imports Triton)

MAX_K = 128
"""Largest k the fused kernel takes (its running top-k lives in registers)."""


def check_encode_args(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> None:
    if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"topk_encode: x {list(x.shape)} and W_enc {list(W_enc.shape)} do not match ([B, d] @ [d, n])"
        )
    if b_enc.shape != (W_enc.shape[1],):
        raise ValueError(f"topk_encode: b_enc {list(b_enc.shape)} must be [n={W_enc.shape[1]}]")
    if not 0 < k <= W_enc.shape[1]:
        raise ValueError(f"topk_encode: k={k} must be in 1..n={W_enc.shape[1]}")


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``pre [B, n]``, sorted descending, ties -> lower index. Returns (pre values, idx).

    On CPU with numba installed this is one heap scan per row (:mod:`sparsedict.kernels.topk_cpu`);
    otherwise ``torch.topk`` with a tie fix-up.
    """
    if topk_cpu.supported(pre, k):
        return topk_cpu.select_topk_cpu(pre, k)
    kk = min(k + 1, pre.shape[1])
    vals, idx = pre.topk(kk, dim=-1, sorted=True)
    # torch.topk does not promise which of several equal values it picks; fix the rows where the k-th
    # value is tied with an unselected entry (rare with real data, common with quantised inputs). The
    # (k+1)-th largest equals the k-th exactly in those rows, so no extra pass over [B, n] is needed.
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1) if kk > k else idx.new_zeros(0)
    vals, idx = vals[:, :k], idx[:, :k]
    kth = vals[:, -1:]
    if tied.numel():
        p, t = pre[tied], kth[tied]
        gt, eq = p > t, p == t
        take = gt | (eq & (eq.cumsum(-1) <= k - gt.sum(-1, keepdim=True)))
        cols = take.nonzero()[:, 1].view(-1, k)  # ascending index within each row
        v = p.gather(1, cols)
        # sort by value descending, then index ascending (stable sort on an index-sorted row)
        v_sorted, o = v.sort(dim=-1, descending=True, stable=True)
        vals[tied], idx[tied] = v_sorted, cols.gather(1, o)
    # ties among the selected entries themselves: order them by index too (stable sort by value)
    o = torch.argsort(idx, dim=-1)
    idx, vals = idx.gather(1, o), vals.gather(1, o)
    vals, o = vals.sort(dim=-1, descending=True, stable=True)
    return vals, idx.gather(1, o)


def sparse_encoder_backward_ref(
    x: Tensor, W_enc: Tensor, gp: Tensor, indices: Tensor, needs: tuple[bool, ...]
):
    """Reference sparse encoder backward (torch ops, at most ``[B, d]`` / ``[n, d]`` temporaries). ``gp [B, k]`` fp32.

    ``gx`` is an embedding bag over the rows of ``W_encᵀ`` (made contiguous once: a strided table makes
    ``embedding_bag`` many times slower); ``gW_encᵀ`` is an embedding bag over the rows of ``x`` with one bag
    per latent — the ``(b, j)`` pairs grouped by latent with a stable sort, so the order is deterministic.
    """
    n = W_enc.shape[1]
    gx = gW = gb = None
    if needs[0]:
        table = W_enc.T.float().contiguous()
        gx = torch.nn.functional.embedding_bag(indices, table, per_sample_weights=gp, mode="sum")
        gx = gx.to(x.dtype)
    if needs[1] or needs[2]:
        gb = torch.zeros(n, dtype=torch.float32, device=gp.device).index_add_(
            0, indices.reshape(-1), gp.reshape(-1)
        )
        gb = gb.to(W_enc.dtype)
    if needs[1]:
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n)
        offsets = counts.cumsum(0) - counts
        rows = torch.div(order, indices.shape[1], rounding_mode="floor")
        gWt = torch.nn.functional.embedding_bag(
            rows, x.float(), offsets, per_sample_weights=gp.reshape(-1)[order], mode="sum"
        )
        gW = gWt.T.to(W_enc.dtype)
    return gx, gW, gb


class TopKEncodeRefFn(torch.autograd.Function):
    """Dense forward, sparse backward (grad flows only through the k selected pre-activations)."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int):
        pre = torch.addmm(b_enc.to(x.dtype), x, W_enc.to(x.dtype))
        values, indices = select_topk(pre, k)
        values = values.relu_()
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_idx):
        x, W_enc, values, indices = ctx.saved_tensors
        gp = torch.where(values > 0, g_values, torch.zeros_like(g_values)).float()  # ReLU
        gx, gW, gb = sparse_encoder_backward_ref(x, W_enc, gp, indices, ctx.needs_input_grad)
        return gx, gW, gb, None


def topk_encode_ref(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-torch reference of the fused TopK encoder. ``x [B, d]``, ``W_enc [d, n]``, ``b_enc [n]``."""
    check_encode_args(x, W_enc, b_enc, k)
    return TopKEncodeRefFn.apply(x, W_enc, b_enc, k)


# ---------------------------------------------------------------------------------------------------
# Triton forward


def _topk_encode_fwd_kernel(
    X, W, Bias, Keys, B, D, N, n_per_split,
    stride_xb, stride_xd, stride_wd, stride_wn, stride_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Per (row tile, split): the top-``K_PAD`` packed keys of ``x W + b`` over the split's latents.

    Grid (cdiv(B, BLOCK_M), S); writes ``Keys[b, s, :]`` (unsorted; unfilled slots hold sentinels
    below every real key).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    kcol = tl.arange(0, K_PAD)
    # sentinel -9.2e18 lies below every real key (the smallest, for -inf, is about -9.19e18)
    run = tl.full([BLOCK_M, K_PAD], -9200000000000000000, tl.int64) + kcol[None, :].to(
        tl.int64
    )  # distinct sentinels
    thr = tl.min(run, 1)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_hi
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            ks = d0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            xt = tl.load(
                X + rows64[:, None] * stride_xb + ks[None, :] * stride_xd,
                mask=rmask[:, None] & kmask[None, :], other=0.0,
            )  # fmt: skip
            wt = tl.load(
                W + ks[:, None].to(tl.int64) * stride_wd + cols[None, :] * stride_wn,
                mask=kmask[:, None] & cmask[None, :], other=0.0,
            )  # fmt: skip
            if UPCAST:  # Triton's CPU interpreter gets bf16 dots wrong; bf16 products are exact in fp32
                xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        acc += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc = acc + 0.0  # -0.0 -> +0.0 so equal values get equal keys
        bits = acc.to(tl.int32, bitcast=True)
        ordv = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving as signed int32
        key = (ordv.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)[None, :]
        cand = tl.where(cmask[None, :] & (key > thr[:, None]), key, -9200000000000000001)
        best = tl.max(cand, 1)
        # Insert the best remaining candidate of every row in place of that row's current minimum until no
        # candidate beats it (keys are unique, so ``run == thr`` marks exactly one slot).
        while tl.max((best > thr).to(tl.int32), 0) > 0:
            ins = best > thr
            run = tl.where(ins[:, None] & (run == thr[:, None]), best[:, None], run)
            thr = tl.min(run, 1)
            cand = tl.where((cand != best[:, None]) & (cand > thr[:, None]), cand, -9200000000000000001)
            best = tl.max(cand, 1)
    out = Keys + rows64[:, None] * stride_kb + pid_s * K_PAD + kcol[None, :]
    tl.store(out, run, mask=rmask[:, None])


def _topk_merge_kernel(Keys, Vals, Idx, B, K, BLOCK_M: tl.constexpr, SK: tl.constexpr):
    """Sort each row's ``SK = S·K_PAD`` candidate keys and write the first K as (ReLU value, index)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    c = tl.arange(0, SK)
    keys = tl.load(Keys + rows64[:, None] * SK + c[None, :], mask=rmask[:, None], other=-9200000000000000000)
    keys = tl.sort(keys, dim=1, descending=True)
    ordv = (keys >> 32).to(tl.int32)
    idx = 2147483647 - (keys & 0xFFFFFFFF).to(tl.int32)
    bits = ordv ^ ((ordv >> 31) & 0x7FFFFFFF)
    v = tl.maximum(bits.to(tl.float32, bitcast=True), 0.0)
    m = rmask[:, None] & (c[None, :] < K)
    tl.store(Vals + rows64[:, None] * K + c[None, :], v.to(Vals.dtype.element_ty), mask=m)
    tl.store(Idx + rows64[:, None] * K + c[None, :], idx.to(tl.int64), mask=m)


_fwd = LazyJit(_topk_encode_fwd_kernel)
_merge = LazyJit(_topk_merge_kernel)


def default_config(k: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and warps of the fused forward for a given k (registers hold BLOCK_M × K_PAD keys)."""
    if k <= 32:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    if k <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2}


def topk_encode_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, splits: int | None = None, config: dict | None = None
) -> tuple[Tensor, Tensor]:
    """Fused forward: ``(values [B, k] in x.dtype, indices [B, k] int64)``, sorted by value descending."""
    check_encode_args(x, W_enc, b_enc, k)
    if k > MAX_K:
        raise ValueError(f"topk_encode: the fused kernel supports k <= {MAX_K}, got k={k}; use backend='ref'")
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc)):
        check_float(name, "topk_encode", t)
    if x.dtype != W_enc.dtype:
        raise TypeError(f"topk_encode: x ({x.dtype}) and W_enc ({W_enc.dtype}) must share a dtype")
    B, D = x.shape
    N = W_enc.shape[1]
    if N >= 2**31 - 1:
        raise ValueError(f"topk_encode: n={N} too large for the packed int32 index")
    cfg = {**default_config(k, x.dtype), **(config or {})}
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    K_PAD = max(next_pow2(k), 2)
    tiles_m = triton_cdiv(B, BM)
    blocks_n = triton_cdiv(N, BN)
    if splits is None:  # enough programs for ~2 waves, but at least 2 latent blocks per split
        splits = 1
        while tiles_m * splits < 2 * num_sms(x) and 4 * splits <= blocks_n and splits * K_PAD < 2048:
            splits *= 2
    if splits & (splits - 1):
        raise ValueError(f"topk_encode: splits must be a power of two, got {splits}")
    n_per_split = triton_cdiv(blocks_n, splits) * BN
    keys = torch.empty(B, splits, K_PAD, dtype=torch.int64, device=x.device)
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]} if x.is_cuda else {}
    _fwd[(tiles_m, splits)](
        x, W_enc, b_enc, keys, B, D, N, n_per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, K_PAD=K_PAD, PRECISION="ieee" if ieee else "tf32",
        UPCAST=interpreting(), **launch,
    )  # fmt: skip
    SK = splits * K_PAD
    MB = max(1, min(16, 4096 // SK))
    _merge[(triton_cdiv(B, MB),)](keys, values, indices, B, k, BLOCK_M=MB, SK=SK)
    return values, indices


class TopKEncodeFn(torch.autograd.Function):
    """Fused Triton forward; sparse backward on Triton kernels (embedding bag + grouped segment sums)."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int):
        values, indices = topk_encode_fwd(x, W_enc, b_enc, k)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.b_dtype = b_enc.dtype
        return values, indices

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_idx):
        x, W_enc, values, indices = ctx.saved_tensors
        gp = torch.where(values > 0, g_values, torch.zeros_like(g_values)).float().contiguous()
        n = W_enc.shape[1]
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = embedding_bag_fwd(indices, gp, W_enc.T.contiguous(), None, x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gWt, gb = segment_sum(indices, gp, x, n, grouping=group_by_latent(indices, n), with_sum=True)
            gW = gWt.T.to(W_enc.dtype) if ctx.needs_input_grad[1] else None
            gb = gb.to(ctx.b_dtype)
        return gx, gW, gb, None


def topk_encode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``); same contract as :func:`topk_encode_ref`."""
    check_encode_args(x, W_enc, b_enc, k)
    return TopKEncodeFn.apply(x, W_enc, b_enc, k)
