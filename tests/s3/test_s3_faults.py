"""Large transfers and faults against a real SeaweedFS: multipart, a server crash mid-upload,
a network partition that costs a supervisor its lease."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from supervisor.client import sha256_file
from supervisor.store.base import LeaseHeld
from supervisor.store.factory import open_store
from supervisor.store.lease import LEASE_KEY, LeaseInfo
from supervisor.store.remote import LEDGER_KEY, manifest_key

from .s3_support import TcpProxy, Weed, make_checkpoint, storage_settings, wait_for

MiB = 1024 * 1024


@pytest.fixture
def stores():
    opened = []
    yield opened
    for store in reversed(opened):
        store.close()


def _assert_every_commit_is_whole(weed: Weed, root: str) -> int:
    """Every manifest under root names an object of exactly its size and sha256."""
    client = weed.client()
    listing = client.list_objects_v2(Bucket=weed.bucket, Prefix=f"{root}/manifest/").get("Contents", [])
    for item in listing:
        manifest = json.loads(client.get_object(Bucket=weed.bucket, Key=item["Key"])["Body"].read())
        body = client.get_object(Bucket=weed.bucket, Key=f"{root}/{manifest['path']}")["Body"].read()
        assert len(body) == manifest["size"]
        assert hashlib.sha256(body).hexdigest() == manifest["sha256"]
    return len(listing)


def test_large_multipart_checkpoint(weed: Weed, tmp_path: Path, stores: list) -> None:
    settings = storage_settings(weed)
    run_dir = tmp_path / "a"
    store = open_store(settings, "big", run_dir)
    stores.append(store)
    store.open()
    record = make_checkpoint(run_dir, 3, size=48 * MiB + 12345)
    store.checkpoint_verified(record, run_dir)
    assert store.drain(120) == []

    root = store.backend.root
    head = weed.client().head_object(Bucket=weed.bucket, Key=f"{root}/{record.path}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-7"), "uploaded in 8 MiB parts, each checksummed by the server"
    assert _assert_every_commit_is_whole(weed, root) == 1

    fresh = tmp_path / "b"
    assert store.ensure_local(record, fresh) is True
    assert sha256_file(fresh / record.path) == record.sha256


def test_server_killed_mid_upload(weed: Weed, tmp_path: Path, stores: list, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = storage_settings(weed, max_concurrency=2, retry_attempts=8)
    run_dir = tmp_path / "a"
    store = open_store(settings, "crash", run_dir)
    stores.append(store)
    store.open()
    root = store.backend.root
    small = make_checkpoint(run_dir, 0)
    store.checkpoint_verified(small, run_dir)
    assert store.drain(30) == []
    record = make_checkpoint(run_dir, 1, size=96 * MiB)
    client = weed.client()
    store.checkpoint_verified(record, run_dir)
    wait_for(
        lambda: client.list_multipart_uploads(Bucket=weed.bucket, Prefix=root).get("Uploads"),
        30,
        "the multipart upload to begin",
        interval=0.01,
    )
    weed.kill()
    wait_for(lambda: any(r.levelno >= logging.WARNING for r in caplog.records), 60, "the uploader to notice")
    pending = store.drain(0)
    assert pending and "epoch 1" in pending[0]
    weed.start()
    assert store.drain(180) == []
    assert store.permanent_error() is None
    assert _assert_every_commit_is_whole(weed, root) == 2
    fresh = tmp_path / "b"
    assert store.ensure_local(record, fresh) is True


def test_partitioned_supervisor_loses_its_lease_and_stops_writing(weed: Weed, tmp_path: Path, stores: list) -> None:
    proxy = TcpProxy(weed.ports["s3"])
    try:
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a = open_store(
            storage_settings(
                weed,
                prefix="fence",
                endpoint_url=f"http://127.0.0.1:{proxy.port}",
                retry_attempts=2,
                lease_ttl_s=3.0,
            ),
            "run",
            a_dir,
        )
        stores.append(a)
        a.open()
        early = make_checkpoint(a_dir, 0)
        a.checkpoint_verified(early, a_dir)
        assert a.drain(30) == []

        proxy.cut()  # machine A drops off the network, its supervisor keeps running

        def b_takes_over():
            b = open_store(storage_settings(weed, prefix="fence", lease_ttl_s=3.0), "run", b_dir)
            try:
                b.open()
            except LeaseHeld:
                b.close()
                return None
            stores.append(b)
            return b

        b = wait_for(b_takes_over, 30, "B to take over the expired lease", interval=0.5)
        assert not a.lease.held(), "A stopped counting itself as holder before B could take over"

        late = make_checkpoint(a_dir, 1)
        a.checkpoint_verified(late, a_dir)
        (a_dir / "ledger.jsonl").write_text('{"from": "A"}\n')
        a.ledger_changed(a_dir / "ledger.jsonl")
        (b_dir / "ledger.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (b_dir / "ledger.jsonl").write_text('{"from": "B"}\n')
        b.ledger_changed(b_dir / "ledger.jsonl")
        assert b.drain(30) == []

        proxy.heal()
        wait_for(a.lost_lease, 60, "A to find it lost its lease")
        pending = a.drain(1)
        assert any("epoch 1" in p and "lease lost" in p for p in pending), pending
        raw = b.backend
        assert raw.get_bytes(manifest_key(1)) is None and raw.head(late.path) is None
        assert raw.get_bytes(LEDGER_KEY)[0] == b'{"from": "B"}\n'
        assert LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).holder == b.lease.holder
        a.close()  # must not release B's lease
        assert LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).holder == b.lease.holder
        assert b.lease.held() and not b.lost_lease()
    finally:
        proxy.cut()


def test_secret_never_reaches_logs_or_objects(
    weed: Weed, tmp_path: Path, stores: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "a"
    store = open_store(storage_settings(weed, prefix="secrets"), "run", run_dir)
    stores.append(store)
    store.open()
    store.checkpoint_verified(make_checkpoint(run_dir, 0), run_dir)
    (run_dir / "ledger.jsonl").write_text("{}\n")
    store.ledger_changed(run_dir / "ledger.jsonl")
    assert store.drain(30) == []
    assert weed.secret_key not in caplog.text
    client = weed.client()
    for item in client.list_objects_v2(Bucket=weed.bucket, Prefix="secrets/").get("Contents", []):
        if item["Size"] < 1 << 20:
            body = client.get_object(Bucket=weed.bucket, Key=item["Key"])["Body"].read()
            assert weed.secret_key.encode() not in body and weed.access_key.encode() not in body
