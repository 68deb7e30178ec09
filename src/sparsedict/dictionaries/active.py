"""The sparse training step of the architectures with dense codes (ReLU, JumpReLU, Gated, and BatchTopK /
Matryoshka with batch selection) on CPU.

:func:`active_pre_acts` returns the encoder pre-activations of the entries that can matter to a training
step — those with ``z + shift > 0`` for the architecture's per-latent ``shift`` — as a differentiable flat
tensor with their positions (:class:`Active`, a CSR layout:
:func:`sparsedict.kernels.active_cpu.encode_active`); :func:`selected_pre_acts` does the same for any
selection of the dense pre-activations (BatchTopK's batch top-k). Both return None where the architecture's
dense path runs instead: outside training or without gradients, off the CPU kernels
(``SPARSEDICT_DISABLE_CPU_KERNELS=1``, CUDA, no numba, Triton forced), with ``SPARSEDICT_DENSE_CODES=1`` (for comparisons),
or when there are more than ``MAX_ACTIVE_FRACTION · B · n`` such entries (early training, while the codes
are still dense). The architecture applies its activation to them, decodes with :meth:`Active.reconstruct`
and reports :meth:`Active.code`; the pre-activations, hence the selection and the code, are the dense
path's bit for bit, and the losses and gradients equal the dense path's up to the fp32 summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsedict.dictionaries.base import SparseCode
from sparsedict.kernels._common import use_cpu_kernels, use_triton
from sparsedict.kernels.active_cpu import encode_active, select_active
from sparsedict.kernels.sparse_cpu import CSRDecodeCPUFn

MAX_ACTIVE_FRACTION = 1 / 8
"""Above this fraction of active entries (of ``B · n``) the dense step is used (measured:
benchmarks/RESULTS_training.md)."""


@dataclass
class Active:
    """The selected entries of a batch's pre-activations: ``z [nnz]`` (differentiable) at latents
    ``indices [nnz]`` of rows ``rows [nnz]``; row b holds slots ``rowptr[b]:rowptr[b+1]``."""

    z: Tensor
    rowptr: Tensor
    indices: Tensor
    rows: Tensor
    n_latents: int

    @property
    def batch(self) -> int:
        return self.rowptr.numel() - 1

    def decode(self, values: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
        """``[B, d]`` = ``b_dec + Σ_e values[e] · W_dec[indices[e]]`` per row; sparse backward."""
        return CSRDecodeCPUFn.apply(self.rowptr, self.indices, self.rows, values, W_dec, b_dec)

    def reconstruct(self, model, values: Tensor, x: Tensor) -> Tensor:
        """``model``'s reconstruction from the code ``values [nnz]``: :meth:`decode` with its ``W_dec``,
        ``b_dec`` and the skip term ``x W_skipᵀ`` where it has one (as ``Dictionary.decode``)."""
        out = self.decode(values, model.W_dec, model.b_dec)
        return out if model.W_skip is None else out + x @ model.W_skip.T

    def prefix_decodes(self, values: Tensor, W_dec: Tensor, ends: list[int]) -> Tensor:
        """``[B, G, d]``: row b, prefix g = ``Σ_{e in row b, indices[e] < ends[g]} values[e] · W_dec[indices[e]]``
        (no bias), as one decode: a row's slots are in latent order, so the slots of each (row, group) pair
        are a contiguous run — the rows of a ``B·G``-row CSR code — and the G group sums are added up
        cumulatively."""
        G = len(ends)
        group = torch.bucketize(self.indices, torch.tensor(ends[:-1], dtype=self.indices.dtype), right=True)
        sub = self.rows * G + group
        rowptr = torch.zeros(self.batch * G + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(sub, minlength=self.batch * G), 0, out=rowptr[1:])
        blocks = CSRDecodeCPUFn.apply(rowptr, self.indices, sub, values, W_dec, None)
        return blocks.view(self.batch, G, -1).cumsum(1)

    def mean_row_sum(self, t: Tensor) -> Tensor:
        """``Σ_e t[e] / B``: the batch mean of a per-token sum over the selected entries."""
        return t.sum() / max(1, self.batch)

    def code(self, values: Tensor) -> SparseCode:
        """The code ``values [nnz]`` as a padded :class:`SparseCode` ``[B, k_max]`` (zeros pad the rows;
        differentiable, as the dense paths' codes are)."""
        counts = self.rowptr.diff()
        k_max = max(1, int(counts.max()) if counts.numel() else 1)
        pos = torch.arange(self.indices.numel()) - self.rowptr[self.rows]
        vals = values.new_zeros(self.batch, k_max).index_put((self.rows, pos), values)
        idx = torch.zeros(self.batch, k_max, dtype=torch.int64)
        idx[self.rows, pos] = self.indices
        return SparseCode(vals, idx, self.n_latents)


def active_pre_acts(
    model, x: Tensor, bias: Tensor | None, shift: Tensor | None, dtype: torch.dtype
) -> Active | None:
    """The entries of ``_x_in(x) W_enc + bias`` with ``z + shift > 0``, or None (the dense path; see the
    module docstring). ``dtype``: the encoder GEMM's dtype."""
    cap = int(MAX_ACTIVE_FRACTION * x.shape[0] * model.n_latents)
    return selected_pre_acts(model, x, bias, lambda z: select_active(z, shift, cap), dtype)


def selected_pre_acts(model, x: Tensor, bias: Tensor | None, select, dtype: torch.dtype) -> Active | None:
    """The entries of ``_x_in(x) W_enc + bias`` that ``select`` picks (see
    :func:`~sparsedict.kernels.active_cpu.encode_active`), or None (the dense path)."""
    W = model.W_enc
    if not (model.training and torch.is_grad_enabled() and use_cpu_kernels(W) and use_cpu_kernels(x)):
        return None
    if use_triton(W):  # the fused Triton kernels are the choice (forced onto CPU under the interpreter)
        return None
    if os.environ.get("SPARSEDICT_DENSE_CODES", "") not in ("", "0"):
        return None
    if model.subtracts_b_dec:
        # as TopK: the values of encoding x − b_dec, with b_dec's encoder gradient through a bias term whose
        # value is exactly ``bias`` (x itself needs no gradient)
        b = model.b_dec.detach()
        with torch.autocast(x.device.type, enabled=False):
            through = (b - model.b_dec) @ W.detach()
        bias = through if bias is None else bias + through
        x = x - b
    sel = encode_active(x, W, bias, select, dtype)
    return None if sel is None else Active(*sel, model.n_latents)


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype a plain ``x @ W`` runs in here: the autocast dtype when CPU autocast is on, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
