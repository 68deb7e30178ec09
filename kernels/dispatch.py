"""The single place that chooses between Triton kernels and their plain-torch references.

``backend=None`` (or ``'auto'``) picks Triton when :func:`use_triton` says so — CUDA tensors, Triton
importable, ``SPARSEDICT_DISABLE_TRITON`` unset (``SPARSEDICT_FORCE_TRITON=1`` with ``TRITON_INTERPRET=1``
also picks it on CPU, for tests) —, the CPU (numba) kernels on CPU tensors when numba imports
(:func:`~sparsedict.kernels._common.use_cpu_kernels`; ``SPARSEDICT_DISABLE_CPU_KERNELS=1`` turns them
off), and the reference otherwise. ``'ref'`` / ``'triton'`` / ``'cpu'`` force one.
Options the fused kernels do not support raise a ``ValueError`` naming the fix instead of silently
falling back.
"""

from __future__ import annotations

from sparsedict.kernels._common import resolve_backend, use_triton
from sparsedict.kernels.normalised_update import normalised_adam_step
from sparsedict.kernels.sparse_cpu import sparse_decode_cpu, topk_encode_cpu
from sparsedict.kernels.sparse_decode import sparse_decode_ref, sparse_decode_triton
from sparsedict.kernels.topk_encode import ALGORITHMS, MAX_K, topk_encode_ref, topk_encode_triton
from torch import Tensor

__all__ = ["normalised_adam_step", "sparse_decode", "topk_encode", "use_triton"]


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, backend: str | None = None, algorithm: str | None = None
) -> tuple[Tensor, Tensor]:
    """``(values [B, k], indices [B, k] int64)`` of ``TopK(ReLU(x W_enc + b_enc))``; differentiable.

    ``x [B, d]``, ``W_enc [d, n]``, ``b_enc [n]``. Values are sorted descending; ties go to the lower
    latent index. With ``backend='auto'`` a k above the fused kernel's limit (128) uses the reference.
    ``algorithm`` picks the fused forward (``'merge'`` / ``'filter'``, see
    :mod:`sparsedict.kernels.topk_encode`; None: its ``DEFAULT_ALGORITHM``); the reference ignores it.
    """
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"topk_encode: algorithm must be one of {ALGORITHMS}, not {algorithm!r}")
    chosen = resolve_backend(backend, x, "topk_encode")
    if chosen == "triton" and k > MAX_K and backend in (None, "auto"):
        chosen = "ref"
    if chosen == "triton":
        return topk_encode_triton(x, W_enc, b_enc, k, algorithm)
    if chosen == "cpu":
        return topk_encode_cpu(x, W_enc, b_enc, k)
    return topk_encode_ref(x, W_enc, b_enc, k)


def sparse_decode(
    indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """``x̂ [B, d] = b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]``; differentiable, sparse backward."""
    chosen = resolve_backend(backend, W_dec, "sparse_decode")
    if chosen == "triton":
        return sparse_decode_triton(indices, values, W_dec, b_dec)
    if chosen == "cpu":
        return sparse_decode_cpu(indices, values, W_dec, b_dec)
    return sparse_decode_ref(indices, values, W_dec, b_dec)
