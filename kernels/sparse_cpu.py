"""CPU kernels (numba) for the sparse parts of a training step: decode, its backward, and the encoder backward.

Shapes: ``indices, values [B, k]``, ``W_dec [n, d]``, ``x [B, d]``, upstream ``g = ∂L/∂x̂ [B, d]``. The
kernels take codes in CSR form (row b's slots are ``rowptr[b]:rowptr[b+1]`` of flat ``idx, val [nnz]``;
the ``*_csr`` functions), which the padded ``[B, k]`` functions call with ``rowptr = k · arange(B + 1)``:
TopK's codes are padded, the selected entries of the dense-code architectures
(:mod:`sparsedict.kernels.active_cpu`) vary in number per row.

* :func:`decode`: ``x̂_b = b_dec + Σ_j values[b, j] · W_dec[indices[b, j]]`` — rows in parallel, the
  k gathered rows summed in order j = 0..k−1 in fp32 (entries with value 0 are skipped: adding 0·w is
  exact for finite w).
* :func:`sddmm`: ``out[b, j] = <g_b, W[indices[b, j]]>`` (the values' gradient).
* :func:`group_by_latent`: a stable counting sort of the ``B·k`` (b, j) slots by latent — ``offsets [n+1]``
  and ``order [B·k]`` (slots of latent i in increasing slot order), O(B·k), no comparison sort.
* :func:`grouped_sum`: ``out[i] = Σ_{(b,j): idx=i} coef[b, j] · X_b`` for every latent, in the order of the
  counting sort (deterministic), 16 latents per task, written as ``[n, d]`` or directly transposed as
  ``[d, n]`` (the W_enc layout: each latent block's rows are 16 contiguous floats), with ``Σ coef`` per
  latent for the bias gradients.

:class:`SparseDecodeCPUFn`, :class:`CSRDecodeCPUFn` and :class:`TopKEncodeCPUFn` wire them into autograd;
the TopK forward runs the encoder GEMM in row chunks into one reused buffer and selects each chunk's top-k
(:func:`topk_encode_cpu`). The plain-torch references are :func:`sparsedict.kernels.sparse_decode.
sparse_decode_ref` and :func:`sparsedict.kernels.topk_encode.topk_encode_ref` (``F.embedding_bag`` with
offsets for the CSR decode).
"""

from __future__ import annotations

import functools

import torch
from sparsedict.kernels import topk_cpu
from torch import Tensor

LATENT_BLOCK = 16
"""Latents per task of :func:`grouped_sum` (one cache line of fp32 per row of the transposed output)."""
ENCODE_CHUNK = 1024
"""Rows per encoder GEMM + selection chunk of :func:`topk_encode_cpu`; each chunk hands the cores from torch's
thread pool to numba's and back, so fewer, larger chunks win (measured: benchmarks/RESULTS_training.md)."""

_FM = {"reassoc", "contract", "nsz"}  # vectorised reductions; no nnan/ninf (values are compared with 0)


@functools.cache
def _kernels():
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=True, fastmath=_FM)
    def decode(rowptr, idx, val, W, bias, has_bias, out, parts):
        B = rowptr.shape[0] - 1
        d = W.shape[1]
        for p in numba.prange(parts):
            for b in range(p * B // parts, (p + 1) * B // parts):
                o = out[b]
                if has_bias:
                    o[:] = bias
                else:
                    o[:] = 0.0
                for e in range(rowptr[b], rowptr[b + 1]):
                    v = val[e]
                    if v != 0.0:
                        w = W[idx[e]]
                        for c in range(d):
                            o[c] += v * w[c]

    @numba.njit(parallel=True, cache=True, fastmath=_FM)
    def sddmm(rowptr, idx, g, W, out, parts):
        B = rowptr.shape[0] - 1
        d = W.shape[1]
        for p in numba.prange(parts):
            for b in range(p * B // parts, (p + 1) * B // parts):
                gb = g[b]
                for e in range(rowptr[b], rowptr[b + 1]):
                    w = W[idx[e]]
                    s = np.float32(0.0)
                    for c in range(d):
                        s += gb[c] * w[c]
                    out[e] = s

    @numba.njit(cache=True)
    def group(flat, n, offsets, order):
        counts = np.zeros(n + 1, np.int64)
        for e in range(flat.shape[0]):
            counts[flat[e] + 1] += 1
        for i in range(n):
            counts[i + 1] += counts[i]
        offsets[:] = counts
        for e in range(flat.shape[0]):
            i = flat[e]
            order[counts[i]] = e
            counts[i] += 1

    @numba.njit(parallel=True, cache=True, fastmath=_FM)
    def grouped_sum(order, offsets, rows, coef, X, out, transpose, csum, with_sum):
        n = offsets.shape[0] - 1
        d = X.shape[1]
        L = 16
        nblocks = (n + L - 1) // L
        for blk in numba.prange(nblocks):
            i0 = blk * L
            i1 = min(i0 + L, n)
            acc = np.zeros((L, d), np.float32)
            for i in range(i0, i1):
                a = acc[i - i0]
                s = np.float32(0.0)
                for e in range(offsets[i], offsets[i + 1]):
                    slot = order[e]
                    cf = coef[slot]
                    s += cf
                    if cf != 0.0:
                        xr = X[rows[slot]]
                        for c in range(d):
                            a[c] += cf * xr[c]
                if with_sum:
                    csum[i] = s
            if transpose:  # out is [d, n]: row c gets the block's L contiguous entries
                for c in range(d):
                    for i in range(i0, i1):
                        out[c, i] = acc[i - i0, c]
            else:
                for i in range(i0, i1):
                    out[i, :] = acc[i - i0]

    return decode, sddmm, group, grouped_sum


def _np(t: Tensor):
    return t.detach().numpy()


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def padded_rows(indices: Tensor) -> tuple[Tensor, Tensor]:
    """``(rowptr [B+1], flat indices [B·k])``: a padded ``[B, k]`` code in the CSR form the kernels take."""
    B, k = indices.shape
    return torch.arange(B + 1, dtype=torch.int64) * k, indices.reshape(-1).contiguous()


def row_of_slots(rowptr: Tensor) -> Tensor:
    """``rows [nnz]``: the row of every slot of a CSR code."""
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())


def decode_csr(
    rowptr: Tensor, idx: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor | None = None
) -> Tensor:
    """``[B, d]`` fp32, row b = ``b_dec + Σ_{e in row b} val[e] · W_dec[idx[e]]`` (row b's slots are
    ``rowptr[b]:rowptr[b+1]`` of the flat ``idx, val``)."""
    dec, _, _, _ = _kernels()
    B = rowptr.numel() - 1
    W = _f32(W_dec)
    out = torch.empty(B, W.shape[1], dtype=torch.float32)
    bias = _f32(b_dec) if b_dec is not None else W.new_zeros(W.shape[1])
    if B:
        dec(_np(rowptr), _np(idx.contiguous()), _np(_f32(val).reshape(-1)), _np(W), _np(bias), b_dec is not None,
            _np(out), min(topk_cpu.numba_threads(), B))  # fmt: skip
    return out


def decode(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """``[B, d]`` fp32 = ``b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]`` (float32 inputs, int64 indices)."""
    return decode_csr(*padded_rows(indices), values, W_dec, b_dec)


def sddmm_csr(rowptr: Tensor, idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """``[nnz]`` fp32: ``out[e] = <g_b, W[idx[e]]>`` for every slot e of row b."""
    _, sd, _, _ = _kernels()
    B = rowptr.numel() - 1
    out = torch.empty(idx.numel(), dtype=torch.float32)
    if B:
        sd(
            _np(rowptr),
            _np(idx.contiguous()),
            _np(_f32(g)),
            _np(_f32(W)),
            _np(out),
            min(topk_cpu.numba_threads(), B),
        )
    return out


def sddmm(indices: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """``[B, k]`` fp32: ``out[b, j] = <g_b, W[indices[b, j]]>``."""
    return sddmm_csr(*padded_rows(indices), g, W).view(indices.shape)


def group_by_latent(indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(offsets [n+1], order [B·k])``: the flat slots of each latent i are ``order[offsets[i]:offsets[i+1]]``,
    in increasing slot order (a stable counting sort). ``indices``: ``[B, k]`` or flat ``[nnz]``."""
    _, _, grp, _ = _kernels()
    flat = indices.reshape(-1).contiguous()
    offsets = torch.empty(n + 1, dtype=torch.int64)
    order = torch.empty(flat.numel(), dtype=torch.int64)
    grp(_np(flat), n, _np(offsets), _np(order))
    return offsets, order


def grouped_sum_csr(
    rows: Tensor, idx: Tensor, coef: Tensor, X: Tensor, n: int, transpose: bool = False, with_sum: bool = False,
    grouping: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``out[i] = Σ_{e: idx[e]=i} coef[e] · X[rows[e]]`` fp32 ``[n, d]`` (``[d, n]`` with ``transpose``), and
    ``Σ coef`` per latent ``[n]`` with ``with_sum``. Latents without entries get exact zeros."""
    *_, gs = _kernels()
    d = X.shape[1]
    offsets, order = grouping if grouping is not None else group_by_latent(idx, n)
    out = torch.empty((d, n) if transpose else (n, d), dtype=torch.float32)
    csum = torch.empty(n if with_sum else 0, dtype=torch.float32)
    if n:
        topk_cpu.numba_threads()
        gs(_np(order), _np(offsets), _np(rows.contiguous()), _np(_f32(coef).reshape(-1)), _np(_f32(X)), _np(out),
           transpose, _np(csum), with_sum)  # fmt: skip
    return out, (csum if with_sum else None)


def grouped_sum(
    indices: Tensor, coef: Tensor, X: Tensor, n: int, transpose: bool = False, with_sum: bool = False,
    grouping: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """``out[i] = Σ_{(b,j): idx[b,j]=i} coef[b, j] · X_b`` fp32 ``[n, d]`` (``[d, n]`` with ``transpose``),
    and ``Σ coef`` per latent ``[n]`` with ``with_sum``. Latents without entries get exact zeros."""
    B, k = indices.shape
    rows = torch.arange(B, dtype=torch.int64).repeat_interleave(k)
    return grouped_sum_csr(rows, indices.reshape(-1), coef, X, n, transpose, with_sum, grouping)


class SparseDecodeCPUFn(torch.autograd.Function):
    """numba decode; backward: SDDMM (values), grouped sums (W_dec), column sum (b_dec). fp32 throughout."""

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None):
        ctx.save_for_backward(indices, values, W_dec)
        ctx.has_bias = b_dec is not None
        ctx.dtypes = (values.dtype, W_dec.dtype, None if b_dec is None else b_dec.dtype)
        return decode(indices, values, W_dec, b_dec).to(W_dec.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        indices, values, W_dec = ctx.saved_tensors
        g = _f32(g)
        g_val = g_W = g_b = None
        if ctx.needs_input_grad[1]:
            g_val = sddmm(indices, g, W_dec).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            g_W = grouped_sum(indices, values, g, W_dec.shape[0])[0].to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g.sum(0).to(ctx.dtypes[2])
        return None, g_val, g_W, g_b


class CSRDecodeCPUFn(torch.autograd.Function):
    """:func:`decode_csr` with :class:`SparseDecodeCPUFn`'s backward, for a CSR code (``rows``:
    :func:`row_of_slots` of ``rowptr``)."""

    @staticmethod
    def forward(
        ctx, rowptr: Tensor, idx: Tensor, rows: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor | None
    ):
        ctx.save_for_backward(rowptr, idx, rows, val, W_dec)
        ctx.has_bias = b_dec is not None
        ctx.dtypes = (val.dtype, W_dec.dtype, None if b_dec is None else b_dec.dtype)
        return decode_csr(rowptr, idx, val, W_dec, b_dec).to(W_dec.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        rowptr, idx, rows, val, W_dec = ctx.saved_tensors
        g = _f32(g)
        g_val = g_W = g_b = None
        if ctx.needs_input_grad[3]:
            g_val = sddmm_csr(rowptr, idx, g, W_dec).to(ctx.dtypes[0])
        if ctx.needs_input_grad[4]:
            g_W = grouped_sum_csr(rows, idx, val, g, W_dec.shape[0])[0].to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[5]:
            g_b = g.sum(0).to(ctx.dtypes[2])
        return None, None, None, g_val, g_W, g_b


def sparse_decode_cpu(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """CPU numba path of :func:`sparsedict.kernels.sparse_decode` (same contract as the reference)."""
    from sparsedict.kernels.sparse_decode import check_decode_args

    check_decode_args(indices, values, W_dec, b_dec)
    return SparseDecodeCPUFn.apply(indices.long(), values, W_dec, b_dec)


# ---------------------------------------------------------------------------------------------------
# TopK encode


_workspace: dict[tuple, Tensor] = {}


def _buffer(rows: int, n: int, dtype: torch.dtype) -> Tensor:
    """A reused ``[rows, n]`` buffer (one per shape and dtype): no page faults from a fresh allocation."""
    key = (rows, n, dtype)
    buf = _workspace.get(key)
    if buf is None:
        _workspace.clear()  # keep one buffer: shapes change rarely (last batch, evaluation)
        buf = _workspace[key] = torch.empty(rows, n, dtype=dtype)
    return buf


def encode_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(values [B, k] fp32, indices [B, k])`` of the top-k of ``x W_enc + b_enc`` (ReLU not applied).

    The GEMM runs in ``x``'s dtype (the caller casts; bf16 uses the CPU's bf16 matrix units where torch
    has them), ``chunk`` rows at a time into one reused buffer, each chunk's top-k selected by
    :func:`sparsedict.kernels.topk_cpu.select_topk_cpu` right after its GEMM.
    """
    B = x.shape[0]
    n = W_enc.shape[1]
    chunk = max(1, min(chunk or ENCODE_CHUNK, B))
    vals = torch.empty(B, k, dtype=torch.float32)
    idx = torch.empty(B, k, dtype=torch.int64)
    buf = _buffer(chunk, n, x.dtype)
    for r0 in range(0, B, chunk):
        r1 = min(B, r0 + chunk)
        out = buf[: r1 - r0]
        torch.addmm(b_enc, x[r0:r1], W_enc, out=out)
        topk_cpu.select_topk_into(out, k, vals[r0:r1], idx[r0:r1])
    return vals, idx


class TopKEncodeCPUFn(torch.autograd.Function):
    """Chunked GEMM + numba selection forward; sparse numba backward (grouped sums over x's rows).

    ``dtype`` is the GEMM's compute dtype (fp32, or bf16 under autocast); selection, values and every
    gradient are fp32 (bf16 pre-activations are widened exactly before selection).
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dtype: torch.dtype):
        with torch.autocast("cpu", enabled=False):
            xc = x.detach().to(dtype).contiguous()
            values, indices = encode_select(xc, W_enc.detach().to(dtype), b_enc.detach().to(dtype), k)
            values.relu_()
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.dtypes = (x.dtype, W_enc.dtype, b_enc.dtype)
        return values.to(x.dtype if x.dtype != torch.float32 else torch.float32), indices

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_idx):
        x, W_enc, values, indices = ctx.saved_tensors
        gp = torch.where(values > 0, g_values.float(), 0.0)  # ReLU
        needs = ctx.needs_input_grad
        gx, gW, gb = encoder_grads(x, W_enc, *padded_rows(indices), gp.reshape(-1), needs[0], needs[1], needs[2],
                                   ctx.dtypes)  # fmt: skip
        return gx, gW, gb, None, None


def encoder_grads(
    x: Tensor, W_enc: Tensor, rowptr: Tensor, idx: Tensor, gp: Tensor, need_x: bool, need_W: bool,
    need_b: bool, dtypes: tuple, rows: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients of ``x``, ``W_enc`` and ``b_enc`` (in ``dtypes``) from the fp32 gradient ``gp [nnz]`` of the
    pre-activations ``x_b W_enc[:, idx[e]] + b_enc[idx[e]]`` of a CSR code (``rowptr``, flat ``idx``; ``rows``:
    :func:`row_of_slots`, computed when None): a decode through ``W_encᵀ`` for x, a grouped sum over x's rows
    written as ``[d, n]`` for W_enc, per-latent sums for b_enc (None where not needed)."""
    gx = gW = gb = None
    if need_x:
        table = W_enc.detach().T.float().contiguous()
        gx = decode_csr(rowptr, idx, gp, table).to(dtypes[0])
    if need_W or need_b:
        rows = row_of_slots(rowptr) if rows is None else rows
        gWt, gb = grouped_sum_csr(rows, idx, gp, x, W_enc.shape[1], transpose=True, with_sum=True)
        gW = gWt.to(dtypes[1]) if need_W else None
        gb = gb.to(dtypes[2]) if need_b else None
    return gx, gW, gb


def topk_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """CPU numba path of :func:`sparsedict.kernels.topk_encode`; under CPU autocast the GEMM runs in its dtype."""
    from sparsedict.kernels.topk_encode import check_encode_args

    check_encode_args(x, W_enc, b_enc, k)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return TopKEncodeCPUFn.apply(x, W_enc, b_enc, k, dtype)
