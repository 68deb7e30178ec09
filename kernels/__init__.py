"""Fused kernels for sparse dictionaries, importable as ``sparsedict.kernels``.

One module per op, each holding the plain-torch reference (``*_ref``), the Triton kernel and launcher
and the ``torch.autograd.Function`` that wires them. Dictionaries and the trainer call the dispatch
functions exported here, which pick Triton on CUDA tensors and the reference elsewhere:

* ``topk_encode(x, W_enc, b_enc, k, backend=None) -> (values [B, k], indices [B, k])``
* ``sparse_decode(indices, values, W_dec, b_dec=None, backend=None) -> x_hat [B, d]``
* ``normalised_adam_step(W_dec, state, lr, betas, eps, weight_decay=0, backend=None)`` (in place)

``SPARSEDICT_DISABLE_TRITON=1`` forces the reference everywhere. Importing this package does not import
Triton; kernels are compiled on first use.
"""

from sparsedict.kernels.dispatch import normalised_adam_step, sparse_decode, topk_encode, use_triton

__all__ = ["normalised_adam_step", "sparse_decode", "topk_encode", "use_triton"]
