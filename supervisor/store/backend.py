"""A small object-store interface: what RemoteStore needs from S3 or from a mounted folder.

Keys are relative to the backend's root (a bucket prefix, a folder) and use '/' separators.
Backends retry transient faults themselves; what they raise is final for that call:
  StoreError         permanent (bad credentials, missing bucket, access denied); one clear line
  TransientStoreError still failing after the retries (network down, server restarting)
  PreconditionFailed a conditional write lost (IfNoneMatch / IfMatch did not hold)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor.store.base import StoreError

# Called with the number of bytes moved since the previous call (negative: a failed try takes them back).
Progress = Callable[[int], None]


class TransientStoreError(StoreError):
    """The store could not be reached or answered with a retryable fault; a later try may work."""


class LocalFileChanged(Exception):
    """The local file no longer has the sha256 it was recorded with; it must not be uploaded."""


class PreconditionFailed(Exception):
    """A conditional write did not happen: the object exists (IfNoneMatch) or changed (IfMatch)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend knows about a stored object; sha256 is hex when the backend recorded it."""

    key: str
    size: int
    etag: str
    sha256: str | None = None


class ObjectBackend(ABC):
    """Objects under one root. Implementations never put credentials into messages or logs."""

    @abstractmethod
    def describe(self) -> str:
        """Where the root is, fit for logs."""

    @abstractmethod
    def check(self) -> None:
        """Verify the root is reachable and writable; raise StoreError with one clear line."""

    @abstractmethod
    def put_file(self, key: str, path: Path, sha256: str, progress: Progress | None = None) -> ObjectInfo:
        """Upload `path` as `key`; return only once the stored bytes are confirmed to hash to `sha256`.

        The file is read once: the sha256 is computed from the very bytes sent. The object under `key`
        is either absent, the previous version, or the complete new one. Raises LocalFileChanged when
        the bytes read do not hash to `sha256` (`key` is then left as it was), StoreError if the stored
        object does not match (it is deleted then). `progress` gets the bytes sent; a failed try that
        is tried again first takes back what it reported, with a negative count.
        """

    @abstractmethod
    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> bool:
        """Download `key` into `path` (replaced atomically); False if there is no such object.

        The caller verifies the content; a partial download never appears under `path`.
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Store a small object and return its new etag.

        if_none_match: only if no object `key` exists; if_match: only if its etag is still this.
        Raises PreconditionFailed when the condition does not hold.
        """

    @abstractmethod
    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """(content, etag) of a small object, or None if there is none."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, etag (and sha256 when recorded) of `key`, or None if there is none."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """All objects whose key starts with `prefix`, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing object is not an error."""

    def close(self) -> None:
        """Release connections and threads."""
