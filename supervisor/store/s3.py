"""S3-compatible backend (AWS, SeaweedFS, MinIO, R2, B2) on boto3 and its transfer manager.

Credentials come from boto3's standard chain only. Uploads carry SHA-256 checksums the server
verifies per request (per part for multipart uploads); afterwards the object's stored checksum is
compared with one computed from the local file, so a file that changed mid-upload or a server that
kept other bytes never counts as uploaded. Transient faults are retried with exponential backoff
and full jitter (botocore retries each request a little, tenacity the whole operation); permanent
ones become one StoreError line naming the problem and the fix, never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bx
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster

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
from supervisor.store.settings import SECRET_HINT, StorageSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "ConditionalRequestConflict",
        "OperationAborted",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "BadDigest",
    }
)
_NETWORK_ERRORS = (
    bx.EndpointConnectionError,
    bx.ConnectionClosedError,
    bx.ConnectTimeoutError,
    bx.ReadTimeoutError,
    bx.ResponseStreamingError,
    bx.IncompleteReadError,
    bx.HTTPClientError,
    ConnectionError,
    TimeoutError,
)


class _ProgressSubscriber(BaseSubscriber):
    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._progress(bytes_transferred)


def sha256_b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def file_checksums(path: Path, part_size: int | None) -> tuple[str, str]:
    """(hex sha256 of the file, the S3 SHA-256 checksum of an upload in parts of `part_size`).

    With part_size None the S3 checksum is the plain base64 digest; otherwise it is the composite
    form S3 reports for multipart objects: base64(sha256(concatenated part digests))-<parts>.
    """
    whole = hashlib.sha256()
    parts: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            block = f.read(part_size or (8 << 20))
            if not block and (parts or part_size is None):
                break
            whole.update(block)
            if part_size is not None:
                parts.append(hashlib.sha256(block).digest())
            if not block:
                break
    if part_size is None:
        return whole.hexdigest(), sha256_b64(whole.digest())
    composite = hashlib.sha256(b"".join(parts)).digest()
    return whole.hexdigest(), f"{sha256_b64(composite)}-{len(parts)}"


class S3Backend(ObjectBackend):
    """Objects under s3://bucket/root/. One instance is shared by the store's threads."""

    def __init__(self, settings: StorageSettings, root: str) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.root = root.strip("/")
        self._where = f"s3://{self.bucket}/{self.root}" + (
            f" at {settings.endpoint_url}" if settings.endpoint_url else ""
        )
        try:
            session = boto3.session.Session(profile_name=settings.profile)
        except bx.ProfileNotFound:
            where = f"storage.profile {settings.profile!r}" if settings.profile else "AWS_PROFILE"
            raise StoreError(
                f"{where} names a profile that is not in ~/.aws/credentials or ~/.aws/config: "
                "add it there, or name another"
            ) from None
        region = settings.region or session.region_name or "us-east-1"
        config = Config(
            region_name=region,
            s3={"addressing_style": settings.addressing_style},
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=settings.max_concurrency + 4,
        )
        self._client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
        creds = session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
        self._secrets = [s for s in (frozen.secret_key, frozen.token) if s] if frozen else []
        self._transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=settings.max_concurrency,
            preferred_transfer_client="classic",
        )
        self._tm = TransferManager(self._client, self._transfer_config)

    # -- errors and retries -------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _classify(self, exc: BaseException, what: str) -> StoreError | PreconditionFailed | LocalFileChanged:
        """Turn a boto/network exception into PreconditionFailed, TransientStoreError or StoreError."""
        where = self._where
        if isinstance(exc, (StoreError, PreconditionFailed)):
            return exc
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreError(f"no S3 credentials found for {where}: {SECRET_HINT}")
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("PreconditionFailed", "412") or status == 412:
                return PreconditionFailed(what)
            if code == "InvalidAccessKeyId":
                return StoreError(
                    f"{where} does not know the access key: check AWS_ACCESS_KEY_ID or the profile's aws_access_key_id"
                )
            if code == "SignatureDoesNotMatch":
                return StoreError(
                    f"{where} rejected the request signature: the secret key is wrong for that access key; "
                    "check AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key"
                )
            if code in ("ExpiredToken", "TokenRefreshRequired", "InvalidToken"):
                return StoreError(f"the session token for {where} expired or is invalid: refresh the credentials")
            if code == "NoSuchBucket" or (status == 404 and what == "check"):
                return StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.settings.endpoint_url or 'AWS S3'}: "
                    "create it, or fix [storage] url"
                )
            if code in ("AccessDenied", "AllAccessDisabled", "403", "Forbidden") or status == 403:
                return StoreError(
                    f"access denied to {where} ({what}): give these credentials read/write access to the "
                    "bucket and prefix, or use others"
                )
            if code == "InvalidBucketName":
                return StoreError(f"{self.bucket!r} is not a valid bucket name: fix [storage] url")
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientStoreError(f"{where}: {what} failed with {code or status}")
            message = self._redact(str(err.get("Message", "")))
            return StoreError(f"{where}: {what} failed: {code or status} {message}".rstrip())
        if isinstance(exc, FileNotFoundError) and exc.filename is not None:
            # The local file went away (retention removed it while its upload was queued): nothing to
            # retry, and not the store's fault.
            return LocalFileChanged(f"{exc.filename} is gone")
        if isinstance(exc, bx.SSLError):
            return StoreError(f"TLS to {where} failed: check [storage] endpoint_url (http vs https, certificate)")
        if isinstance(exc, (*_NETWORK_ERRORS, OSError)):
            return TransientStoreError(
                f"cannot reach {where} ({type(exc).__name__}): check [storage] endpoint_url, the network, "
                "and that the server is running"
            )
        return StoreError(f"{where}: {what} failed: {type(exc).__name__}: {self._redact(str(exc))}")

    def _call(self, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        """Run fn, retrying transient faults with exponential backoff and jitter."""

        def once() -> T:
            try:
                return fn()
            except Exception as exc:
                raise self._classify(exc, what) from None

        return retry_transient(once, attempts or self.settings.retry_attempts, 0.5, 15)

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    # -- the interface ------------------------------------------------------------------------

    def describe(self) -> str:
        return self._where

    def check(self) -> None:
        self._call(
            "check",
            lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1),
            attempts=2,
        )

    def put_file(self, key: str, path: Path, sha256: str, progress: Progress | None = None) -> ObjectInfo:
        size = path.stat().st_size
        multipart = size >= self._transfer_config.multipart_threshold
        part = ChunksizeAdjuster().adjust_chunksize(self._transfer_config.multipart_chunksize, size)
        full_key = self._key(key)
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha256}}
        subscribers = [_ProgressSubscriber(progress)] if progress else None

        def upload() -> None:
            future = self._tm.upload(str(path), self.bucket, full_key, extra_args=extra, subscribers=subscribers)
            future.result()

        # Hash the local file while it uploads (the upload is bound by the network or the server);
        # nothing counts as uploaded until both the local digest and the stored checksum agree.
        with ThreadPoolExecutor(1, thread_name_prefix="s3-hash") as pool:
            hashing = pool.submit(file_checksums, path, part if multipart else None)
            try:
                self._call(f"upload of {key}", upload)
            finally:
                actual, expected_checksum = hashing.result()
        if actual != sha256:
            self.delete(key)
            raise LocalFileChanged(f"{path} has sha256 {actual[:12]}..., expected {sha256[:12]}...")
        head = self._call(
            f"check of {key}",
            lambda: self._client.head_object(Bucket=self.bucket, Key=full_key, ChecksumMode="ENABLED"),
        )
        stored = head.get("ChecksumSHA256")
        comparable = stored is not None and ("-" in stored) == ("-" in expected_checksum)
        if head["ContentLength"] != size or (comparable and stored != expected_checksum):
            self.delete(key)
            raise TransientStoreError(
                f"{self._where}/{key}: the stored object does not match the local file "
                f"(size {head['ContentLength']} vs {size}); deleted, to be uploaded again"
            )
        if not comparable:
            log.debug("%s reported no comparable SHA-256 for %s; relying on per-request checks", self._where, key)
        return ObjectInfo(key=key, size=size, etag=head["ETag"], sha256=sha256)

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> bool:
        if self.head(key) is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        subscribers = [_ProgressSubscriber(progress)] if progress else None

        def download() -> None:
            self._tm.download(self.bucket, self._key(key), str(path), subscribers=subscribers).result()

        try:
            self._call(f"download of {key}", download)
        except StoreError:
            if self.head(key) is None:  # deleted while downloading
                return False
            raise
        return True

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        kwargs["ChecksumSHA256"] = sha256_b64(hashlib.sha256(data).digest())
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        response = self._call(f"write of {key}", lambda: self._client.put_object(**kwargs))
        return str(response["ETag"])

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        def get() -> tuple[bytes, str] | None:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), str(response["ETag"])

        return self._call(f"read of {key}", get)

    def head(self, key: str) -> ObjectInfo | None:
        def head() -> ObjectInfo | None:
            try:
                r = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            return ObjectInfo(key, int(r["ContentLength"]), str(r["ETag"]), r.get("Metadata", {}).get("sha256"))

        return self._call(f"lookup of {key}", head)

    def list(self, prefix: str) -> list[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            out = []
            strip = len(self._key(""))
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"]), str(obj["ETag"])))
            return sorted(out, key=lambda o: o.key)

        return self._call(f"listing of {prefix or '/'}", listing)

    def delete(self, key: str) -> None:
        self._call(f"delete of {key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def close(self) -> None:
        self._tm.shutdown(cancel=True)
