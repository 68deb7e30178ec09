"""Shard digests: hash whole shard files and check each one, once per process, before any of it is read.

Every file entry of a cache records ``bytes`` and a digest of the whole file. New caches record ``xxh3_128``
(xxhash); caches written by earlier versions record ``sha256`` only and are checked with it, which is far
slower (``sparsedict cache verify DIR --repair`` adds ``xxh3_128`` to them). Measurements behind the choice:
benchmarks/RESULTS_cache.md.

Rule: a shard file is hashed in full before the first byte of it is served, however little of it a reader
wants (one window, ``rows(0, 10)``, one tokens shard). Files are hashed in ``WINDOW``-byte positioned reads
into one buffer, so a check adds that buffer to a reader's RAM and nothing else. The digest covers the whole
file and a store visits a shard's blocks in random order across a whole epoch, so hashing blocks as they are
read could only vouch for them after they were served; the whole-file pass costs one extra sequential read of
each shard a process touches (from the page cache when the cache fits in RAM). A process
remembers the files that passed, by path, device, inode, size, mtime and ctime, and hashes each once: a
second store on the same cache, a new epoch or ``sample`` after iteration read nothing twice, and a
rewritten file (new inode or times) is hashed again.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import xxhash

from sparsedict.cache.manifest import CacheError

ALGORITHMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
"""Digests a file entry may record, the preferred first; a file is checked against the first one present."""
WRITTEN = "xxh3_128"
"""The digest new shards record."""
WINDOW = 1 << 20
"""Bytes of a shard read (and held) at once while it is hashed."""

_passed: set[tuple] = set()
_noted: set[str] = set()


def repair_hint(root: str | Path) -> str:
    """The fix for a bad shard of the cache at ``root``."""
    return (
        f"run `sparsedict cache verify {root} --repair` to recompute the bad shards from the config recorded "
        "in the cache (re-running the `sparsedict cache` command that made it does the same)"
    )


class ShardError(CacheError):
    """A shard file that cannot be used: ``problem`` says what is wrong with ``path``, the message adds the fix."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{problem}; fix: {repair_hint(cache_root(self.path))}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


def cache_root(path: Path) -> Path:
    """The cache directory holding the shard file ``path`` (``<root>/shards/<kind>/<i>.safetensors``)."""
    return path.parents[2] if len(path.parents) > 2 else path.parent


def hash_views(views: Iterable, algorithms: Iterable[str]) -> dict[str, str]:
    """Hex digests ``{algorithm: digest}`` of the concatenated byte buffers ``views`` (one pass)."""
    hashers = {name: ALGORITHMS[name]() for name in algorithms}
    for view in views:
        for h in hashers.values():
            h.update(view)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _windows(path: Path, fd: int, size: int):
    """``[0, size)`` of ``fd`` in consecutive views of one ``WINDOW``-byte buffer (each valid until the next)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
    view, pos = memoryview(bytearray(min(WINDOW, size))), 0
    while pos < size:
        n = os.preadv(fd, [view[: min(WINDOW, size - pos)]], pos)
        if n == 0:
            raise ShardError(path, f"shard {path} is truncated: it ends at byte {pos}, its stat said {size}")
        yield view[:n]
        pos += n


def hash_file(path: Path, fd: int, size: int, algorithms: Iterable[str]) -> dict[str, str]:
    """Hex digests of the first ``size`` bytes of the open file ``fd`` (at ``path``)."""
    return hash_views(_windows(path, fd, size), algorithms)


def recorded(entry: dict) -> str:
    """The algorithm a file entry is checked with (the first of ``ALGORITHMS`` it records)."""
    for name in ALGORITHMS:
        if name in entry:
            return name
    raise CacheError(f"manifest entry {entry.get('file')} records no digest (one of {', '.join(ALGORITHMS)})")


def _key(path: Path, st: os.stat_result) -> tuple:
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _compare(path: Path, entry: dict, got: dict[str, str]) -> None:
    name = recorded(entry)
    if got[name] != entry[name]:
        raise ShardError(
            path,
            f"shard {path} fails its {name} check: the manifest records {entry[name]} but the file hashes to "
            f"{got[name]} (its bytes changed on disk after it was written)",
        )


def _note_sha256(root: Path) -> None:
    if str(root) not in _noted:
        _noted.add(str(root))
        warnings.warn(
            f"cache {root} records sha256 digests only (written by an earlier sparsedict): its shards are checked "
            f"with sha256, which is slow; `sparsedict cache verify {root} --repair` adds the fast xxh3_128 digests",
            stacklevel=3,
        )


def verify_fd(
    path: Path, fd: int, entry: dict, fresh: bool = False, also: Iterable[str] = ()
) -> dict[str, str]:
    """Check the open file ``fd`` (at ``path``) against its manifest ``entry``, unless this process already did
    (``fresh=True`` hashes again). Returns the digests computed (``also`` adds algorithms to the same pass)."""
    st = os.fstat(fd)
    key = _key(path, st)
    if not fresh and key in _passed:
        return {}
    if st.st_size != entry["bytes"]:
        raise ShardError(path, truncated(path, st.st_size, entry["bytes"]))
    name = recorded(entry)
    if name == "sha256":
        _note_sha256(cache_root(path))
    got = hash_file(path, fd, st.st_size, dict.fromkeys([name, *also]))
    _compare(path, entry, got)
    _passed.add(key)
    return got


def verify_file(path: Path, entry: dict, fresh: bool = False, also: Iterable[str] = ()) -> dict[str, str]:
    """:func:`verify_fd` on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return verify_fd(path, fd, entry, fresh, also)
    finally:
        os.close(fd)


def verify_bytes(path: Path, data: bytes, entry: dict, st: os.stat_result) -> None:
    """Check ``data``, the whole content of ``path`` as read (``st`` its stat), against ``entry`` (once a process)."""
    key = _key(path, st)
    if key in _passed:
        return
    if len(data) != entry["bytes"]:
        raise ShardError(path, truncated(path, len(data), entry["bytes"]))
    name = recorded(entry)
    if name == "sha256":
        _note_sha256(cache_root(path))
    _compare(path, entry, hash_views([data], [name]))
    _passed.add(key)


def truncated(path: Path, size: int, expected: int) -> str:
    """The problem line of a shard whose size differs from the manifest's."""
    kind = "truncated" if size < expected else "longer than written"
    return f"shard {path} is {kind}: {size} bytes on disk, the manifest records {expected}"
