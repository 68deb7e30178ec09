"""sparsify (eai-sparsify) fixtures: SAE, transcoder, skip transcoder and groupmax, written by sparsify itself.

``SparseCoder`` built from its config, parameters overwritten with seeded random values (decoder rows of
different norms), saved with ``save_to_disk`` into ``checkpoint/<hookpoint>/`` (the layout of a sparsify run
directory) and reloaded with ``SparseCoder.load_from_disk``. Outputs of its ``forward``: ``acts`` (the top-k
activations scattered into ``[B, n]``), ``out`` (``sae_out``, skip connection included) and ``decoded``
(``decode(top_acts, top_indices)``). Triton is disabled (``SPARSIFY_DISABLE_TRITON=1``), so the decoder is its
eager ``embedding_bag`` one, the one that runs on CPU.
"""

from __future__ import annotations

import os

os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # before sparsify binds its decoder

import sparsify.sparse_coder
import sparsify.utils
import torch
from common import fresh_dir, inputs, randomise, write
from sparsify import SparseCoder, SparseCoderConfig

D, N, K = 16, 48, 6
LIB = "sparsify"


def fixture(name: str, hookpoint: str, seed: int, **cfg_kw) -> None:
    cfg = SparseCoderConfig(num_latents=N, k=K, **cfg_kw)
    sae = SparseCoder(D, cfg)
    scales = {"encoder.weight": 1.0 / D**0.5, "encoder.bias": 0.3, "W_dec": 0.5, "b_dec": 0.5}
    if cfg.skip_connection:
        scales["W_skip"] = 0.1
    randomise(sae, seed, scales, {"encoder.bias": -0.1})
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_dec.mul_(0.5 + torch.rand(N, 1, generator=g))
    path = fresh_dir(LIB, name)
    sae.save_to_disk(path / "checkpoint" / hookpoint)
    back = SparseCoder.load_from_disk(path / "checkpoint" / hookpoint, device="cpu")
    x = inputs(D, seed + 2, scale=2.0, offset=0.5)
    with torch.no_grad():
        out = back(x)
        acts = torch.zeros(x.shape[0], N).scatter_(1, out.latent_indices.long(), out.latent_acts.float())
        decoded = back.decode(out.latent_acts, out.latent_indices)
    how = (
        "SparseCoder(d_in, SparseCoderConfig(...)), seeded random parameters, save_to_disk into "
        f"checkpoint/{hookpoint}; outputs of forward after SparseCoder.load_from_disk, SPARSIFY_DISABLE_TRITON=1"
    )
    meta = {
        "class": "SparseCoder",
        "config": cfg.to_dict(),
        "subfolder": hookpoint,
        "how": how,
        "made_by": "scripts/peer_fixtures/gen_sparsify.py",
    }
    write(path, "eai-sparsify", meta, {"x": x, "acts": acts, "out": out.sae_out, "decoded": decoded})


def main() -> None:
    assert sparsify.sparse_coder.decoder_impl is sparsify.utils.eager_decode, (
        "sparsify picked its Triton decoder"
    )
    fixture("sae_topk", "layers.3", 40)
    fixture("transcoder", "layers.2.mlp", 41, transcode=True)
    fixture("skip_transcoder", "layers.2.mlp", 42, transcode=True, skip_connection=True)
    fixture("sae_groupmax", "layers.3", 43, activation="groupmax")


if __name__ == "__main__":
    main()
