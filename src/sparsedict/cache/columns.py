"""Shard columns of an activation cache: positioned reads of row ranges (all features or one head's slice).

Rows are read with ``os.preadv`` straight into caller-owned buffers rather than through long-lived memory maps,
whose resident file pages would count against the process's RSS and grow with the cache size. With ``verify``
(the default of every reader) a shard's digest is checked when the column first opens it, before any of its rows
are read (see :mod:`sparsedict.cache.digest`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np
import torch

from sparsedict.cache import digest
from sparsedict.cache.digest import ShardError
from sparsedict.cache.writer import check_shard, expected_tensors, read_header, st_dtype

NP_DTYPES = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}
"""numpy dtype holding each safetensors storage dtype (bfloat16 as its uint16 bit pattern)."""
SCRATCH_BYTES = 4 << 20
"""Bytes of a head column's whole-row read buffer."""


def _load_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_trim()


def trim() -> None:
    """``malloc_trim(0)`` where glibc provides it: return free heap pages to the OS (bounds peak RSS)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Column:
    """One hookpoint's shards (or one head's slice of them): row offsets and positioned reads of row ranges."""

    def __init__(self, root: Path, manifest: dict, name: str, verify: bool, head: int | None = None) -> None:
        info = manifest["hookpoints"][name]
        self.name, self.head, self.d_stored = name, head, int(info["d"])
        self.code = st_dtype(getattr(torch, info["dtype"]))
        self.np_dtype = np.dtype(NP_DTYPES[self.code])
        self.cols: tuple[int, int] | None = None
        self.d = self.d_stored
        if head is not None:
            d_head = int(info["d_head"])
            self.cols, self.d = (head * d_head, (head + 1) * d_head), d_head
        self.verify = verify
        self.files, self.entries, self.offsets, self.rows = [], [], [], []
        for shard in manifest["shards"]:
            entry = shard["files"][name]
            path = root / entry["file"]
            header = check_shard(path, entry, expected_tensors(manifest, shard, name), checksum=False)
            self.files.append(path)
            self.entries.append(entry)
            self.offsets.append(read_header(path)[1] + header["activations"]["data_offsets"][0])
            self.rows.append(int(shard["rows"]))
        self._fds: dict[int, int] = {}

    def _open(self, shard: int) -> int:
        """The open file of ``shard``; opening it first checks its digest (with ``verify``)."""
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.files[shard], os.O_RDONLY)
            try:
                if self.verify:
                    digest.verify_fd(self.files[shard], fd, self.entries[shard])
            except BaseException:
                os.close(fd)
                raise
            self._fds[shard] = fd
        return fd

    def _pread(self, shard: int, a: int, out: np.ndarray) -> None:
        """Read full stored rows ``[a, a + len(out))`` of ``shard`` into the C-contiguous ``out``."""
        fd = self._open(shard)
        view, pos = memoryview(out).cast("B"), self.offsets[shard] + a * self.d_stored * out.itemsize
        while len(view):
            n = os.preadv(fd, [view], pos)
            if n == 0:
                path = self.files[shard]
                raise ShardError(
                    path, f"shard {path} is truncated: it ends at byte {pos}, before row {a + len(out)}"
                )
            view, pos = view[n:], pos + n

    def read_into(self, shard: int, a: int, b: int, out: np.ndarray) -> None:
        """Rows ``[a, b)`` of ``shard`` (this column's ``d`` features) into ``out [b - a, d]`` (C-contiguous).

        A head column reads whole rows through a small scratch buffer (≤ 4 MB) and keeps its slice.
        """
        if self.cols is None:
            self._pread(shard, a, out)
            return
        lo, hi = self.cols
        step = max(1, SCRATCH_BYTES // (self.d_stored * self.np_dtype.itemsize))
        scratch = np.empty((min(step, b - a), self.d_stored), dtype=self.np_dtype)
        for r in range(a, b, step):
            n = min(step, b - r)
            self._pread(shard, r, scratch[:n])
            out[r - a : r - a + n] = scratch[:n, lo:hi]

    def as_torch(self, arr: np.ndarray) -> torch.Tensor:
        """A numpy array of this column's storage dtype as a torch tensor (shares memory)."""
        out = torch.from_numpy(arr)
        return out.view(torch.bfloat16) if self.code == "BF16" else out

    def read(self, shard: int, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of ``shard`` as a tensor ``[b - a, d]`` in the stored dtype."""
        arr = np.empty((b - a, self.d), dtype=self.np_dtype)
        self.read_into(shard, a, b, arr)
        return self.as_torch(arr)

    def memmap(self, shard: int) -> np.ndarray:
        """Read-only memory map ``[rows, d_stored]`` of ``shard`` (for random access)."""
        self._open(shard)
        return np.memmap(self.files[shard], dtype=self.np_dtype, mode="r", offset=self.offsets[shard],
                         shape=(self.rows[shard], self.d_stored))  # fmt: skip

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
