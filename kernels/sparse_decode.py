"""Sparse decode (embedding bag): ``x̂ = b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]``.

``F.embedding_bag`` with per-sample weights gives the forward and a sparse backward: the gradient
wrt ``W_dec`` touches only the selected rows and the gradient wrt ``values`` is the SDDMM
``<grad_out_b, W_dec[idx[b, j]]>``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sparse_decode_ref(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Plain-torch reference. ``indices, values [B, k]``, ``W_dec [n, d]``, ``b_dec [d]`` -> ``[B, d]``."""
    if indices.shape != values.shape or indices.ndim != 2:
        raise ValueError(f"sparse_decode: indices {list(indices.shape)} and values {list(values.shape)} must both be [B, k]")
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec
