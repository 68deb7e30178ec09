"""Sparse training path for dense-code dictionaries (ReLU, JumpReLU, Gated, BatchTopK) on CPU.

Their codes are dense tensors ``[B, n]`` by definition, but only the entries above a per-latent threshold
are active (and, for the straight-through estimators, a window just below it). Everything a training step
needs from the code — the decode, its backward, and the encoder's backward — depends on those entries
only, so after the one dense encoder GEMM the step can run on them alone with TopK's sparse kernels
(:mod:`sparsedict.kernels.sparse_cpu`), in CSR form: the number of active entries varies a lot from row
to row (a few rows of large norm hold many times the mean), so a padded ``[B, k_max]`` would waste most
of its slots.

* :func:`select_active`: two passes over ``z [B, n]`` (numba, rows in parallel) that count, then collect,
  per row, the latents with ``z[b, i] + shift[i] > 0`` (fp32 add, so the condition is exactly the torch
  expression of the same name) in increasing latent order: ``rowptr [B+1]``, flat ``indices, values
  [nnz]``. Returns None when there are more than ``cap`` entries (the caller then runs its dense path).
  :func:`select_active_ref` is the plain-torch reference.
* :class:`ActiveEncodeCPUFn`: the selected pre-activations ``z[b, idx[e]]`` as a differentiable function of
  ``x, W_enc, b_enc`` with TopK's sparse encoder backward (grouped sums over x's rows for ``W_enc``,
  per-latent sums for ``b_enc``, a sparse decode through ``W_encᵀ`` for ``x``).
* :func:`select_batch_topk`: BatchTopK's selection (the largest ``k·B`` entries of the batch) in the same
  form, without sorting all ``B·n`` entries.
* :func:`encode_active`: GEMM + a selection + the function above; the caller applies its activation to the
  ``[nnz]`` pre-activations and decodes them with :class:`~sparsedict.kernels.sparse_cpu.CSRDecodeCPUFn`.
"""

from __future__ import annotations

import functools

import torch
from sparsedict.kernels import sparse_cpu, topk_cpu
from torch import Tensor


@functools.cache
def _kernels():
    import numba

    @numba.njit(parallel=True, cache=True)
    def count(z, shift, has_shift, counts, parts):
        B, n = z.shape
        for p in numba.prange(parts):
            for b in range(p * B // parts, (p + 1) * B // parts):
                zb = z[b]
                c = 0
                for i in range(n):
                    v = zb[i] + shift[i] if has_shift else zb[i]
                    if v > 0:
                        c += 1
                counts[b] = c

    @numba.njit(parallel=True, cache=True)
    def fill(z, shift, has_shift, rowptr, idx, vals, parts):
        B, n = z.shape
        for p in numba.prange(parts):
            for b in range(p * B // parts, (p + 1) * B // parts):
                zb = z[b]
                e = rowptr[b]
                for i in range(n):
                    v = zb[i] + shift[i] if has_shift else zb[i]
                    if v > 0:
                        idx[e] = i
                        vals[e] = zb[i]
                        e += 1

    return count, fill


def select_active(z: Tensor, shift: Tensor | None, cap: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(rowptr [B+1], indices [nnz] int64, values [nnz] fp32)`` of the entries of the fp32 ``z [B, n]`` with
    ``z + shift > 0`` (``shift [n]``, None: 0), per row in increasing latent order; None when there are more
    than ``cap`` such entries in all."""
    count, fill = _kernels()
    B, n = z.shape
    z = z.detach().float().contiguous()
    sh = shift.detach().float().contiguous() if shift is not None else z.new_zeros(n)
    parts = max(1, min(topk_cpu.numba_threads(), B))
    counts = torch.zeros(B, dtype=torch.int64)
    if B:
        count(z.numpy(), sh.numpy(), shift is not None, counts.numpy(), parts)
    rowptr = torch.zeros(B + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=rowptr[1:])
    nnz = int(rowptr[-1])
    if nnz > cap:
        return None
    idx = torch.empty(nnz, dtype=torch.int64)
    vals = torch.empty(nnz, dtype=torch.float32)
    if B:
        fill(z.numpy(), sh.numpy(), shift is not None, rowptr.numpy(), idx.numpy(), vals.numpy(), parts)
    return rowptr, idx, vals


def select_active_ref(z: Tensor, shift: Tensor | None, cap: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Plain-torch reference of :func:`select_active` (``nonzero`` of the activity mask, row-major)."""
    z = z.detach().float()
    mask = (z + shift.detach().float()) > 0 if shift is not None else z > 0
    rows, idx = mask.nonzero(as_tuple=True)
    if idx.numel() > cap:
        return None
    rowptr = torch.zeros(z.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(mask.sum(1), 0, out=rowptr[1:])
    return rowptr, idx, z[rows, idx]


class ActiveEncodeCPUFn(torch.autograd.Function):
    """``z_sel[e] = <x_b, W_enc[:, idx[e]]> + b_enc[idx[e]]`` for the slots e of row b (the values are given:
    the dense GEMM computed them) with TopK's sparse encoder backward."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, rowptr: Tensor, idx: Tensor, rows: Tensor,
                z_sel: Tensor):  # fmt: skip
        ctx.save_for_backward(x, W_enc, rowptr, idx, rows)
        ctx.has_bias = b_enc is not None
        ctx.dtypes = (x.dtype, W_enc.dtype, None if b_enc is None else b_enc.dtype)
        return z_sel.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, W_enc, rowptr, idx, rows = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, gW, gb = sparse_cpu.encoder_grads(
            x, W_enc, rowptr, idx, g.float().contiguous(), needs[0], needs[1], ctx.has_bias and needs[2],
            ctx.dtypes, rows,
        )  # fmt: skip
        return gx, gW, gb, None, None, None, None


def select_batch_topk(
    z: Tensor, count: int, cap: int, stride: int = 17
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The ``count`` largest positive entries of ``z [B, n]`` over the whole batch (a batch top-k; fewer
    where fewer are positive) in the CSR form of :func:`select_active`, or None when ``count > cap``.

    Without a sort of all ``B·n`` entries: a lower bound ``t`` of the ``count``-th largest value comes from
    every ``stride``-th entry (the ``1.5·count/stride + 64``-th largest of that sample), :func:`select_active`
    collects the entries above ``t``, and the exact top ``count`` is taken among those. When the sample's
    bound is too high (fewer than ``count`` entries above a positive ``t``) the whole batch is searched.
    Ties at the boundary are kept in an unspecified order (as ``torch.topk``).
    """
    if count > cap:
        return None
    flat = z.detach().reshape(-1)
    sample = flat[::stride]
    m = int(1.5 * count / stride) + 64
    t = float(sample.topk(m, sorted=False).values.min()) if m < sample.numel() else 0.0
    sel = select_active(z, torch.full((z.shape[1],), -max(t, 0.0)), flat.numel())
    if sel[1].numel() < count and t > 0:  # the sample's bound missed: search everything above 0
        sel = select_active(z, None, flat.numel())
    rowptr, idx, vals = sel
    if vals.numel() <= count:
        return sel
    keep = torch.zeros(vals.numel(), dtype=torch.bool)
    keep[vals.topk(count, sorted=False).indices] = True
    rows = sparse_cpu.row_of_slots(rowptr)
    new_ptr = torch.zeros_like(rowptr)
    torch.cumsum(torch.bincount(rows[keep], minlength=rowptr.numel() - 1), 0, out=new_ptr[1:])
    return new_ptr, idx[keep], vals[keep]


def encode_active(
    x: Tensor, W_enc: Tensor, b_enc: Tensor | None, select, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(z [nnz] fp32, differentiable; rowptr [B+1]; indices [nnz]; rows [nnz])`` of the pre-activations
    ``x W_enc + b_enc`` that ``select(z [B, n] fp32) -> (rowptr, indices, values) | None`` picks (e.g.
    :func:`select_active` with a shift, or :func:`select_batch_topk`), or None where it returns None.

    The GEMM runs in ``dtype`` (bf16 under autocast: its product is widened to fp32 exactly); the bias is
    added in fp32 after it, as in the dense paths.
    """
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        xc = x.detach().to(dtype)
        w = W_enc.detach().to(dtype)
        z = (xc @ w).float()  # as the dense paths' ``x @ W + b``: the same values, bit for bit
        if b_enc is not None:
            z += b_enc.detach().float()
        sel = select(z)
    if sel is None:
        return None
    rowptr, idx, vals = sel
    rows = sparse_cpu.row_of_slots(rowptr)
    return ActiveEncodeCPUFn.apply(x, W_enc, b_enc, rowptr, idx, rows, vals), rowptr, idx, rows
