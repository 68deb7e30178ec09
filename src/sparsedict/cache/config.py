"""``CacheConfig``: what to cache, from which model and text, and how to store it.

The same dataclass is the ``cache:`` section of a recipe YAML and the flags of ``sparsedict cache``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")

# Fields that do not change what is cached (where it goes, which device or batch computes it,
# progress display): they stay out of the config hash, so a run may resume with other values.
_RUNTIME_FIELDS = ("out_dir", "device", "batch_size", "progress", "num_threads")


@dataclass
class CacheConfig:
    """Configuration of one activation cache (one directory of shards + ``manifest.json``)."""

    model: str = "smollm2-135m"
    """HF model id (local HF cache), local model directory, or "smollm2-135m" for the embedded model."""
    dataset: str = "embedded"
    """Text source: "embedded" (Debian manuals corpus), "embedded-sample" (the small sample shipped
    with the package), a `datasets` name/path, or a local .json/.jsonl/.txt/.parquet file."""
    dataset_config: str | None = None
    """Dataset configuration name passed to `datasets.load_dataset` (e.g. "wikitext-103-raw-v1")."""
    split: str = "train"
    """Dataset split to read (the embedded corpus has "train" and a fixed held-out "test")."""
    text_column: str = "text"
    """Column holding the document text."""
    streaming: bool = False
    """Stream the dataset (`load_dataset(..., streaming=True)`) instead of downloading it whole."""
    hookpoints: list[str] = field(default_factory=lambda: ["resid_post.14"])
    """Hookpoints cached in one forward pass: aliases (resid_post.L, resid_pre.L, mlp_in.L, mlp_out.L,
    mlp_hidden.L, attn_out.L, attn_z.L) or raw module paths with a side ("model.layers.6.mlp:in").
    attn_z.L is stored merged, [rows, n_heads·d_head] (SAELens hook_z with reshape_activations: hook_z),
    with n_heads/d_head in the manifest; ActivationStore(path, "attn_z.L.hK") then serves head K's slice
    [B, d_head] (SAELens hook_head_index=K). "attn_z.L.hK" may also be cached on its own (one head only)."""
    context_length: int = 128
    """Tokens per context (including the BOS token when prepend_bos). Documents are chunked into
    contexts of this length, never packed across documents; the last chunk is right-padded."""
    max_tokens: int | None = 50_000
    """Rows (kept token positions) to cache in total; None caches the whole split."""
    prepend_bos: bool = True
    """Start every context with the tokenizer's BOS token (if it has one)."""
    exclude_bos: bool = True
    """Drop positions holding the BOS token."""
    exclude_first_n: int = 2
    """Drop the first n positions of every context (attention sinks; 2 = BOS and position 1 for SmolLM2)."""
    exclude_special: bool = True
    """Drop positions holding any other special token of the tokenizer (EOS, chat markers, ...)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dtype: str = "float32"
    """Storage dtype of activations: float32, bfloat16 or float16."""
    model_dtype: str = "float32"
    """dtype the model runs in (float32, bfloat16, float16)."""
    shard_rows: int = 16_384
    """Target rows per shard (a shard holds whole contexts, so it may be slightly larger)."""
    out_dir: str = "runs/cache"
    """Output directory; re-running with the same config resumes, another config is refused."""
    device: str = "cpu"
    """Device for the model ("cpu", "cuda", "cuda:1"); under torchrun on GPUs each rank uses its local GPU."""
    num_threads: int | None = None
    """CPU threads for torch (default: the machine's cores divided by the local number of ranks)."""
    seed: int = 0
    """Seed recorded in the manifest (the cache itself is deterministic: document order is kept)."""
    progress: bool = True
    """Show a progress bar with tokens/s and ETA."""

    def __post_init__(self) -> None:
        if isinstance(self.hookpoints, str):
            self.hookpoints = [h.strip() for h in self.hookpoints.split(",") if h.strip()]
        self.hookpoints = list(self.hookpoints)
        if not self.hookpoints:
            raise ValueError("hookpoints is empty: give at least one, e.g. hookpoints=['resid_post.6']")
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise ValueError(f"hookpoints has duplicates: {self.hookpoints}")
        for name in ("dtype", "model_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(DTYPES)}")
        if self.context_length < 2:
            raise ValueError(f"context_length={self.context_length} is too short; use >= 2 (e.g. 128)")
        if self.exclude_first_n < 0 or self.exclude_first_n >= self.context_length:
            raise ValueError(
                f"exclude_first_n={self.exclude_first_n} must be in [0, context_length={self.context_length})"
            )
        for name in ("batch_size", "shard_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None (whole split), got {self.max_tokens}")

    def content_dict(self) -> dict:
        """The fields that determine the cached content (hashed into ``config_hash``)."""
        data = dataclasses.asdict(self)
        for key in _RUNTIME_FIELDS:
            data.pop(key)
        return data

    def config_hash(self) -> str:
        """Stable hash of :meth:`content_dict`; a cache directory only accepts its own hash."""
        blob = json.dumps(self.content_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
