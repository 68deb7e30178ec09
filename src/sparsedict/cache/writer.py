"""Crash-safe shard files: write to a temp name, fsync, rename; validate what is read back.

A shard is a safetensors file. ``write_shard`` serialises it in memory, hashes the bytes (xxh3_128),
writes them under ``.<name>.tmp-<pid>``, fsyncs and renames, so a reader (or a resumed run) only ever
sees complete files. ``check_shard`` validates a file against its manifest entry: present, header
readable, byte size, dtype and shape, and (optionally) its digest; ``load_shard`` reads a whole small
shard once, checks its digest on those bytes and parses them.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load, save

from sparsedict.cache import digest
from sparsedict.cache.digest import ShardError
from sparsedict.cache.manifest import TOKENS, CacheError
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
    """Atomically write ``tensors`` to ``path``; return ``{"bytes", "xxh3_128"}`` (its size and digest)."""
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
    return {"bytes": len(data), **digest.hash_views([data], [digest.WRITTEN])}


def read_header(path: Path) -> tuple[dict, int]:
    """Return ``(safetensors header, data offset)`` of ``path`` or raise a :class:`ShardError` naming it."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardError(path, f"shard {path} is truncated ({len(raw)} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ShardError(path, f"shard {path} has a corrupt header (length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError as err:
        raise ShardError(path, f"shard {path} listed in the manifest is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(path, f"shard {path} has a corrupt header ({err})") from err
    return header, 8 + n


def check_shard(
    path: Path, entry: dict, expect: dict[str, tuple[str, tuple[int, ...]]], checksum: bool
) -> dict:
    """Validate ``path`` against its manifest ``entry`` and ``{tensor: (dtype, shape)}``; return the header.

    ``checksum`` also checks the file's digest (once a process: see :mod:`sparsedict.cache.digest`).
    """
    header, offset = read_header(path)
    size = path.stat().st_size
    for name, (dtype, shape) in expect.items():
        info = header.get(name)
        if info is None:
            raise ShardError(path, f"shard {path} has no tensor {name!r}")
        if info["dtype"] != dtype or tuple(info["shape"]) != tuple(shape):
            raise ShardError(
                path,
                f"shard {path}: tensor {name!r} is {info['dtype']}{info['shape']} but the manifest says "
                f"{dtype}{list(shape)} (dtype/dimension mismatch: was the file replaced by another cache?)",
            )
        end = info["data_offsets"][1]
        if offset + end > size:
            raise ShardError(
                path,
                f"shard {path} is truncated: tensor {name!r} ends at byte {offset + end}, the file at {size}",
            )
    if size != entry["bytes"]:
        raise ShardError(path, digest.truncated(path, size, entry["bytes"]))
    if checksum:
        digest.verify_file(path, entry)
    return header


def load_shard(
    path: Path, entry: dict, expect: dict[str, tuple[str, tuple[int, ...]]], checksum: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of the shard ``path`` (read once; the digest is checked on those bytes, once a process)."""
    check_shard(path, entry, expect, checksum=False)
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    if checksum:
        digest.verify_bytes(path, data, entry, st)
    return load(data)


def st_dtype(dtype: torch.dtype) -> str:
    """safetensors dtype code of a torch dtype."""
    return next(k for k, v in _ST_DTYPES.items() if v == dtype)


def expected_tensors(manifest: dict, shard: dict, kind: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor: (dtype, shape)}`` the file of ``kind`` (a hookpoint or ``"tokens"``) of ``shard`` must hold."""
    if kind != TOKENS:
        info = manifest["hookpoints"][kind]
        return {"activations": (st_dtype(getattr(torch, info["dtype"])), (shard["rows"], int(info["d"])))}
    n_ctx, rows, t = shard["contexts"], shard["rows"], manifest["context_length"]
    return {"token_ids": ("I32", (n_ctx, t)), "attention_mask": ("BOOL", (n_ctx, t)), "keep": ("BOOL", (n_ctx, t)),
            "row_context": ("I64", (rows,)), "row_position": ("I32", (rows,)), "doc_index": ("I64", (n_ctx,))}  # fmt: skip
