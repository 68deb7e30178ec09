"""Decoder-normalised Adam update: one pass over ``W_dec [n, d]``.

Per row i, with ``ŵ = W_i / (‖W_i‖ + 1e-8)``:

1. ``G_i ← G_i − <G_i, ŵ> ŵ`` (remove the component parallel to the row);
2. ``G_i ← G_i + weight_decay · W_i`` (L2, as ``torch.optim.Adam``; 0 by default);
3. Adam with bias correction, exactly as ``torch.optim.Adam`` (``amsgrad=False``, ``maximize=False``):
   ``m ← β1 m + (1−β1) G``, ``v ← β2 v + (1−β2) G²``,
   ``W ← W − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)``;
4. ``W_i ← W_i / (‖W_i‖ + 1e-8)`` (back to unit norm).

``normalised_adam_update_ref`` is the unfused torch sequence; ``_normalised_adam_kernel`` does all four
steps with one read and one write of W, m, v (one program per row, the whole row in registers, fp32 maths).
:func:`normalised_adam_step` is the entry point for the trainer.
"""

from __future__ import annotations

import functools
import math

import torch
from sparsedict.kernels._common import LazyJit, check_float, interpreting, next_pow2, resolve_backend
from torch import Tensor

tl = None  # triton.language, bound by LazyJit at first launch (importing this module never imports Triton)

NORM_EPS = 1e-8
"""The eps of the row normalisation (same as ``Dictionary.normalise_decoder``)."""
MAX_D = 32768
"""Largest row length the one-pass kernel takes (the row lives in registers)."""


@torch.no_grad()
def normalised_adam_update_ref(
    W: Tensor,
    G: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """Unfused reference, in place on ``W, G, exp_avg, exp_avg_sq`` (all ``[n, d]``); ``step`` counts from 1."""
    beta1, beta2 = betas
    w_hat = W / (W.norm(dim=1, keepdim=True) + NORM_EPS)
    G.sub_((G * w_hat).sum(1, keepdim=True) * w_hat)
    g = G.add(W, alpha=weight_decay) if weight_decay else G
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    W.addcdiv_(exp_avg, denom, value=-lr / bc1)
    W.div_(W.norm(dim=1, keepdim=True) + NORM_EPS)


def _normalised_adam_kernel(
    W, G, M, V, D, stride_w, stride_g, stride_m, stride_v,
    lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per row: project, Adam, renormalise (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + row * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + row * stride_m + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + row * stride_v + cols, mask=mask, other=0.0).to(tl.float32)
    w_hat = w / (tl.sqrt(tl.sum(w * w, 0)) + 1e-8)
    g = g - tl.sum(g * w_hat, 0) * w_hat
    g = g + weight_decay * w
    m = m + (1.0 - beta1) * (g - m)  # lerp, as torch.optim.Adam
    v = beta2 * v + (1.0 - beta2) * g * g
    w = w - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
    w = w / (tl.sqrt(tl.sum(w * w, 0)) + 1e-8)
    tl.store(W + row * stride_w + cols, w.to(W.dtype.element_ty), mask=mask)
    tl.store(M + row * stride_m + cols, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + row * stride_v + cols, v.to(V.dtype.element_ty), mask=mask)


_kernel = LazyJit(_normalised_adam_kernel)


@functools.cache
def _numba_kernel():
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
    def update(W, G, M, V, lr_bc1, omb1, beta2, omb2, eps, weight_decay, bc2_sqrt, parts):
        """All scalars fp32 (as torch's fp32 tensor ops use them), computed in fp64 first as torch does:
        ``lr_bc1 = lr / (1 − β1^t)``, ``omb1 = 1 − β1``, ``omb2 = 1 − β2``."""
        n, D = W.shape
        one = np.float32(1.0)
        tiny = np.float32(NORM_EPS)
        for p in numba.prange(parts):
            for i in range(p * n // parts, (p + 1) * n // parts):
                w, g, m, v = W[i], G[i], M[i], V[i]
                ss = np.float32(0.0)
                for c in range(D):
                    ss += w[c] * w[c]
                inv = one / (np.sqrt(ss) + tiny)
                dot = np.float32(0.0)
                for c in range(D):
                    dot += g[c] * (w[c] * inv)
                ss = np.float32(0.0)
                for c in range(D):
                    gc = g[c] - dot * (w[c] * inv) + weight_decay * w[c]
                    mc = m[c] + omb1 * (gc - m[c])  # lerp, as torch.optim.Adam
                    vc = beta2 * v[c] + omb2 * (gc * gc)
                    wc = w[c] - lr_bc1 * (mc / (np.sqrt(vc) / bc2_sqrt + eps))
                    m[c], v[c], w[c] = mc, vc, wc
                    ss += wc * wc
                inv = one / (np.sqrt(ss) + tiny)
                for c in range(D):
                    w[c] *= inv

    return update


@torch.no_grad()
def normalised_adam_update_numba(
    W: Tensor,
    G: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """One-pass CPU (numba) version of :func:`normalised_adam_update_ref`: rows in parallel, each row read
    and written once (fp32 maths; ``G`` is read, not modified). All four tensors fp32 ``[n, d]`` contiguous."""
    import numpy as np
    from sparsedict.kernels.topk_cpu import numba_threads

    for name, t in (("W", W), ("G", G), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or t.shape != W.shape or not t.is_contiguous():
            raise ValueError(f"normalised_adam_update: {name} must be contiguous float32 {list(W.shape)}")
    beta1, beta2 = betas
    parts = min(numba_threads(), max(1, W.shape[0]))
    f32 = np.float32
    _numba_kernel()(
        W.numpy(), G.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), f32(lr / (1 - beta1**step)), f32(1 - beta1),
        f32(beta2), f32(1 - beta2), f32(eps), f32(weight_decay), f32(math.sqrt(1 - beta2**step)), parts,
    )  # fmt: skip


@torch.no_grad()
def normalised_adam_update_triton(
    W: Tensor,
    G: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """One-pass Triton version of :func:`normalised_adam_update_ref` (``G`` is read, not modified)."""
    n, D = W.shape
    if D > MAX_D:
        raise ValueError(
            f"normalised_adam_update: rows of length {D} > {MAX_D} are not supported; use backend='ref'"
        )
    for name, t in (("W", W), ("G", G), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_float(name, "normalised_adam_update", t)
        if t.shape != W.shape or t.stride(1) != 1:
            raise ValueError(
                f"normalised_adam_update: {name} must be [n, d]={list(W.shape)} with contiguous rows"
            )
    beta1, beta2 = betas
    BLOCK_D = next_pow2(D)
    launch = {"num_warps": max(1, min(16, BLOCK_D // 256))} if W.is_cuda and not interpreting() else {}
    _kernel[(n,)](
        W, G, exp_avg, exp_avg_sq, D, W.stride(0), G.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        float(1 - beta1**step), float(math.sqrt(1 - beta2**step)), BLOCK_D=BLOCK_D, **launch,
    )  # fmt: skip


@torch.no_grad()
def normalised_adam_step(
    W_dec: Tensor,
    state: dict,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    backend: str | None = None,
) -> None:
    """Decoder-normalised Adam step on ``W_dec [n, d]`` using ``W_dec.grad``, in place.

    ``state`` is a dict laid out like ``torch.optim.Adam``'s per-parameter state — ``'step'`` (a float32
    scalar tensor on the CPU), ``'exp_avg'`` and ``'exp_avg_sq'`` (``[n, d]``, W_dec's dtype and device) —
    created on the first call when empty, so a trainer can keep W_dec out of its torch optimiser, pass
    ``optimizer.state[W_dec]`` (or any dict it checkpoints) here, and save it like the other parameters'
    state. The step count is incremented first, as in torch. ``backend``: None/'auto' (Triton on CUDA,
    the numba pass on CPU for contiguous fp32 tensors), 'ref', 'triton' or 'cpu'. The reference path also leaves the projected gradient in ``W_dec.grad``.
    """
    G = W_dec.grad
    if G is None:
        return
    if W_dec.ndim != 2:
        raise ValueError(f"normalised_adam_step: W_dec must be [n, d], got {list(W_dec.shape)}")
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(W_dec, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(W_dec, memory_format=torch.contiguous_format)
    missing = {"step", "exp_avg", "exp_avg_sq"} - set(state)
    if missing:
        raise KeyError(
            f"normalised_adam_step: state lacks {sorted(missing)} (expected torch.optim.Adam's layout)"
        )
    state["step"] += 1
    step = int(state["step"].item())
    args = (W_dec.data, G, state["exp_avg"], state["exp_avg_sq"], step, lr, betas, eps, weight_decay)
    chosen = resolve_backend(backend, W_dec, "normalised_adam_step")
    if chosen == "triton":
        normalised_adam_update_triton(*args)
    elif chosen == "cpu" and all(t.dtype == torch.float32 and t.is_contiguous() for t in args[:4]):
        normalised_adam_update_numba(*args)
    else:
        normalised_adam_update_ref(*args)
