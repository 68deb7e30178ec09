"""Matching-pursuit forward/backward kernels: a numba CPU kernel and a batched torch fallback.

Both compute the same thing (the maths is in :mod:`sparsedict.dictionaries.mp`, which calls these):

- ``pursuit_forward(r0 [B,d], D [n,d], c [B,n], G [n,n], T, absolute, use_numba)`` ->
  ``(a [B,T], idx [B,T], first [B,T], rT [B,d])``. ``c`` holds ``r0 Dᵀ`` on entry and the final
  correlations ``r_T Dᵀ`` on exit (updated in place with ``c -= a_t G[j_t]``); ``a_t`` is recomputed
  exactly from the running residual; ``first[b, t]`` is the first step that picked the same atom.
- ``pursuit_backward(grad_a, D, a, idx, rT, use_numba)`` -> ``(d_r0 [B,d], d_D [n,d])``: the reverse sweep.

The numba kernel runs one row per task (rows in parallel), keeping that row's ``c`` (n floats) and
residual in cache through all T steps: one vectorised pass over ``n`` per step (``c -= a G[j]`` fused with
the maxima of blocks of 256 scores), no [B, n] temporaries; the next argmax then reads the n/256 block
maxima and one block instead of scanning the row (the first maximal index, as ``torch.argmax``). The maxima
are taken over integer keys that order like the floats (LLVM vectorises integer maxima, not numba's float
ones); the keys tell -0.0 below +0.0, the only place the order differs from the floats'. The torch
loop is the path for GPUs (and machines without numba): per step one gather of ``G`` rows and one
argmax over ``[B, n]``.
"""

from __future__ import annotations

import functools

import torch
from sparsedict.kernels.topk_cpu import numba_available, numba_threads
from torch import Tensor

__all__ = ["first_occurrence", "numba_available", "pursuit_backward", "pursuit_forward"]


def first_occurrence(idx: Tensor) -> Tensor:
    """``first[b, t]`` = the smallest s with ``idx[b, s] == idx[b, t]`` (``[B, T]``, int64)."""
    T = idx.shape[1]
    eq = idx[:, :, None] == idx[:, None, :]  # [B, T, T]: eq[b, t, s]
    return eq.to(torch.uint8).argmax(-1) if T > 1 else torch.zeros_like(idx)


@functools.cache
def _kernels():
    import numba
    import numpy as np
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload

    # Reassociation lets LLVM vectorise the max and dot reductions; no 'nnan'/'ninf' (we compare with -inf).
    fm = {"reassoc", "contract", "nsz", "arcp"}
    BLOCK = 256  # scores per block maximum (measured best of 64-1024 at n = 4608): the argmax scans n/BLOCK
    # maxima and one block instead of ~n/2 scores

    @intrinsic
    def order_key(typingctx, v, absolute):
        """An integer that orders like the float ``v`` (``|v|`` when ``absolute``): its bits, with the magnitude
        bits flipped for negative ``v`` (``|v|``: the sign bit cleared). Integer maxima vectorise where float
        ones do not (LLVM needs no-NaN guarantees numba cannot give a float max)."""
        width = v.bitwidth
        key = types.int32 if width == 32 else types.int64

        def codegen(context, builder, signature, args):
            it = ir.IntType(width)
            bits = builder.bitcast(args[0], it)
            sign = builder.ashr(bits, ir.Constant(it, width - 1))  # all ones for negative v
            flip = builder.select(
                args[1], ir.Constant(it, 1 << (width - 1)), ir.Constant(it, (1 << (width - 1)) - 1)
            )
            return builder.xor(bits, builder.and_(sign, flip))

        return key(v, types.boolean), codegen

    @intrinsic
    def bf16_bits_to_f32(typingctx, bits):
        """The fp32 value of bf16 ``bits`` (uint16): zero-extend, shift into the high half, reinterpret."""

        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return types.float32(types.uint16), codegen

    def as_float(v):
        """A float array element as it is; a bf16 one (its uint16 bits) widened to fp32 (exact)."""

    @overload(as_float, inline="always")
    def _as_float(v):
        if isinstance(v, types.Integer):
            return lambda v: bf16_bits_to_f32(v)
        return lambda v: v

    def widen_row(src, b, dst):
        """``dst[:] = src[b]`` widened when ``src`` holds bf16 bits; nothing for a float ``src`` (``dst``'s own matrix)."""

    @overload(widen_row, inline="always")
    def _widen_row(src, b, dst):
        if isinstance(src.dtype, types.Integer):

            def impl(src, b, dst):
                for i in range(dst.shape[0]):
                    dst[i] = bf16_bits_to_f32(src[b, i])

            return impl
        return lambda src, b, dst: None

    @numba.njit(fastmath=fm, inline="always")
    def update_key_max(c, g, a, absolute, kmin):
        """``c -= a·g`` in place; returns the largest :func:`order_key` of the new ``c`` (vectorised)."""
        m = kmin
        for i in range(c.shape[0]):
            v = c[i] - a * as_float(g[i])
            c[i] = v
            key = order_key(v, absolute)
            m = key if key > m else m
        return m

    @numba.njit(fastmath=fm, inline="always")
    def key_max(c, absolute, kmin):
        m = kmin
        for i in range(c.shape[0]):
            key = order_key(c[i], absolute)
            m = key if key > m else m
        return m

    @numba.njit(fastmath=fm, inline="always")
    def block_max(cb, Gj, a, update, absolute, kmin, bmax):
        """``cb -= a·Gj`` in place when ``update``; ``bmax[k]`` = the largest :func:`order_key` of ``cb`` over
        block k (``BLOCK`` entries, the last one partial); returns the largest key of the row. (Each block is
        passed on as its own slice: LLVM vectorises those loops, not the same loops over ``lo:hi`` indices.)"""
        n = cb.shape[0]
        best = kmin
        for k in range(bmax.shape[0]):
            lo, hi = k * BLOCK, min(k * BLOCK + BLOCK, n)
            if update:
                m = update_key_max(cb[lo:hi], Gj[lo:hi], a, absolute, kmin)
            else:
                m = key_max(cb[lo:hi], absolute, kmin)
            bmax[k] = m
            best = max(best, m)
        return best

    @numba.njit(fastmath=fm, inline="always")
    def first_max(cb, bmax, best, absolute):
        """The first index whose key equals ``best``: the first block holding it, then inside that block."""
        n = cb.shape[0]
        for k in range(bmax.shape[0]):
            if bmax[k] == best:
                for i in range(k * BLOCK, min(k * BLOCK + BLOCK, n)):
                    if order_key(cb[i], absolute) == best:
                        return i
        return 0

    @numba.njit(parallel=True, cache=True, fastmath=fm)
    def forward(r0, D, c_in, G, T, absolute, a_out, idx_out, first_out, rT, c, ninf_arr):
        ninf = ninf_arr[0]
        kmin = order_key(ninf, False)  # the key of -inf: no score is below it
        B, n = c.shape
        d = D.shape[1]
        nb = (n + BLOCK - 1) // BLOCK
        for b in numba.prange(B):
            cb = c[b]
            widen_row(c_in, b, cb)  # bf16 c_in: its row widened into c; a float c_in is c itself
            r = rT[b]
            bmax = np.empty(nb, dtype=np.int64)
            for i in range(d):
                r[i] = r0[b, i]
            best = block_max(cb, cb, ninf, False, absolute, kmin, bmax)  # ninf: an unused `a` of the dtype
            for t in range(T):
                j = first_max(cb, bmax, best, absolute)  # the argmax of the previous pass: first match wins
                Dj = D[j]
                a = 0.0
                for i in range(d):
                    a += Dj[i] * r[i]
                a_out[b, t] = a
                a = a_out[b, t]  # in the array dtype, so the loops below stay in fp32
                for i in range(d):
                    r[i] -= a * Dj[i]
                # c -= a G[j] fused with the block maxima of the new scores
                best = block_max(cb, G[j], a, True, absolute, kmin, bmax)
                idx_out[b, t] = j
                f = t
                for s in range(t):
                    if idx_out[b, s] == j:
                        f = s
                        break
                first_out[b, t] = f

    @numba.njit(parallel=True, cache=True, fastmath=fm)
    def backward(grad_a, D, a, idx, rT, parts, d_r0, d_D_parts):
        B, T = a.shape
        d = D.shape[1]
        for p in numba.prange(parts):
            acc = d_D_parts[p]
            r = np.empty(d, dtype=rT.dtype)
            rho = np.zeros(d, dtype=rT.dtype)
            zero = np.zeros(1, dtype=rT.dtype)[0]  # a 0 in the array dtype: the sweep stays in fp32, not fp64
            for b in range(p * B // parts, (p + 1) * B // parts):
                for i in range(d):
                    r[i] = rT[b, i]
                    rho[i] = 0.0
                for t in range(T - 1, -1, -1):
                    j = idx[b, t]
                    Dj = D[j]
                    at = a[b, t]
                    dot = zero
                    for i in range(d):
                        dot += rho[i] * Dj[i]
                    s = grad_a[b, t] - dot
                    for i in range(d):
                        rp = r[i] + at * Dj[i]
                        acc[j, i] += s * rp - at * rho[i]
                        rho[i] += s * Dj[i]
                        r[i] = rp
                for i in range(d):
                    d_r0[b, i] = rho[i]

    return forward, backward


@torch.no_grad()
def pursuit_forward(
    r0: Tensor, D: Tensor, c: Tensor, G: Tensor, T: int, absolute: bool, use_numba: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Greedy pursuit (see module docstring); returns ``(a, idx, first, rT, cT)``.

    ``r0`` and ``D`` share one float dtype; ``c`` and ``G`` have it too, or are both bf16 (the outputs of
    bf16 GEMMs) with fp32 ``r0``/``D``: the numba kernel then widens their elements as it reads them (no fp32
    copies of ``c``/``G``, half the memory traffic over ``G``), the arithmetic is fp32 either way and the
    result the same as on fp32 copies. ``cT`` is ``c`` itself, updated in place, when ``c`` has ``r0``'s
    dtype, else a new tensor of that dtype. All tensors contiguous.
    """
    B, d = r0.shape
    half = c.dtype == torch.bfloat16 and r0.dtype == torch.float32
    if half != (G.dtype == torch.bfloat16) or not (half or c.dtype == G.dtype == r0.dtype):
        raise TypeError(f"pursuit_forward: c {c.dtype} and G {G.dtype} must both be {r0.dtype} or both bf16")
    if use_numba:
        fwd, _ = _kernels()
        numba_threads()
        a = torch.empty(B, T, dtype=r0.dtype)
        idx = torch.empty(B, T, dtype=torch.long)
        first = torch.empty(B, T, dtype=torch.long)
        rT = torch.empty(B, d, dtype=r0.dtype)
        cT = torch.empty(c.shape, dtype=r0.dtype) if half else c
        ninf = torch.full((1,), float("-inf"), dtype=r0.dtype)
        bits = (lambda m: m.view(torch.uint16).numpy()) if half else (lambda m: m.numpy())
        fwd(
            r0.numpy(),
            D.numpy(),
            bits(c),
            bits(G),
            T,
            absolute,
            a.numpy(),
            idx.numpy(),
            first.numpy(),
            rT.numpy(),
            cT.numpy(),
            ninf.numpy(),
        )
        return a, idx, first, rT, cT
    c, G = c.to(r0.dtype), G.to(r0.dtype)
    r = r0.clone()
    a_list, idx_list = [], []
    for _ in range(T):
        j = (c.abs() if absolute else c).argmax(1)
        Dj = D[j]
        at = (Dj * r).sum(1)
        r.sub_(at[:, None] * Dj)
        c.sub_(at[:, None] * G[j])
        a_list.append(at)
        idx_list.append(j)
    a, idx = torch.stack(a_list, 1), torch.stack(idx_list, 1)
    return a, idx, first_occurrence(idx), r, c


@torch.no_grad()
def pursuit_backward(
    grad_a: Tensor, D: Tensor, a: Tensor, idx: Tensor, rT: Tensor, use_numba: bool
) -> tuple[Tensor, Tensor]:
    """Reverse sweep: gradients of ``Σ_t grad_a[:, t]·a_t`` wrt ``r0`` and ``D`` (selection held fixed)."""
    B, T = a.shape
    n, d = D.shape
    dtype = D.dtype
    grad_a, a, rT = grad_a.to(dtype).contiguous(), a.to(dtype).contiguous(), rT.to(dtype).contiguous()
    if use_numba:
        _, bwd = _kernels()
        parts = min(numba_threads(), 16, max(1, B))
        d_r0 = torch.empty(B, d, dtype=dtype)
        d_D_parts = torch.zeros(parts, n, d, dtype=dtype)
        bwd(
            grad_a.numpy(),
            D.contiguous().numpy(),
            a.numpy(),
            idx.contiguous().numpy(),
            rT.numpy(),
            parts,
            d_r0.numpy(),
            d_D_parts.numpy(),
        )
        return d_r0, d_D_parts.sum(0)
    r = rT.clone()
    rho = torch.zeros_like(r)
    d_D = torch.zeros(n, d, dtype=dtype, device=D.device)
    for t in range(T - 1, -1, -1):
        j = idx[:, t]
        Dj = D[j]
        at = a[:, t : t + 1]
        s = grad_a[:, t : t + 1] - (rho * Dj).sum(1, keepdim=True)
        r_prev = r + at * Dj
        d_D.index_add_(0, j, s * r_prev - at * rho)
        rho = rho + s * Dj
        r = r_prev
    return rho, d_D
