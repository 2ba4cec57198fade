"""The `[storage]` table of run.toml as a value: where checkpoints go and how they are moved.

Credentials are never part of it. They come from the standard chain only (AWS_* environment
variables, the shared credentials file and `profile`, an instance role); `refuse_secrets` turns a
secret placed in run.toml into one line that says where it belongs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MiB = 1024 * 1024

SCHEMES = ("s3", "file")
ADDRESSING_STYLES = ("auto", "path", "virtual")

# Keys that would put a secret into run.toml; matched case-insensitively.
SECRET_KEYS = frozenset(
    {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "access_key_id",
        "secret_key",
        "secret_access_key",
        "secret",
        "session_token",
        "password",
        "token",
        "credentials",
    }
)

SECRET_HINT = (
    "credentials never go in run.toml: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
    "environment, or name a profile of ~/.aws/credentials with [storage] profile"
)


@dataclass(frozen=True)
class StorageSettings:
    """Where a run's checkpoints and ledger are kept beyond the local run dir.

    url:              s3://bucket[/prefix] or file:///absolute/folder; the run lives under
                      <prefix>/<run name>/.
    endpoint_url:     S3-compatible endpoint (SeaweedFS, MinIO, R2, B2); None for AWS itself.
    region:           signing region; None lets the standard chain decide (then us-east-1).
    addressing_style: "auto", "path" (most self-hosted servers) or "virtual".
    profile:          a profile of the shared credentials/config files; None: default chain.
    lease_ttl_s:      a lease not renewed for this long may be taken over; renewed every ttl/3.
    drain_timeout_s:  how long a pause or completion waits for pending uploads.
    multipart_threshold / multipart_chunksize: files at least this large go up in parts of this size.
    max_concurrency:  parallel parts per transfer.
    retry_attempts:   attempts per operation for transient faults (backoff with jitter between).
    """

    url: str
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    profile: str | None = None
    lease_ttl_s: float = 60.0
    drain_timeout_s: float = 300.0
    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8
    retry_attempts: int = 6

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"storage.url: expected s3://bucket/prefix or file:///folder, got {_safe(self.url)!r}")
        if parts.username or parts.password or "@" in parts.netloc:
            raise ValueError(f"storage.url: must not hold credentials; {SECRET_HINT}")
        if parts.query or parts.fragment:
            raise ValueError("storage.url: must not have a ?query or #fragment")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError("storage.url: s3:// needs a bucket name, e.g. s3://my-bucket/runs")
        if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path):
            raise ValueError("storage.url: file:// needs an absolute folder, e.g. file:///content/drive/runs")
        if self.endpoint_url is not None:
            ep = urlsplit(self.endpoint_url)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise ValueError(
                    f"storage.endpoint_url: expected http(s)://host[:port], got {_safe(self.endpoint_url)!r}"
                )
            if ep.username or ep.password:
                raise ValueError(f"storage.endpoint_url: must not hold credentials; {SECRET_HINT}")
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f"storage.addressing_style: expected one of {', '.join(ADDRESSING_STYLES)}, "
                f"got {self.addressing_style!r}"
            )
        if self.lease_ttl_s <= 0:
            raise ValueError("storage.lease_ttl_s: expected a positive number of seconds")
        if self.drain_timeout_s < 0:
            raise ValueError("storage.drain_timeout_s: expected 0 or more seconds")
        if self.multipart_chunksize < 5 * MiB or self.multipart_threshold < 5 * MiB:
            raise ValueError("storage.multipart_threshold/chunksize: S3 parts are at least 5 MiB")
        if not 1 <= self.max_concurrency <= 64:
            raise ValueError("storage.max_concurrency: expected 1 to 64")
        if not 1 <= self.retry_attempts <= 100:
            raise ValueError("storage.retry_attempts: expected 1 to 100")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def bucket(self) -> str:
        """The bucket of an s3:// url (empty for file://)."""
        return urlsplit(self.url).netloc if self.scheme == "s3" else ""

    @property
    def prefix(self) -> str:
        """The key prefix (s3) or absolute folder (file), without trailing slash."""
        path = urlsplit(self.url).path
        return path.strip("/") if self.scheme == "s3" else (path.rstrip("/") or "/")

    def describe(self) -> str:
        """The url and endpoint, fit for logs."""
        return f"{self.url} at {self.endpoint_url}" if self.endpoint_url else self.url


def refuse_secrets(table: Mapping[str, Any], where: str = "storage") -> None:
    """Raise ValueError (one line, naming the key, never its value) if `table` holds a secret."""
    for key in table:
        if str(key).lower() in SECRET_KEYS:
            raise ValueError(f"{where}.{key}: {SECRET_HINT}")


def _safe(url: str) -> str:
    """A url without any user:password@ part, for messages."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return url.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1])
    return url
