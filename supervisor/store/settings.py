"""The `[storage]` table of run.toml: where checkpoints go and how they are moved.

`StorageSettings` is the one model of that table: `RunConfig.storage` is an instance, and the
store factory takes it as is. Built directly (tests, benchmarks) it validates the same way;
a bad value raises pydantic's ValidationError (a ValueError) whose message starts with
`storage.<key>: ` and never shows the input (a url could hold a password).

Credentials are never part of it. They come from the standard chain only (AWS_* environment
variables, the shared credentials file and `profile`, an instance role); secret-looking keys in
run.toml are refused by `supervisor.config.secret_problems`, the one place that knows their names.
Importing this module is cheap: no boto3.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

MiB = 1024 * 1024
DAY = 86400.0

SCHEMES = ("s3", "file")
ADDRESSING_STYLES = ("auto", "path", "virtual")

SECRET_HINT = (
    "credentials never go in run.toml: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
    "environment, or name a profile of ~/.aws/credentials with [storage] profile"
)


class StorageSettings(BaseModel):
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

    # hide_input_in_errors: a url or endpoint may carry user:password@, and messages must not echo it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True)

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

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"storage.url: expected s3://bucket/prefix or file:///absolute/path, got {_safe(v)!r}")
        if parts.username or parts.password or "@" in parts.netloc:
            raise ValueError(f"storage.url: must not hold credentials; {SECRET_HINT}")
        if parts.query or parts.fragment:
            raise ValueError("storage.url: must not have a ?query or #fragment")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError("storage.url: s3:// needs a bucket name, e.g. s3://my-bucket/runs")
        if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path):
            raise ValueError("storage.url: file:// needs an absolute folder, e.g. file:///content/drive/runs")
        # A trailing slash changes nothing but how the url reads in logs; file:/// keeps its root.
        return v.rstrip("/") if parts.scheme == "s3" or parts.path.strip("/") else v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            ep = urlsplit(v)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise ValueError(f"storage.endpoint_url: expected http(s)://host[:port], got {_safe(v)!r}")
            if ep.username or ep.password:
                raise ValueError(f"storage.endpoint_url: must not hold credentials; {SECRET_HINT}")
        return v

    @field_validator("addressing_style")
    @classmethod
    def _style(cls, v: str) -> str:
        if v not in ADDRESSING_STYLES:
            raise ValueError(f"storage.addressing_style: expected one of {', '.join(ADDRESSING_STYLES)}, got {v!r}")
        return v

    @field_validator("lease_ttl_s")
    @classmethod
    def _ttl(cls, v: float) -> float:
        # Renewals go out every ttl/3 as conditional writes to a real server that may take a second
        # to answer: under 1 s a healthy supervisor would lose its own lease. Over a day, a dead
        # machine's lease would keep every other machine off the run for that long.
        if not 1.0 <= v <= DAY:
            raise ValueError("storage.lease_ttl_s: expected 1 to 86400 seconds (it is renewed every ttl/3)")
        return v

    @field_validator("drain_timeout_s")
    @classmethod
    def _drain(cls, v: float) -> float:
        if not 0.0 <= v <= 7 * DAY:
            raise ValueError("storage.drain_timeout_s: expected 0 to 604800 seconds (a week)")
        return v

    @field_validator("multipart_threshold", "multipart_chunksize", mode="before")
    @classmethod
    def _bytes(cls, v: Any, info: ValidationInfo) -> Any:
        # parse_size lives with the rest of run.toml's units; imported here, not at the top, because
        # supervisor.config imports this module.
        from supervisor.config import parse_size

        try:
            size = parse_size(v, "a size")
        except ValueError as exc:
            raise ValueError(f"storage.{info.field_name}: {exc}") from None
        if isinstance(size, float):
            raise ValueError(f"storage.{info.field_name}: expected a size in bytes such as 16MiB, not a percentage")
        return size

    @field_validator("multipart_threshold", "multipart_chunksize")
    @classmethod
    def _parts(cls, v: int, info: ValidationInfo) -> int:
        if v < 5 * MiB:
            raise ValueError(f"storage.{info.field_name}: S3 parts are at least 5 MiB")
        return v

    @field_validator("max_concurrency")
    @classmethod
    def _concurrency(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError("storage.max_concurrency: expected 1 to 64")
        return v

    @field_validator("retry_attempts")
    @classmethod
    def _retries(cls, v: int) -> int:
        if not 1 <= v <= 100:
            raise ValueError("storage.retry_attempts: expected 1 to 100")
        return v

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
        """The url and endpoint, fit for logs (validation keeps credentials out of both)."""
        return f"{self.url} at {self.endpoint_url}" if self.endpoint_url else self.url


def _safe(url: str) -> str:
    """A url without any user:password@ part, for messages."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return url.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1])
    return url
