"""Small helpers every layer uses: atomic file writes and the "did you mean" hint of error messages."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], Any]) -> Path:
    """Write ``path`` so that readers see the old file or the new one, never a part.

    ``data`` is text, bytes, or a function that writes the file it is given (``lambda tmp: save_file(t, tmp)``).
    It goes to a temporary file beside ``path``, is fsynced and renamed over ``path``; the directory is
    fsynced after the rename. On an error the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "w" if isinstance(data, str) else "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(
    path: str | os.PathLike, data: Any, indent: int | None = 1, default: Callable[[Any], Any] | None = None
) -> Path:
    """:func:`atomic_write` of ``data`` as JSON (``default`` as in :func:`json.dumps`)."""
    return atomic_write(path, json.dumps(data, indent=indent, default=default))


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """``"; did you mean 'x'?"`` naming the ``n`` choices closest to ``word``, or ``""`` when none is close."""
    near = difflib.get_close_matches(word, list(choices), n=n)
    return f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
