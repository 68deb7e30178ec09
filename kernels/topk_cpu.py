"""CPU row-wise top-k with numba: threshold, then select; exact ``torch`` tie semantics, no ``[B, n]`` temporaries.

``select_topk_cpu(pre [B, n], k) -> (values [B, k], indices [B, k] int64)``: the k largest entries of each
row, sorted by value descending, ties -> lower latent index — the contract of
:func:`sparsedict.kernels.topk_encode.select_topk`, which calls this on CPU when numba is installed.

Per row (rows in parallel), with the row viewed as ``W`` interleaved columns (entry j in column ``j mod W``):

1. **column maxima**: ``m[c] = max_{j ≡ c} pre[j]`` — a vertical max over ``n / W`` contiguous blocks, which
   LLVM vectorises (AVX-512: 16 lanes per instruction); the row is read once.
2. **threshold**: ``t`` = the k-th largest of the ``W`` column maxima. The k columns reaching it hold k
   distinct entries ``>= t``, so the row's k-th largest value is ``>= t``: every entry of the top-k (ties at
   the k-th value included) is ``>= t``.
3. **candidates**: only the columns with ``m[c] >= t`` are scanned, keeping their entries ``>= t`` (for
   exchangeable values about ``k·(1 + 1/ln…)`` entries: at n = 4608, W = 256, k = 32 about 35 of 4608,
   from about 32 of the 256 columns).
4. **select**: a k-heap over the candidates ordered by (value desc, index asc), insertion-sorted at the
   end. Rows with more candidates than the buffer holds (massive ties, e.g. an all-zero row) fall back
   to a heap scan of the whole row in index order (:func:`_kernels` ``row_heap``), with the same result.

Both steps 4 order by (value, index) explicitly, so the output equals a stable descending sort's first
k entries for any input without NaN (NaN inputs give an unspecified selection; the trainer rejects
non-finite losses). bf16 rows are widened to fp32 one row at a time (exact).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

LANES = 256
"""Columns W of the threshold pass (at least 2k is used; see the module docstring)."""


@functools.cache
def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def numba_threads() -> int:
    """Set numba's thread count to torch's (capped by numba's pool) and return it."""
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


@functools.cache
def _kernels():
    import numba
    import numpy as np

    @numba.njit(inline="always")
    def worse(v1, i1, v2, i2):
        """True when (v1, i1) ranks below (v2, i2): smaller value, or equal value and higher index."""
        return v1 < v2 or (v1 == v2 and i1 > i2)

    @numba.njit(inline="always")
    def sift_down(hv, hi, pos, k):
        while True:
            c = 2 * pos + 1
            if c >= k:
                return
            if c + 1 < k and worse(hv[c + 1], hi[c + 1], hv[c], hi[c]):
                c += 1
            if worse(hv[c], hi[c], hv[pos], hi[pos]):
                hv[c], hv[pos] = hv[pos], hv[c]
                hi[c], hi[pos] = hi[pos], hi[c]
                pos = c
            else:
                return

    @numba.njit(inline="always")
    def heap_select(cv, ci, m, k, hv, hi):
        """The k best of the m pairs ``(cv, ci)`` (any order), sorted by (value desc, index asc) into hv/hi."""
        for j in range(k):
            hv[j] = cv[j]
            hi[j] = ci[j]
        for j in range(k // 2 - 1, -1, -1):  # heapify: root = worst of the k
            sift_down(hv, hi, j, k)
        for j in range(k, m):
            if worse(hv[0], hi[0], cv[j], ci[j]):
                hv[0] = cv[j]
                hi[0] = ci[j]
                sift_down(hv, hi, 0, k)
        for j in range(1, k):  # insertion sort by (value desc, index asc)
            v, i = hv[j], hi[j]
            m2 = j - 1
            while m2 >= 0 and worse(hv[m2], hi[m2], v, i):
                hv[m2 + 1], hi[m2 + 1] = hv[m2], hi[m2]
                m2 -= 1
            hv[m2 + 1], hi[m2 + 1] = v, i

    @numba.njit(inline="always")
    def row_heap(row, k, hv, hi):
        """Heap scan of a whole row in index order (the fallback): strictly larger entries displace the root."""
        n = row.shape[0]
        for j in range(k):
            hv[j] = row[j]
            hi[j] = j
        for j in range(k // 2 - 1, -1, -1):
            sift_down(hv, hi, j, k)
        thr = hv[0]
        for j in range(k, n):
            v = row[j]
            if v > thr:  # strictly larger: an equal later entry never displaces a lower index
                hv[0] = v
                hi[0] = j
                sift_down(hv, hi, 0, k)
                thr = hv[0]
        for j in range(1, k):
            v, i = hv[j], hi[j]
            m2 = j - 1
            while m2 >= 0 and worse(hv[m2], hi[m2], v, i):
                hv[m2 + 1], hi[m2 + 1] = hv[m2], hi[m2]
                m2 -= 1
            hv[m2 + 1], hi[m2 + 1] = v, i

    @numba.njit(inline="always")
    def kth_largest(a, k, tmp):
        """The k-th largest of ``a`` (values only) by a min-heap of size k in ``tmp``."""
        for j in range(k):
            tmp[j] = a[j]
        for s in range(k // 2 - 1, -1, -1):
            pos = s
            while True:
                c = 2 * pos + 1
                if c >= k:
                    break
                if c + 1 < k and tmp[c + 1] < tmp[c]:
                    c += 1
                if tmp[c] < tmp[pos]:
                    tmp[c], tmp[pos] = tmp[pos], tmp[c]
                    pos = c
                else:
                    break
        for j in range(k, a.shape[0]):
            v = a[j]
            if v > tmp[0]:
                tmp[0] = v
                pos = 0
                while True:
                    c = 2 * pos + 1
                    if c >= k:
                        break
                    if c + 1 < k and tmp[c + 1] < tmp[c]:
                        c += 1
                    if tmp[c] < tmp[pos]:
                        tmp[c], tmp[pos] = tmp[pos], tmp[c]
                        pos = c
                    else:
                        break
        return tmp[0]

    @numba.njit(inline="always")
    def row_select(row, k, W, cap, colmax, tmp, cv, ci, hv, hi, out_v, out_i):
        n = row.shape[0]
        if W == 0:  # row too short for the threshold pass
            row_heap(row, k, hv, hi)
        else:
            cm = colmax[:W]
            cm[:] = row[:W]
            nb = n // W
            for r in range(1, nb):
                blk = row[r * W : (r + 1) * W]
                for c in range(W):  # contiguous slices, non-negative indices: vectorised
                    v = blk[c]
                    cm[c] = v if v > cm[c] else cm[c]
            for j in range(nb * W, n):  # tail: entry j joins column j - nb·W
                c = j - nb * W
                v = row[j]
                colmax[c] = v if v > colmax[c] else colmax[c]
            t = kth_largest(colmax[:W], k, tmp)
            m = 0
            for c in range(W):
                if colmax[c] >= t:
                    for j in range(c, n, W):
                        v = row[j]
                        if v >= t:
                            if m < cap:
                                cv[m] = v
                                ci[m] = j
                            m += 1
            if m > cap:
                row_heap(row, k, hv, hi)
            else:
                heap_select(cv, ci, m, k, hv, hi)
        for j in range(k):
            out_v[j] = hv[j]
            out_i[j] = hi[j]

    def make(widen: bool):
        @numba.njit(parallel=True, cache=True, fastmath={"nsz", "arcp", "contract"})
        def topk(pre, k, W, cap, out_v, out_i, parts):
            B, n = pre.shape
            for p in numba.prange(parts):
                colmax = np.empty(max(W, 1), np.float32)
                tmp = np.empty(k, np.float32)
                cv = np.empty(cap, np.float32)
                ci = np.empty(cap, np.int64)
                hv = np.empty(k, np.float32)
                hi = np.empty(k, np.int64)
                wide = np.empty(n if widen else 0, np.uint32)
                for b in range(p * B // parts, (p + 1) * B // parts):
                    if widen:  # bf16 bits -> fp32 (exact)
                        for j in range(n):
                            wide[j] = np.uint32(pre[b, j]) << np.uint32(16)
                        row = wide.view(np.float32)
                    else:
                        row = pre[b]
                    row_select(row, k, W, cap, colmax, tmp, cv, ci, hv, hi, out_v[b], out_i[b])

        return topk

    return make(False), make(True)


def default_lanes(n: int, k: int) -> int:
    """Columns of the threshold pass for a row of n: :data:`LANES`, at least 2k, at most n/2 (0: no pass)."""
    W = max(LANES, 2 * k)
    return W if n >= 2 * W else 0


def supported(pre: Tensor, k: int) -> bool:
    """Whether :func:`select_topk_cpu` handles this input (CPU, 2-D, fp32/bf16, numba installed, no grad)."""
    return (
        pre.device.type == "cpu"
        and pre.ndim == 2
        and pre.dtype in (torch.float32, torch.bfloat16)
        and 0 < k <= pre.shape[1]
        and not pre.requires_grad
        and numba_available()
    )


def select_topk_into(pre: Tensor, k: int, vals: Tensor, idx: Tensor, lanes: int | None = None) -> None:
    """Top-k of each row of ``pre [B, n]`` (fp32 or bf16, contiguous) into ``vals [B, k]`` fp32 and
    ``idx [B, k]`` int64 (contiguous; written in place). ``lanes``: the threshold pass's column count
    (None: :func:`default_lanes`; 0: the whole-row heap scan for every row, the earlier algorithm)."""
    topk_f32, topk_bf16 = _kernels()
    B, n = pre.shape
    if B == 0:
        return
    W = default_lanes(n, k) if lanes is None else lanes
    if W and not (2 * k <= W <= n):
        raise ValueError(f"select_topk: lanes={W} must be in [2k={2 * k}, n={n}] (or 0)")
    cap = min(n, max(4 * k, 64))
    args = (k, W, cap, vals.numpy(), idx.numpy(), min(numba_threads(), B))
    if pre.dtype == torch.bfloat16:
        topk_bf16(pre.view(torch.int16).numpy().view("uint16"), *args)
    else:
        topk_f32(pre.numpy(), *args)


def select_topk_cpu(pre: Tensor, k: int, lanes: int | None = None) -> tuple[Tensor, Tensor]:
    """``(values [B, k] in pre's dtype, indices [B, k] int64)``; see the module docstring for the order
    and :func:`select_topk_into` for ``lanes``."""
    pre = pre.contiguous()
    B = pre.shape[0]
    vals = torch.empty(B, k, dtype=torch.float32)
    idx = torch.empty(B, k, dtype=torch.int64)
    select_topk_into(pre, k, vals, idx, lanes)
    return vals.to(pre.dtype), idx
