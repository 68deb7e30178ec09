"""TopK encode: ``TopK(ReLU(x W_enc + b_enc))`` -> (values [B, k], indices [B, k]).

Selection is on the pre-activations ``pre = x W_enc + b_enc``; ties are broken towards the **lower latent
index** (both paths), ``values = ReLU(pre[indices])`` and ``indices`` are int64. Backward flows only
through the k selected entries: with ``gp = g_values · [values > 0]``,
``gx_b = Σ_j gp[b, j] · W_enc[:, idx[b, j]]`` (embedding bag over W_enc's columns),
``gW_enc[:, i] = Σ_{(b,j): idx=i} gp[b, j] · x_b`` and ``gb_enc[i] = Σ gp`` (grouped sums) — never a dense
``[B, n]`` gradient.

* ``topk_encode_ref`` / :class:`TopKEncodeRefFn`: plain torch; the ``[B, n]`` pre-activation is computed
  once in the input dtype (torch's GEMM accumulates in fp32); output sorted by value, descending.
* ``topk_encode_fwd``: the fused Triton forward, two algorithms (``algorithm=`` / :data:`DEFAULT_ALGORITHM`):

  - ``'merge'`` (:func:`topk_encode_merge_fwd`): ``_topk_encode_fwd_kernel`` runs a GEMM over
    ``[BLOCK_M, BLOCK_N]`` tiles with fp32 accumulation, adds the bias and merges each tile into a running
    per-row top-``K_PAD`` held in registers; the latent axis is split S ways for occupancy and
    ``_topk_merge_kernel`` sorts the ``[B, S·K_PAD]`` candidates (exact: each split keeps its own top-k).
    Limited by the insertion loop of the running merge, not by the GEMM (benchmarks/RESULTS_kernels.md).
  - ``'filter'`` (:func:`topk_encode_filter_fwd`): a threshold pre-filter. A: each row's k-th largest
    pre-activation over a sample of ``n/S`` latents (torch GEMM + topk) — a lower bound on its k-th largest
    over all n. B: ``_filter_gemm_kernel``, a plain tiled GEMM whose epilogue compacts the entries at or
    above the threshold (~k·S per row) into a ``[B, C]`` candidate list (slots from ``atomic_add`` on a per-row
    counter). C: ``_filter_select_kernel`` sorts each row's candidates. Rows whose count lands
    outside ``[k, C]`` are redone by the merge kernels under a row mask (no host synchronisation), so the
    result is exact for every row.

  Both pack each candidate into one int64 key ``(order-preserving float bits << 32) | (2^31−1−index)``
  so a single integer max gives "largest value, lowest index". The ``[B, n]`` pre-activation never
  reaches memory. Selection uses the fp32 accumulator; for bf16 inputs the reference rounds the
  pre-activations to bf16 first, so the two agree exactly only where that rounding does not tie values.
* :class:`TopKEncodeFn`: fused forward + the sparse backward on the Triton kernels of
  :mod:`sparsedict.kernels.sparse_decode`.
"""

from __future__ import annotations

import os

import torch
from sparsedict.kernels import topk_cpu
from sparsedict.kernels._common import LazyJit, check_float, interpreting, next_pow2, num_sms
from sparsedict.kernels.sparse_decode import embedding_bag_fwd, segment_sum, triton_cdiv
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
    X, W, Bias, Keys, Count, B, D, N, n_per_split, K, C,
    stride_xb, stride_xd, stride_wd, stride_wn, stride_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_FLAGS: tl.constexpr,
):  # fmt: skip
    """Per (row tile, split): the top-``K_PAD`` packed keys of ``x W + b`` over the split's latents.

    Grid (cdiv(B, BLOCK_M), S); writes ``Keys[b, s, :]`` (unsorted; unfilled slots hold sentinels
    below every real key). With ``HAS_FLAGS`` (the filter path's fallback) only rows whose candidate
    count ``Count[b]`` is outside ``[K, C]`` are wanted: a tile without such a row does no work and
    stores nothing.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    if HAS_FLAGS:
        cnt = tl.load(Count + rows, mask=rmask, other=K)
        rmask = rmask & ((cnt < K) | (cnt > C))
    rows64 = rows.to(tl.int64)
    kcol = tl.arange(0, K_PAD)
    # sentinel -9.2e18 lies below every real key (the smallest, for -inf, is about -9.19e18)
    run = tl.full([BLOCK_M, K_PAD], -9200000000000000000, tl.int64) + kcol[None, :].to(
        tl.int64
    )  # distinct sentinels
    thr = tl.min(run, 1)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    if HAS_FLAGS:  # no wanted row in this tile: an empty latent range (zero loop trips)
        n_hi = tl.where(tl.max(rmask.to(tl.int32), 0) > 0, n_hi, n_lo)
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


def _topk_merge_kernel(
    Keys, Vals, Idx, Count, B, K, C, BLOCK_M: tl.constexpr, SK: tl.constexpr, HAS_FLAGS: tl.constexpr
):  # fmt: skip
    """Sort each row's ``SK = S·K_PAD`` candidate keys and write the first K as (ReLU value, index).

    With ``HAS_FLAGS`` only the rows whose ``Count[b]`` is outside ``[K, C]`` (the filter path's fallback
    rows) are read and written; a row block without one does nothing.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    if HAS_FLAGS:
        cnt = tl.load(Count + rows, mask=rmask, other=K)
        rmask = rmask & ((cnt < K) | (cnt > C))
    if tl.max(rmask.to(tl.int32), 0) > 0:
        rows64 = rows.to(tl.int64)
        c = tl.arange(0, SK)
        keys = tl.load(
            Keys + rows64[:, None] * SK + c[None, :], mask=rmask[:, None], other=-9200000000000000000
        )
        keys = tl.sort(keys, dim=1, descending=True)
        ordv = (keys >> 32).to(tl.int32)
        idx = 2147483647 - (keys & 0xFFFFFFFF).to(tl.int32)
        bits = ordv ^ ((ordv >> 31) & 0x7FFFFFFF)
        v = tl.maximum(bits.to(tl.float32, bitcast=True), 0.0)
        m = rmask[:, None] & (c[None, :] < K)
        tl.store(Vals + rows64[:, None] * K + c[None, :], v.to(Vals.dtype.element_ty), mask=m)
        tl.store(Idx + rows64[:, None] * K + c[None, :], idx.to(tl.int64), mask=m)


def _filter_gemm_kernel(
    X, W, Bias, Thr, Count, Cand, B, D, N, C, margin,
    stride_xb, stride_xd, stride_wd, stride_wn, stride_cb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SCAN_SLOTS: tl.constexpr,
):  # fmt: skip
    """Stage B of the filter path: one ``[BLOCK_M, BLOCK_N]`` tile of ``x W + b`` (fp32 accumulator) whose
    epilogue appends every entry ``>= t_b`` (``t_b = Thr[b] − |Thr[b]|·margin``) to row b's candidate list.

    1-D grid over the tiles in grouped order (GROUP_M row tiles share a sweep over W, for L2 reuse). Slots come
    from ``Count`` (which ends as the row's full count, even past C): one relaxed ``atomic_add`` per hit, or
    with SCAN_SLOTS one per row and tile plus a ``tl.cumsum`` along the tile row (a scan on the dot's
    accumulator layout has had lowering bugs in some Triton versions, hence not the default). Slots
    ``>= C`` are dropped (that row is then redone by the fallback). ``Cand [B, C]`` holds packed int64 keys
    in no fixed order; the later sort makes the result independent of it.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < B
    cmask = cols < N
    # out-of-range rows/columns load a valid neighbour instead of being masked (unmasked, vectorised loads);
    # their results are discarded below
    rows_ld = (rows % B).to(tl.int64)
    cols_ld = cols % N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        ks = d0 + tl.arange(0, BLOCK_K)
        xp = X + rows_ld[:, None] * stride_xb + ks[None, :] * stride_xd
        wp = W + ks[:, None].to(tl.int64) * stride_wd + cols_ld[None, :] * stride_wn
        if EVEN_K:
            xt = tl.load(xp)
            wt = tl.load(wp)
        else:
            xt = tl.load(xp, mask=(ks < D)[None, :], other=0.0)
            wt = tl.load(wp, mask=(ks < D)[:, None], other=0.0)
        if UPCAST:  # Triton's CPU interpreter gets bf16 dots wrong; bf16 products are exact in fp32
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    acc += tl.load(Bias + cols_ld).to(tl.float32)[None, :]
    acc = acc + 0.0  # -0.0 -> +0.0 so equal values get equal keys
    t = tl.load(Thr + rows_ld).to(tl.float32)
    t = t - tl.abs(t) * margin
    hit = (acc >= t[:, None]) & rmask[:, None] & cmask[None, :]
    hit_i = hit.to(tl.int32)
    if tl.max(tl.max(hit_i, 1), 0) > 0:
        if SCAN_SLOTS:  # one atomic per row: reserve the row's hits, lay them out by a prefix sum
            cnt = tl.sum(hit_i, 1)
            base = tl.atomic_add(Count + rows, cnt, mask=rmask & (cnt > 0), sem="relaxed")
            pos = base[:, None] + tl.cumsum(hit_i, 1) - 1
        else:  # one atomic per hit (no scan over the MMA-layout tile)
            cptr = Count + rows[:, None] + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            pos = tl.atomic_add(cptr, hit_i, mask=hit, sem="relaxed")
        keep = hit & (pos < C)
        bits = acc.to(tl.int32, bitcast=True)
        ordv = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving as signed int32
        key = (ordv.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)[None, :]
        tl.store(Cand + rows.to(tl.int64)[:, None] * stride_cb + pos, key, mask=keep)


def _filter_select_kernel(
    Cand, Count, Vals, Idx, B, K, C, stride_cb, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr
):  # fmt: skip
    """Stage C of the filter path: sort each row's ``Count[b]`` candidate keys, write the first K.

    Rows whose count is outside ``[K, C]`` (threshold too high, or the list overflowed) are left to the
    fallback and not written here.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    cnt = tl.load(Count + rows, mask=rmask, other=0)
    good = rmask & (cnt >= K) & (cnt <= C)
    if tl.max(good.to(tl.int32), 0) > 0:
        rows64 = rows.to(tl.int64)
        c = tl.arange(0, C_PAD)
        keys = tl.load(
            Cand + rows64[:, None] * stride_cb + c[None, :],
            mask=good[:, None] & (c[None, :] < cnt[:, None]), other=-9200000000000000000,
        )  # fmt: skip
        keys = tl.sort(keys, dim=1, descending=True)
        ordv = (keys >> 32).to(tl.int32)
        idx = 2147483647 - (keys & 0xFFFFFFFF).to(tl.int32)
        bits = ordv ^ ((ordv >> 31) & 0x7FFFFFFF)
        v = tl.maximum(bits.to(tl.float32, bitcast=True), 0.0)
        m = good[:, None] & (c[None, :] < K)
        tl.store(Vals + rows64[:, None] * K + c[None, :], v.to(Vals.dtype.element_ty), mask=m)
        tl.store(Idx + rows64[:, None] * K + c[None, :], idx.to(tl.int64), mask=m)


_fwd = LazyJit(_topk_encode_fwd_kernel)
_merge = LazyJit(_topk_merge_kernel)
_filter_gemm = LazyJit(_filter_gemm_kernel)
_filter_select = LazyJit(_filter_select_kernel)

ALGORITHMS = ("merge", "filter")
DEFAULT_ALGORITHM = os.environ.get("SPARSEDICT_TOPK_ALGORITHM", "filter")
"""Forward algorithm of the fused encode when none is given: ``'filter'`` (threshold pre-filter + candidate
compaction; the faster one at every shape measured, benchmarks/RESULTS_kernels.md) or ``'merge'`` (running
top-k per tile). Set by ``SPARSEDICT_TOPK_ALGORITHM`` at import, or assign this attribute."""

FILTER_TARGET_CANDIDATES = 256
"""The filter path picks its sample divisor S so that about k·S ≈ this many candidates survive per row
(chosen by measurement: benchmarks/RESULTS_kernels.md)."""


def default_config(k: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and warps of the fused forward for a given k (registers hold BLOCK_M × K_PAD keys)."""
    if k <= 32:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    if k <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2}


def default_filter_config(k: int, n: int, dtype: torch.dtype) -> dict:
    """Config of the filter path for k, n.

    ``S``: the threshold comes from the first ``ceil(n/S)`` latents (S a power of two, k·S ≈
    :data:`FILTER_TARGET_CANDIDATES`, the sample at least 4k wide); ``C``: candidate slots per row
    (the mean count is about k·S with standard deviation about S·√k for exchangeable latents, so
    ``C = next_pow2(2·k·S)`` overflows in well under one row per 10⁴); ``margin``: relative amount
    the threshold is lowered by, to cover the rounding of the sample GEMM's output to the input dtype (or TF32
    products; too small a margin only sends rows to the exact fallback);
    ``select``: stage C as the Triton sort kernel (``'triton'``) or ``torch.topk`` on the packed keys
    (``'torch'``); ``slots``: candidate slots by one atomic per hit (``'atomic'``) or one per row and tile
    plus a prefix sum (``'scan'``); GEMM tiles as a plain Hopper/Ampere GEMM. GROUP_M: row tiles per sweep over W's column tiles; 64 makes
    the order column-major for B <= 8192 with 128-row tiles, so W is read from memory about once (x stays
    in L2).
    """
    S = max(1, min(64, next_pow2(max(1, FILTER_TARGET_CANDIDATES // k))))
    while S > 1 and n // S < 4 * k:
        S //= 2
    fp32 = dtype == torch.float32
    return {
        "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if fp32 else 64, "GROUP_M": 64, "num_warps": 8,
        "num_stages": 3, "S": S, "C": next_pow2(2 * k * S),
        "margin": 2.0**-10 if fp32 and not torch.backends.cuda.matmul.allow_tf32 else 2.0**-7,
        "select": "triton", "slots": "atomic",
    }  # fmt: skip


def _check_fwd_args(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> None:
    check_encode_args(x, W_enc, b_enc, k)
    if k > MAX_K:
        raise ValueError(f"topk_encode: the fused kernel supports k <= {MAX_K}, got k={k}; use backend='ref'")
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc)):
        check_float(name, "topk_encode", t)
    if x.dtype != W_enc.dtype:
        raise TypeError(f"topk_encode: x ({x.dtype}) and W_enc ({W_enc.dtype}) must share a dtype")
    if W_enc.shape[1] >= 2**31 - 1:
        raise ValueError(f"topk_encode: n={W_enc.shape[1]} too large for the packed int32 index")


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _merge_launch(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, values: Tensor, indices: Tensor,
    splits: int | None, config: dict | None, count: Tensor | None = None, C: int = 0,
) -> None:  # fmt: skip
    """Run the merge path into ``values``/``indices``; with ``count`` only the rows outside ``[k, C]``."""
    B, D = x.shape
    N = W_enc.shape[1]
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
    flags = count is not None
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]} if x.is_cuda else {}
    _fwd[(tiles_m, splits)](
        x, W_enc, b_enc, keys, count if flags else keys, B, D, N, n_per_split, k, C,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, K_PAD=K_PAD, PRECISION=_precision(x),
        UPCAST=interpreting(), HAS_FLAGS=flags, **launch,
    )  # fmt: skip
    SK = splits * K_PAD
    MB = max(1, min(16, 4096 // SK))
    _merge[(triton_cdiv(B, MB),)](
        keys, values, indices, count if flags else keys, B, k, C, BLOCK_M=MB, SK=SK, HAS_FLAGS=flags
    )


def topk_encode_merge_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, splits: int | None = None, config: dict | None = None
) -> tuple[Tensor, Tensor]:
    """Merge path: ``(values [B, k] in x.dtype, indices [B, k] int64)``, sorted by value descending."""
    _check_fwd_args(x, W_enc, b_enc, k)
    B = x.shape[0]
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B:
        _merge_launch(x, W_enc, b_enc, k, values, indices, splits, config)
    return values, indices


def filter_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, S: int) -> Tensor:
    """Stage A: ``[B]`` fp32, each row's k-th largest pre-activation over the first ``max(k, ceil(n/S))``
    latents — a lower bound on the row's k-th largest over all n (at least k entries reach it).

    One GEMM of ``1/S`` of the full size and a ``torch.topk`` over ``[B, n/S]`` (in the input dtype).
    """
    n = W_enc.shape[1]
    ns = min(n, max(k, triton_cdiv(n, S)))
    with torch.no_grad():
        pre = torch.addmm(b_enc[:ns].to(x.dtype), x, W_enc[:, :ns])
        return pre.topk(k, dim=1, sorted=False).values.amin(1).float()


def _select_torch(cand: Tensor, count: Tensor, k: int, values: Tensor, indices: Tensor) -> None:
    """Stage C with torch ops (``config['select'] = 'torch'``): ``torch.topk`` on the packed keys.

    Writes every row; rows outside ``[k, C]`` get garbage here and are overwritten by the fallback after.
    """
    C = cand.shape[1]
    valid = torch.arange(C, device=cand.device)[None, :] < count[:, None]
    keys = torch.where(valid, cand, torch.full_like(cand, -9200000000000000000))
    keys = keys.topk(
        min(k, C), dim=1, sorted=True
    ).values  # keys are unique: descending value, ascending index
    ordv = (keys >> 32).to(torch.int32)
    bits = ordv ^ ((ordv >> 31) & 0x7FFFFFFF)
    kk = keys.shape[1]
    values[:, :kk] = bits.view(torch.float32).clamp_min(0).to(values.dtype)
    indices[:, :kk] = 2147483647 - (keys & 0xFFFFFFFF)


def topk_encode_filter_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, config: dict | None = None, stats: dict | None = None
) -> tuple[Tensor, Tensor]:
    """Filter path: same contract as :func:`topk_encode_merge_fwd`; exact for every row.

    A: threshold ``t_b`` from a sample of latents (:func:`filter_threshold`), lowered by ``margin·|t_b|``.
    B: ``_filter_gemm_kernel`` computes every pre-activation once and keeps the entries ``>= t_b`` in a
    ``[B, C]`` candidate list (``Count[b]`` = how many there were). C: ``_filter_select_kernel`` sorts each
    row's candidates. A row is exact whenever ``k <= Count[b] <= C``: then its k-th largest value is ``>= t_b``
    (k entries reach it), so every entry of its top-k — ties at the k-th value included — is a candidate.
    Other rows (an overflowing list, or a threshold above the k-th value through rounding) are redone by
    the merge kernels with a row mask, so the forward never synchronises with the host; when no row needs
    it, the fallback launches only read ``Count`` and exit. ``stats``, when given, receives ``counts`` [B]
    and the config used (for benchmarks).
    """
    _check_fwd_args(x, W_enc, b_enc, k)
    B, D = x.shape
    N = W_enc.shape[1]
    cfg = {**default_filter_config(k, N, x.dtype), **(config or {})}
    if config and "S" in config and "C" not in config:  # capacity follows an overridden S
        cfg["C"] = next_pow2(2 * k * int(cfg["S"]))
    BM, BN, BK, C = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], int(cfg["C"])
    if C < 1:
        raise ValueError(f"topk_encode: the candidate capacity C must be >= 1, got {C}")
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    thr = filter_threshold(x, W_enc, b_enc, k, int(cfg["S"]))
    count = torch.zeros(B, dtype=torch.int32, device=x.device)
    cand = torch.empty(B, C, dtype=torch.int64, device=x.device)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]} if x.is_cuda else {}
    grid = (triton_cdiv(B, BM) * triton_cdiv(N, BN),)
    _filter_gemm[grid](
        x, W_enc, b_enc, thr, count, cand, B, D, N, C, float(cfg["margin"]),
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), cand.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=cfg["GROUP_M"], EVEN_K=D % BK == 0,
        PRECISION=_precision(x), UPCAST=interpreting(), SCAN_SLOTS=cfg["slots"] == "scan", **launch,
    )  # fmt: skip
    if cfg.get("select", "triton") == "torch":
        _select_torch(cand, count, k, values, indices)
    else:
        C_PAD = max(next_pow2(C), 2)
        MB = max(1, min(16, 4096 // C_PAD))
        _filter_select[(triton_cdiv(B, MB),)](
            cand, count, values, indices, B, k, C, cand.stride(0), BLOCK_M=MB, C_PAD=C_PAD,
            **({"num_warps": 8 if C_PAD >= 2048 else 4} if x.is_cuda else {}),
        )  # fmt: skip
    _merge_launch(x, W_enc, b_enc, k, values, indices, None, cfg.get("fallback"), count=count, C=C)
    if stats is not None:
        stats.update(counts=count, config=cfg)
    return values, indices


def topk_encode_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, splits: int | None = None, config: dict | None = None,
    algorithm: str | None = None, stats: dict | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Fused forward: ``(values [B, k] in x.dtype, indices [B, k] int64)``, sorted by value descending.

    ``algorithm``: ``'merge'``, ``'filter'`` or None (:data:`DEFAULT_ALGORITHM`); ``config`` overrides that
    algorithm's defaults (:func:`default_config` / :func:`default_filter_config`); ``splits`` is the merge
    path's latent split count; ``stats`` see :func:`topk_encode_filter_fwd`.
    """
    algorithm = algorithm or DEFAULT_ALGORITHM
    if algorithm == "merge":
        return topk_encode_merge_fwd(x, W_enc, b_enc, k, splits=splits, config=config)
    if algorithm == "filter":
        return topk_encode_filter_fwd(x, W_enc, b_enc, k, config=config, stats=stats)
    raise ValueError(f"topk_encode: algorithm must be one of {ALGORITHMS}, not {algorithm!r}")


class TopKEncodeFn(torch.autograd.Function):
    """Fused Triton forward; sparse backward on Triton kernels (embedding bag + grouped sums)."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, algorithm: str | None = None):
        values, indices = topk_encode_fwd(x, W_enc, b_enc, k, algorithm=algorithm)
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
            # gW_enc [d, n] written directly in W_enc's dtype and layout (the kernel stores the transpose)
            gW, gb = segment_sum(indices, gp, x, n, with_sum=True, out_dtype=W_enc.dtype, transpose_out=True)
            gW = gW if ctx.needs_input_grad[1] else None
            gb = gb.to(ctx.b_dtype)
        return gx, gW, gb, None, None


def topk_encode_triton(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, algorithm: str | None = None
) -> tuple[Tensor, Tensor]:
    """Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``); same contract as :func:`topk_encode_ref`.

    ``algorithm``: the forward's ``'merge'`` / ``'filter'`` (None: :data:`DEFAULT_ALGORITHM`).
    """
    check_encode_args(x, W_enc, b_enc, k)
    return TopKEncodeFn.apply(x, W_enc, b_enc, k, algorithm)
