"""S3-compatible backend (AWS, SeaweedFS, MinIO, R2, B2) on boto3 and its transfer manager.

Credentials come from boto3's standard chain only. An upload reads the file once: every block read
is hashed, in file order, into the whole-file sha256 and into the SHA-256 checksum of the request
(or part) that carries it, which the server verifies. A multipart upload is completed, and a single
PUT sent, only when the whole-file digest of what was sent is the sha256 the caller expects; else it
is aborted and LocalFileChanged raised (the file changed meanwhile). Afterwards the object's stored
checksum is compared with the one computed from those same bytes, so a server that kept other bytes
never counts either. Downloads use boto3's transfer manager. Transient faults are retried with
exponential backoff and full jitter (botocore retries each request a little, tenacity the whole
operation); permanent ones become one StoreError line naming the problem and the fix, never the secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
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


def _check_sent(path: Path, read: int, size: int, actual: str, expected: str) -> None:
    """Raise LocalFileChanged unless the bytes read for upload are the recorded size and sha256."""
    if read != size or actual != expected:
        raise LocalFileChanged(
            f"{path} changed: read {read} bytes with sha256 {actual[:12]}..., "
            f"recorded {size} bytes with sha256 {expected[:12]}..."
        )


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
        # Checkpoint bytes go through a client that does not sign the payload: each of those requests
        # carries the SHA-256 of its body in a signed header the server verifies, so signing the payload
        # as well would hash every byte once more for nothing (botocore itself skips it over https when
        # it adds the checksum). A server that does not confirm the checksum gets signed payloads.
        unsigned = {"addressing_style": settings.addressing_style, "payload_signing_enabled": False}
        self._data_client = session.client(
            "s3", endpoint_url=settings.endpoint_url, config=config.merge(Config(s3=unsigned))
        )
        self._sign_payloads = False
        creds = session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
        self._secrets = [s for s in (frozen.secret_key, frozen.token) if s] if frozen else []
        self._transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=settings.max_concurrency,
            preferred_transfer_client="classic",
        )
        self._tm = TransferManager(self._client, self._transfer_config)  # downloads
        self._closed = False

    # -- errors and retries -------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _classify(self, exc: BaseException, what: str) -> StoreError | PreconditionFailed | LocalFileChanged:
        """Turn a boto/network exception into PreconditionFailed, TransientStoreError or StoreError."""
        where = self._where
        if isinstance(exc, (StoreError, PreconditionFailed, LocalFileChanged)):
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
        """Upload `path` reading it once (see the module docstring): `key` gets only bytes whose sha256
        is `sha256`; a file that changed meanwhile raises LocalFileChanged and leaves `key` as it was."""
        size = path.stat().st_size
        send = self._put_parts if size >= self._transfer_config.multipart_threshold else self._put_whole
        moved = 0  # bytes this try reported to `progress`; a failed try takes them back
        lock = threading.Lock()  # parts report from their own threads

        def report(n: int) -> None:
            nonlocal moved
            with lock:
                moved += n
            if progress:
                progress(n)

        def attempt() -> str:
            try:
                return send(key, path, size, sha256, report)
            except BaseException:
                report(-moved)
                raise

        expected_checksum = self._call(f"upload of {key}", attempt)
        full_key = self._key(key)
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

    def _put_whole(self, key: str, path: Path, size: int, sha256: str, report: Progress) -> str:
        """One PUT of a file below the multipart threshold, read into memory and hashed once; returns
        its SHA-256 checksum (base64). Nothing is sent when the bytes read are not `sha256`."""
        with open(path, "rb") as f:
            data = f.read(size + 1)  # one byte more: a file that grew is caught too
        digest = hashlib.sha256(data)
        _check_sent(path, len(data), size, digest.hexdigest(), sha256)
        checksum = sha256_b64(digest.digest())
        self._put_body("put_object", checksum, Key=self._key(key), Body=data, Metadata={"sha256": sha256})
        report(size)
        return checksum

    def _put_parts(self, key: str, path: Path, size: int, sha256: str, report: Progress) -> str:
        """A multipart upload: this thread reads the parts in order and hashes each into the whole-file
        sha256; up to max_concurrency parts are in flight (that many parts of memory, plus the one being
        read), each hashed on its sending thread into the SHA-256 checksum the server verifies. Completed
        only if the whole digest is `sha256`; on any failure aborted. Returns the composite checksum
        base64(sha256(part digests))-<parts> that S3 reports for the object."""
        full_key = self._key(key)
        part_size = ChunksizeAdjuster().adjust_chunksize(self._transfer_config.multipart_chunksize, size)
        created = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=full_key, ChecksumAlgorithm="SHA256", Metadata={"sha256": sha256}
        )
        upload_id = created["UploadId"]
        concurrency = self.settings.max_concurrency
        slots = threading.Semaphore(concurrency)
        failed = threading.Event()

        def send(number: int, block: bytes) -> dict[str, Any]:
            try:
                checksum = sha256_b64(hashlib.sha256(block).digest())
                response = self._put_body(
                    "upload_part", checksum, Key=full_key, UploadId=upload_id, PartNumber=number, Body=block
                )
                report(len(block))
                return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}
            except BaseException:
                failed.set()
                raise
            finally:
                slots.release()

        whole = hashlib.sha256()
        read = 0
        sending: list[Future[dict[str, Any]]] = []
        try:
            with open(path, "rb") as f, ThreadPoolExecutor(concurrency, thread_name_prefix="s3-part") as pool:
                while read < size and not failed.is_set() and not self._closed:
                    block = f.read(min(part_size, size - read))
                    if not block:
                        break
                    whole.update(block)
                    read += len(block)
                    slots.acquire()
                    sending.append(pool.submit(send, len(sending) + 1, block))
                read += len(f.read(1))  # a file that grew is caught too
            parts = [future.result() for future in sending]  # the first failure, if any, is raised here
            if self._closed:
                raise StoreError(f"{self._where}: upload of {key} abandoned: the store was closed")
            _check_sent(path, read, size, whole.hexdigest(), sha256)
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            wait(sending)
            with contextlib.suppress(Exception):  # best effort: a lifecycle rule reaps what is left
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            raise
        digests = b"".join(base64.b64decode(part["ChecksumSHA256"]) for part in parts)
        return f"{sha256_b64(hashlib.sha256(digests).digest())}-{len(parts)}"

    def _put_body(self, operation: str, checksum: str, **kwargs: Any) -> dict[str, Any]:
        """put_object or upload_part of checkpoint bytes with their SHA-256 `checksum`, the payload not
        signed. A server must confirm the checksum (S3 returns it: it checked it); one that does not is
        sent this body again, and every later one, with a signed payload, which it checks instead."""
        if not self._sign_payloads:
            response = getattr(self._data_client, operation)(Bucket=self.bucket, ChecksumSHA256=checksum, **kwargs)
            confirmed = response.get("ChecksumSHA256")
            if confirmed == checksum:
                return response
            if confirmed is not None:
                raise TransientStoreError(f"{self._where}: the server took a body with another SHA-256 than sent")
            log.info("%s does not confirm SHA-256 checksums: checkpoint payloads are signed instead", self._where)
            self._sign_payloads = True
        return getattr(self._client, operation)(Bucket=self.bucket, ChecksumSHA256=checksum, **kwargs)

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
        self._closed = True  # an upload still running stops before its next part and is aborted
        self._tm.shutdown(cancel=True)
