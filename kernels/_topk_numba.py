"""numba kernels of :mod:`sparsedict.kernels.topk_cpu` (imported on first use, so that importing the kernels
package never imports numba; module-level functions so that numba's on-disk cache holds them)."""

import numba
import numpy as np

FASTMATH = {"nsz", "arcp", "contract"}
"""No reassociation: comparisons keep their exact order; vertical maxima vectorise without it."""


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
def sort_pairs(hv, hi, k):
    """Insertion sort of the first k pairs by (value desc, index asc)."""
    for j in range(1, k):
        v, i = hv[j], hi[j]
        m = j - 1
        while m >= 0 and worse(hv[m], hi[m], v, i):
            hv[m + 1], hi[m + 1] = hv[m], hi[m]
            m -= 1
        hv[m + 1], hi[m + 1] = v, i


@numba.njit(cache=True)
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
    sort_pairs(hv, hi, k)


@numba.njit(cache=True)
def rank_select(cv, ci, m, k, hv, hi):
    """The k best of the m pairs sorted by (value desc, index asc): each pair's rank is the number of
    pairs ranking above it (a total order, indices are distinct); m² branch-free comparisons, which
    LLVM vectorises — cheaper than a heap for the few candidates a row usually has."""
    for i in range(m):
        vi = cv[i]
        ii = ci[i]
        r = 0
        for j in range(m):
            vj = cv[j]
            r += (vj > vi) | ((vj == vi) & (ci[j] < ii))
        if r < k:
            hv[r] = vi
            hi[r] = ii


@numba.njit(cache=True)
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
    sort_pairs(hv, hi, k)


@numba.njit(inline="always")
def sift_down_values(tmp, pos, k):
    """Min-heap sift-down of ``tmp[pos]`` over the first k values."""
    while True:
        c = 2 * pos + 1
        if c >= k:
            return
        if c + 1 < k and tmp[c + 1] < tmp[c]:
            c += 1
        if tmp[c] < tmp[pos]:
            tmp[c], tmp[pos] = tmp[pos], tmp[c]
            pos = c
        else:
            return


@numba.njit(cache=True)
def kth_largest(a, k, tmp):
    """The k-th largest of ``a`` (values only) by a min-heap of size k in ``tmp``."""
    for j in range(k):
        tmp[j] = a[j]
    for s in range(k // 2 - 1, -1, -1):
        sift_down_values(tmp, s, k)
    for j in range(k, a.shape[0]):
        v = a[j]
        if v > tmp[0]:
            tmp[0] = v
            sift_down_values(tmp, 0, k)
    return tmp[0]


@numba.njit(cache=True)
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
        elif m <= 2 * k:
            rank_select(cv, ci, m, k, hv, hi)
        else:
            heap_select(cv, ci, m, k, hv, hi)
    for j in range(k):
        out_v[j] = hv[j]
        out_i[j] = hi[j]


@numba.njit(cache=True)
def scratch(k, W, cap):
    """One thread's buffers for :func:`row_select`: column maxima, heap temp, candidates, result heap."""
    return (np.empty(max(W, 1), np.float32), np.empty(k, np.float32), np.empty(cap, np.float32),
            np.empty(cap, np.int32), np.empty(k, np.float32), np.empty(k, np.int64))  # fmt: skip


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def topk_f32(pre, k, W, cap, out_v, out_i, parts):
    B = pre.shape[0]
    for p in numba.prange(parts):
        colmax, tmp, cv, ci, hv, hi = scratch(k, W, cap)
        for b in range(p * B // parts, (p + 1) * B // parts):
            row_select(pre[b], k, W, cap, colmax, tmp, cv, ci, hv, hi, out_v[b], out_i[b])


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def topk_bf16(bits, k, W, cap, out_v, out_i, parts):
    """``bits`` is the bf16 matrix viewed as uint16; each row is widened to fp32 (exact) first."""
    B, n = bits.shape
    for p in numba.prange(parts):
        colmax, tmp, cv, ci, hv, hi = scratch(k, W, cap)
        wide = np.empty(n, np.uint32)
        for b in range(p * B // parts, (p + 1) * B // parts):
            for j in range(n):
                wide[j] = np.uint32(bits[b, j]) << np.uint32(16)
            row_select(wide.view(np.float32), k, W, cap, colmax, tmp, cv, ci, hv, hi, out_v[b], out_i[b])
