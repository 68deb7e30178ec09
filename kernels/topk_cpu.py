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
4. **select**: the candidates ordered by (value desc, index asc): with at most 2k of them (the usual
   case) each one's rank is counted by branch-free comparisons against all others (``rank_select``),
   otherwise a k-heap insertion-sorted at the end (``heap_select``). Rows with more candidates than the
   buffer holds (massive ties, e.g. an all-zero row) fall back to a heap scan of the whole row in index
   order (``row_heap``), with the same result. The numba functions live in ``_topk_numba.py``.

Every path orders by (value, index) explicitly, so the output equals a stable descending sort's first
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
    from sparsedict.kernels import _topk_numba

    return _topk_numba.topk_f32, _topk_numba.topk_bf16


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
