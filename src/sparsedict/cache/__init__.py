"""Activation cache: text -> contexts -> model hooks -> crash-safe shards -> shuffled batches.

    from sparsedict.cache import CacheConfig, cache_activations, ActivationStore
    path = cache_activations(CacheConfig(hookpoints=["resid_post.6"], max_tokens=50_000, out_dir="runs/c"))
    store = ActivationStore(path, "resid_post.6", batch_size=4096)
    for x, _ in store: ...          # x [B, 576] float32

Attention z per head: ``attn_z.L`` is cached merged (``[rows, n_heads·d_head]``, the input of the output
projection, as SAELens' ``hook_z`` with ``reshape_activations: hook_z``); the manifest records ``n_heads`` and
``d_head``, and a ``.hK`` suffix selects one head everywhere a hookpoint is named::

    store = ActivationStore(path, "attn_z.6.h3")   # x [B, 64]: head 3 (SAELens hook_head_index=3)
    x.view(B, store.n_heads, store.d_head)        # a merged attn_z.6 batch, per head

Dictionaries trained on ``attn_z.6.h3`` splice and evaluate like any other (``hooks.replace`` swaps that head
only). ``LiveSource`` (no disk) serves the batches of ``ActivationStore(path, ..., shuffle="window")`` straight
from the model (:mod:`sparsedict.cache.live`); ``hooks`` resolves hookpoint names and records or replaces
activations in a forward pass.

Every reader checks each shard's digest the first time a process touches it (:mod:`sparsedict.cache.digest`);
``verify_cache(path)`` checks a whole cache and ``repair_cache(path)`` recomputes its bad shards.
"""

from sparsedict.cache import hooks
from sparsedict.cache.config import CacheConfig
from sparsedict.cache.digest import ShardError
from sparsedict.cache.manifest import CacheError, read_manifest
from sparsedict.cache.runner import cache_activations
from sparsedict.cache.store import ActivationStore
from sparsedict.cache.verify import VerifyReport, repair_cache, verify_cache
from sparsedict.cache.writer import CacheWriteError

__all__ = [
    "ActivationStore", "CacheConfig", "CacheError", "CacheWriteError", "LiveSource", "ShardError", "VerifyReport",
    "cache_activations", "hooks", "read_manifest", "repair_cache", "verify_cache",
]  # fmt: skip


def __getattr__(name: str):
    if name == "LiveSource":
        from sparsedict.cache.live import LiveSource

        return LiveSource
    raise AttributeError(f"module 'sparsedict.cache' has no attribute {name!r}")
