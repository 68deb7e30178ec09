"""Crash-safe shard files: write to a temp name, fsync, rename; validate what is read back.

A shard is a safetensors file. ``write_shard`` serialises it in memory, hashes the bytes (sha256),
writes them under ``.<name>.tmp-<pid>``, fsyncs and renames, so a reader (or a resumed run) only ever
sees complete files. ``check_shard`` validates a file against its manifest entry: present, header
readable, byte size, dtype and shape, and (optionally) checksum.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from sparsedict.cache.manifest import CacheError
from sparsedict.util import fsync_dir

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32,
              "I64": torch.int64, "BOOL": torch.bool, "U8": torch.uint8, "I16": torch.int16}  # fmt: skip


class CacheWriteError(CacheError):
    """Writing a shard failed (e.g. disk full); completed shards are untouched."""


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync (a separate function so tests can simulate a full disk)."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_shard(path: Path, tensors: dict[str, torch.Tensor], done_shards: int = 0) -> dict:
    """Atomically write ``tensors`` to ``path``; return ``{"file", "bytes", "sha256"}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.contiguous() for k, v in tensors.items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_bytes(tmp, data)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "an I/O error"
        raise CacheWriteError(
            f"could not write shard {path} ({reason}: {err}). The {done_shards} shard(s) already completed in "
            f"{path.parent.parent.parent} are kept. Free space (or choose an out_dir on a larger disk and copy "
            "the directory there), then run the same `sparsedict cache` command again to resume."
        ) from err
    fsync_dir(path.parent)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_header(path: Path) -> tuple[dict, int]:
    """Return ``(safetensors header, data offset)`` of ``path`` or raise a CacheError naming it."""
    fix = "delete it and run the same `sparsedict cache` command again to recompute this shard"
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CacheError(f"shard {path} is truncated ({len(raw)} bytes, no header); {fix}")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise CacheError(f"shard {path} has a corrupt header (length {n}); {fix}")
            header = json.loads(f.read(n))
    except FileNotFoundError as err:
        raise CacheError(
            f"shard {path} listed in the manifest is missing; run the same `sparsedict cache` command again to "
            "recompute missing shards (completed ones are kept)"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"shard {path} has a corrupt header ({err}); {fix}") from err
    return header, 8 + n


def check_shard(
    path: Path, entry: dict, expect: dict[str, tuple[str, tuple[int, ...]]], checksum: bool
) -> dict:
    """Validate ``path`` against its manifest ``entry`` and ``{tensor: (dtype, shape)}``; return the header."""
    fix = "delete it and run the same `sparsedict cache` command again to recompute this shard"
    header, offset = read_header(path)
    size = path.stat().st_size
    for name, (dtype, shape) in expect.items():
        info = header.get(name)
        if info is None:
            raise CacheError(f"shard {path} has no tensor {name!r}; {fix}")
        if info["dtype"] != dtype or tuple(info["shape"]) != tuple(shape):
            raise CacheError(
                f"shard {path}: tensor {name!r} is {info['dtype']}{info['shape']} but the manifest says "
                f"{dtype}{list(shape)} (dtype/dimension mismatch: was the file replaced by another cache?); {fix}"
            )
        end = info["data_offsets"][1]
        if offset + end > size:
            raise CacheError(f"shard {path} is truncated (tensor {name!r} ends past the file end); {fix}")
    if size != entry["bytes"]:
        raise CacheError(
            f"shard {path} is {size} bytes but the manifest records {entry['bytes']} (truncated?); {fix}"
        )
    if checksum:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            raise CacheError(f"shard {path} fails its sha256 checksum (corrupted on disk); {fix}")
    return header


def st_dtype(dtype: torch.dtype) -> str:
    """safetensors dtype code of a torch dtype."""
    return next(k for k, v in _ST_DTYPES.items() if v == dtype)
