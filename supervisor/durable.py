"""Durable-file helpers shared by the watchdog, the stores and the trainer-side client.

A file written through `atomic_write` is either the old one or the complete new one, never a part;
`fsync_dir` makes the rename itself survive a power loss; `sha256_file` hashes in chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
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


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through `write(fileobj)` into a temp file beside it, fsync, then rename into place.

    Readers never see a partial file: either the old one, or the complete new one. The temp file is
    named `.<name>.<random>.tmp`, so a writer killed mid-write leaves only such a file behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a write or fsync: name the file it was for
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise
    fsync_dir(target.parent)
    return target


def is_temp_name(name: str) -> bool:
    """True for the names atomic_write and downloads use for files not yet in place."""
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or name.endswith(".download"))
