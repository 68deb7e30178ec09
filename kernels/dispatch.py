"""The single place that chooses between Triton kernels and their plain-torch references."""

from __future__ import annotations

import os

from sparsedict.kernels.sparse_decode import sparse_decode_ref
from sparsedict.kernels.topk_encode import topk_encode_ref
from torch import Tensor


def use_triton(t: Tensor) -> bool:
    """True when ``t`` lives on CUDA, Triton imports and ``SPARSEDICT_DISABLE_TRITON`` is unset."""
    if os.environ.get("SPARSEDICT_DISABLE_TRITON", "") not in ("", "0"):
        return False
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values [B,k], indices [B,k])`` of ``TopK(ReLU(x W_enc + b_enc))``; differentiable."""
    return topk_encode_ref(x, W_enc, b_enc, k)


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """``x̂ = b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]``; differentiable, sparse backward."""
    return sparse_decode_ref(indices, values, W_dec, b_dec)
