"""``manifest.json`` of a cache directory: the single description of what is on disk.

Layout of a cache directory::

    manifest.json                         this file (replaced atomically)
    shards/<hookpoint>/<i:06d>.safetensors  "activations" [rows, d]
    shards/tokens/<i:06d>.safetensors       "token_ids" [n_ctx, T] int32, "attention_mask" and "keep"
                                            [n_ctx, T] bool, "row_context" [rows] int64 (global context
                                            index), "row_position" [rows] int32, "doc_index" [n_ctx]
    shards/_receipts/<i:06d>.json           per-shard record written after its files are in place

Every writer (one per rank) writes receipts; the manifest is rebuilt from them (rank 0 only), so
concurrent ranks never write the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsedict.util import write_json_atomic

FORMAT = "sparsedict-activation-cache"
VERSION = 1
TOKENS = "tokens"


class CacheError(RuntimeError):
    """A cache directory that cannot be used as is; the message names the file and the fix."""


def hookpoint_dir(name: str) -> str:
    """Directory name under ``shards/`` for a hookpoint name (``:`` is not portable in paths)."""
    return name.replace(":", "@").replace("/", "_")


def shard_file(kind: str, index: int) -> str:
    """Relative path of shard ``index`` of ``kind`` (a hookpoint name or ``"tokens"``)."""
    return f"shards/{hookpoint_dir(kind)}/{index:06d}.safetensors"


def receipt_file(index: int) -> str:
    return f"shards/_receipts/{index:06d}.json"


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load ``root/manifest.json``, checking it is a sparsedict cache manifest."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {root} is not an activation cache. Create one with `sparsedict cache ...`."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(
            f"{path} is not valid JSON ({err}); run the same `sparsedict cache` command again to rebuild it "
            "from the shard receipts."
        ) from err
    if data.get("format") != FORMAT:
        raise CacheError(
            f"{path} is not a sparsedict activation-cache manifest (format={data.get('format')!r})"
        )
    return data


def read_receipts(root: Path) -> dict[int, dict[str, Any]]:
    """All complete-shard receipts of ``root`` by shard index (unreadable receipts are ignored)."""
    out: dict[int, dict[str, Any]] = {}
    folder = root / "shards" / "_receipts"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        out[int(rec["index"])] = rec
    return out


def rebuild(root: Path, manifest: dict[str, Any], n_shards: int | None = None) -> dict[str, Any]:
    """Refresh ``manifest``'s shard list, totals and status from the receipts on disk, and save it."""
    receipts = read_receipts(root)
    shards = [receipts[i] for i in sorted(receipts)]
    manifest["shards"] = shards
    manifest["n_rows"] = sum(s["rows"] for s in shards)
    manifest["n_contexts"] = sum(s["contexts"] for s in shards)
    manifest["n_tokens_seen"] = sum(s["tokens_seen"] for s in shards)
    dropped = {k: 0 for k in manifest["exclusions"]["dropped"]}
    for s in shards:
        for k, v in s["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
    manifest["exclusions"]["dropped"] = dropped
    if n_shards is not None:
        manifest["n_shards"] = n_shards
    total = manifest.get("n_shards")
    done = total is not None and sorted(receipts) == list(range(total))
    manifest["status"] = "complete" if done else "in_progress"
    write_json_atomic(root / "manifest.json", manifest)
    return manifest
