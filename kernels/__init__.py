"""Fused kernels for sparse dictionaries, importable as ``sparsedict.kernels``.

One module per op, each holding the plain-torch reference (``*_ref``), the Triton kernel and launcher
(CUDA only) and the ``torch.autograd.Function`` that wires them. Dictionaries call the dispatch
functions exported here; :mod:`sparsedict.kernels.dispatch` picks Triton on CUDA tensors and the
reference elsewhere. Set ``SPARSEDICT_DISABLE_TRITON=1`` to force the reference everywhere.
"""

from sparsedict.kernels.dispatch import sparse_decode, topk_encode, use_triton

__all__ = ["sparse_decode", "topk_encode", "use_triton"]
