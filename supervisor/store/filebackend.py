"""file:// backend: objects are files under a folder, e.g. a mounted Google Drive or an NFS share.

Every object appears atomically (written to a hidden temp file beside it, fsynced, renamed).
Conditional writes hold a lock file per key; creation additionally uses a hard link, which fails
atomically when the target exists, where the filesystem supports links. How far these guarantees
reach across machines depends on the mount: a local disk or NFS honours them; a sync client such
as Google Drive only approximates them, so the lease there is a best effort.
Etags of small objects are the sha256 of their content; of large ones, mtime and size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from supervisor.durable import fsync_dir
from supervisor.store.backend import (
    LocalFileChanged,
    ObjectBackend,
    ObjectInfo,
    PreconditionFailed,
    Progress,
    TransientStoreError,
)
from supervisor.store.base import StoreError
from supervisor.store.progress import retry_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

SMALL = 1 << 20
_LOCKS = ".locks"


def _etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest() + '"'


class FileBackend(ObjectBackend):
    """Objects under `root` (created on check)."""

    def __init__(self, root: Path, retry_attempts: int = 4) -> None:
        self.root = Path(root)
        self.retry_attempts = retry_attempts

    # -- helpers ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except (StoreError, PreconditionFailed, LocalFileChanged, ValueError):
                raise
            except PermissionError:
                raise StoreError(
                    f"{self.root}: permission denied during {what}: make the folder writable or fix [storage] url"
                ) from None
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise StoreError(
                        f"{self.root}: {exc.strerror} during {what}: free space or fix [storage] url"
                    ) from None
                raise TransientStoreError(f"{self.root}: {what} failed: {exc.strerror or exc}") from None

        return retry_transient(once, self.retry_attempts, 0.2, 5)

    @contextlib.contextmanager
    def _tempfile(self, dest: Path) -> Iterator[tuple[int, Path]]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            yield fd, Path(tmp)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        locks = self.root / _LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(key.encode()).hexdigest()[:20] + ".lock"
        try:
            with FileLock(str(locks / name), timeout=30):
                yield
        except Timeout:
            raise TransientStoreError(f"{self.root}: lock for {key} is busy") from None

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)

    # -- the interface ------------------------------------------------------------------------

    def describe(self) -> str:
        return f"file://{self.root}"

    def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=self.root)
            os.close(fd)
            os.unlink(tmp)

        self._call("check", probe)

    def put_file(self, key: str, path: Path, sha256: str, progress: Progress | None = None) -> ObjectInfo:
        dest = self._path(key)

        def copy() -> ObjectInfo:
            # One pass: each block is hashed as it is copied; the copy takes the key's place only if the
            # digest of what was copied is `sha256`.
            h = hashlib.sha256()
            size = 0
            try:
                with self._tempfile(dest) as (fd, tmp), open(path, "rb") as src:
                    while block := src.read(8 << 20):
                        h.update(block)
                        view = memoryview(block)
                        while view:
                            view = view[os.write(fd, view) :]
                        size += len(block)
                        if progress:
                            progress(len(block))
                    os.fsync(fd)
                    if h.hexdigest() != sha256:
                        raise LocalFileChanged(
                            f"{path} changed: read {size} bytes with sha256 {h.hexdigest()[:12]}..., "
                            f"recorded sha256 {sha256[:12]}..."
                        )
                    os.replace(tmp, dest)
            except BaseException:
                if progress and size:
                    progress(-size)  # a failed try moved nothing that counts
                raise
            fsync_dir(dest.parent)
            st = dest.stat()
            return ObjectInfo(key, size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"', sha256)

        return self._call(f"upload of {key}", copy)

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> bool:
        source = self._path(key)

        def copy() -> bool:
            if not source.is_file():
                return False
            with open(source, "rb") as src, self._tempfile(path) as (fd, tmp):
                while block := src.read(8 << 20):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view) :]
                    if progress:
                        progress(len(block))
                os.fsync(fd)
                os.replace(tmp, path)
            return True

        return self._call(f"download of {key}", copy)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        dest = self._path(key)

        def write() -> str:
            with self._lock(key), self._tempfile(dest) as (fd, tmp):
                self._write_all(fd, data)
                if if_none_match:
                    try:
                        os.link(tmp, dest)  # atomic create-if-absent, even without working locks
                    except FileExistsError:
                        raise PreconditionFailed(key) from None
                    except OSError:  # no hard links on this filesystem: the lock must do
                        if dest.exists():
                            raise PreconditionFailed(key) from None
                        os.replace(tmp, dest)
                else:
                    if if_match is not None:
                        try:
                            current = dest.read_bytes()
                        except FileNotFoundError:
                            raise PreconditionFailed(key) from None
                        if _etag(current) != if_match:
                            raise PreconditionFailed(key)
                    os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return _etag(data)

        return self._call(f"write of {key}", write)

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        source = self._path(key)

        def read() -> tuple[bytes, str] | None:
            try:
                data = source.read_bytes()
            except FileNotFoundError:
                return None
            return data, _etag(data)

        return self._call(f"read of {key}", read)

    def head(self, key: str) -> ObjectInfo | None:
        source = self._path(key)

        def stat() -> ObjectInfo | None:
            try:
                st = source.stat()
                if st.st_size <= SMALL:
                    return ObjectInfo(key, st.st_size, _etag(source.read_bytes()))
            except FileNotFoundError:
                return None
            return ObjectInfo(key, st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"')

        return self._call(f"lookup of {key}", stat)

    def list(self, prefix: str) -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            if not self.root.exists():
                return out  # nothing stored yet
            if not self.root.is_dir():  # e.g. a mount point gone bad: an outage, not an empty store
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(self.root))
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(self.root)
                for name in filenames:
                    if name.startswith("."):
                        continue
                    key = (rel / name).as_posix() if rel.parts else name
                    if key.startswith(prefix):
                        with contextlib.suppress(FileNotFoundError):
                            st = os.stat(os.path.join(dirpath, name))
                            out.append(ObjectInfo(key, st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"'))
            return sorted(out, key=lambda o: o.key)

        return self._call(f"listing of {prefix or '/'}", walk)

    def delete(self, key: str) -> None:
        self._call(f"delete of {key}", lambda: self._path(key).unlink(missing_ok=True))
