"""Permanent faults end in one clear line that names the problem and the fix, never the secret."""

from __future__ import annotations

import logging
import time

import pytest

from supervisor.config import secret_problems
from supervisor.store.base import StoreError
from supervisor.store.factory import open_store
from supervisor.store.settings import StorageSettings

from .s3_support import Weed, free_ports, storage_settings


def _open_error(settings: StorageSettings, run: str = "r") -> str:
    store = open_store(settings, run)
    try:
        with pytest.raises(StoreError) as info:
            store.open()
    finally:
        store.close()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def _no_secret(secret: str, message: str, caplog: pytest.LogCaptureFixture) -> None:
    assert secret not in message
    assert secret not in caplog.text


def test_wrong_secret_key(weed: Weed, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "WrongSecret" + "x" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    message = _open_error(storage_settings(weed))
    assert "secret key is wrong" in message and "AWS_SECRET_ACCESS_KEY" in message
    _no_secret(wrong, message, caplog)
    _no_secret(weed.secret_key, message, caplog)


def test_unknown_access_key(weed: Weed, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY1234")
    message = _open_error(storage_settings(weed))
    assert "does not know the access key" in message and "AWS_ACCESS_KEY_ID" in message
    _no_secret(weed.secret_key, message, caplog)


def test_no_credentials(weed: Weed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = _open_error(storage_settings(weed))
    assert "no S3 credentials found" in message and "AWS_ACCESS_KEY_ID" in message


def test_missing_bucket_is_reported_not_created(weed: Weed, caplog: pytest.LogCaptureFixture) -> None:
    # SeaweedFS creates a missing bucket on PutObject; open() must catch it before any write.
    settings = storage_settings(weed, url="s3://no-such-bucket-here/runs")
    message = _open_error(settings)
    assert "bucket 'no-such-bucket-here' does not exist" in message and "[storage] url" in message
    buckets = [b["Name"] for b in weed.client().list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in buckets
    _no_secret(weed.secret_key, message, caplog)


def test_unreachable_endpoint(weed: Weed, caplog: pytest.LogCaptureFixture) -> None:
    port = free_ports(1)[0]
    started = time.monotonic()
    message = _open_error(storage_settings(weed, endpoint_url=f"http://127.0.0.1:{port}"))
    assert f"cannot reach s3://{weed.bucket}/" in message and "endpoint_url" in message
    assert time.monotonic() - started < 20
    _no_secret(weed.secret_key, message, caplog)


def test_secrets_in_run_toml_are_refused() -> None:
    secret = "AbCdEfSecretValue1234"
    (line,) = secret_problems({"storage": {"url": "s3://b/p", "aws_secret_access_key": secret}})
    assert "storage.aws_secret_access_key" in line and "AWS_SECRET_ACCESS_KEY" in line
    assert secret not in line
    with pytest.raises(ValueError) as info:
        StorageSettings(url=f"s3://AKIAEXAMPLE:{secret}@bucket/prefix")
    assert secret not in str(info.value) and "credentials" in str(info.value)
    with pytest.raises(ValueError) as info:
        StorageSettings(url="s3://b/p", endpoint_url=f"http://user:{secret}@host:9000")
    assert secret not in str(info.value)


def test_settings_are_validated() -> None:
    for bad, key in [
        (dict(url="gs://bucket/p"), "storage.url"),
        (dict(url="s3:///nobucket"), "storage.url"),
        (dict(url="file://relative/path"), "storage.url"),
        (dict(url="s3://b/p", addressing_style="sideways"), "storage.addressing_style"),
        (dict(url="s3://b/p", endpoint_url="localhost:9000"), "storage.endpoint_url"),
        (dict(url="s3://b/p", multipart_chunksize=1024), "storage.multipart"),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            StorageSettings(**bad)
    s = StorageSettings(url="s3://bucket/some/prefix/")
    assert (s.bucket, s.prefix) == ("bucket", "some/prefix")


def test_missing_profile(weed: Weed) -> None:
    with pytest.raises(StoreError, match="storage.profile 'nope' names a profile that is not in"):
        open_store(storage_settings(weed, profile="nope"), "r")


def test_missing_env_profile(weed: Weed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "ghost")
    with pytest.raises(StoreError, match="AWS_PROFILE names a profile"):
        open_store(storage_settings(weed), "r")
