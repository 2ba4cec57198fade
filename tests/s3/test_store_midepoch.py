"""Mid-epoch checkpoints in the store, the single-pass upload hash and the two upload gauges, against a
real SeaweedFS and a plain folder. The bucket is always checked from a second client; the file that
changes mid-upload is rewritten for real, from the upload's own progress callback, while the upload
is reading it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from supervisor.store.local import LocalStore
from supervisor.store.remote import MANIFEST_DIR, RemoteStore, manifest_key

from .s3_support import Remote, Weed, make_checkpoint, storage_settings

MiB = 1024 * 1024


def _manifests(remote: Remote, run: str) -> dict[str, dict]:
    """The manifests in the store, read by a second client: key -> body."""
    raw = remote.backend(run)
    return {info.key: json.loads(raw.get_bytes(info.key)[0]) for info in raw.list(MANIFEST_DIR + "/")}


def _log_lines(caplog: pytest.LogCaptureFixture, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if all(w in r.getMessage() for w in words)]


class _ProgressHook:
    """The real backend; `hook(path)` runs once, inside put_file, at the upload's first progress report,
    on the thread that reports it (S3: the first part is sent, and until the hook returns the reader
    has read at most max_concurrency + 1 parts; file://: the first 8 MiB are copied). Everything else
    goes straight to the real backend."""

    def __init__(self, real, hook) -> None:
        self._real = real
        self._hook = hook
        self._lock = threading.Lock()
        self.fired = 0

    def put_file(self, key, path, sha256, progress=None):
        def report(n: int) -> None:
            if progress:
                progress(n)
            with self._lock:  # parts report from several threads: the first one runs the hook
                if self.fired or n <= 0:
                    return
                self.fired += 1
                self._hook(path)

        return self._real.put_file(key, path, sha256, report)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def _hooked_store(remote: Remote, run: str, run_dir: Path, hook) -> tuple[RemoteStore, _ProgressHook]:
    backend = _ProgressHook(remote.backend(run), hook)
    store = RemoteStore(backend, run, lease_ttl_s=30.0, run_dir=run_dir)
    remote.stores.append(store)
    return store, backend


# -- 1. mid-epoch records: commit, list, download, removal by position ---------------------------


def test_midepoch_checkpoints_commit_list_download_and_go_by_position(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "machine-a"
    store = remote.store("mid", run_dir)
    store.open()
    end2 = make_checkpoint(run_dir, 2)
    step40 = make_checkpoint(run_dir, 3, step=40)
    for record in (end2, step40):
        store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []

    manifests = _manifests(remote, "mid")
    assert set(manifests) == {manifest_key(2), manifest_key(3, 40)}
    assert manifest_key(2) == "manifest/epoch-0002.json"  # epoch ends keep their key, and their body
    assert manifest_key(3, 40) == "manifest/epoch-0003-step-00000040.json"
    assert "step" not in manifests[manifest_key(2)]
    body = manifests[manifest_key(3, 40)]
    assert (body["epoch"], body["step"], body["path"], body["sha256"]) == (3, 40, step40.path, step40.sha256)
    assert step40.path == "checkpoints/epoch-0003-step-00000040.pt"
    assert store.remote_checkpoints() == [end2, step40]

    # The newest checkpoint is a mid-epoch one: its removal waits for a later position.
    store.remove_checkpoint(step40, run_dir)
    pending = store.drain(5)
    assert len(pending) == 1 and "epoch 3 step 40" in pending[0] and "newer committed" in pending[0], pending
    raw = remote.backend("mid")
    assert raw.get_bytes(manifest_key(3, 40)) is not None and raw.head(step40.path) is not None

    step80 = make_checkpoint(run_dir, 3, step=80)  # a later step of the same epoch lets it go
    store.checkpoint_verified(step80, run_dir)
    assert store.drain(60) == []
    assert raw.get_bytes(manifest_key(3, 40)) is None and raw.head(step40.path) is None
    assert store.remote_checkpoints() == [end2, step80]

    # Another machine downloads the mid-epoch checkpoint into an empty run dir (no lease needed to read).
    fresh = tmp_path / "machine-b"
    reader = remote.store("mid", fresh)
    assert reader.ensure_local(step80, fresh) is True
    assert (fresh / step80.path).read_bytes() == (run_dir / step80.path).read_bytes()
    assert reader.ensure_local(step40, tmp_path / "machine-c") is False  # removed: not committed any more

    # An epoch's end before the newest position goes; the newest (3, 80) waits for epoch 3's end.
    store.remove_checkpoint(end2, run_dir)
    store.remove_checkpoint(step80, run_dir)
    pending = store.drain(5)
    assert len(pending) == 1 and "epoch 3 step 80" in pending[0], pending
    assert store.remote_checkpoints() == [step80]
    end3 = make_checkpoint(run_dir, 3)
    store.checkpoint_verified(end3, run_dir)
    assert store.drain(60) == []
    assert set(_manifests(remote, "mid")) == {manifest_key(3)}
    assert raw.head(step80.path) is None and raw.head(end2.path) is None and raw.head(end3.path) is not None
    store.close()

    # Preempted: the run goes on elsewhere from what the bucket holds.
    other = tmp_path / "machine-d"
    b = remote.store("mid", other)
    b.open()
    assert b.remote_checkpoints() == [end3]
    assert b.ensure_local(end3, other) is True


def test_a_mid_epoch_checkpoint_is_not_newer_than_its_epochs_end(remote: Remote, tmp_path: Path) -> None:
    """Positions order by (epoch, step), an epoch's end after all its steps: with epoch 4's end and
    epoch 5 step 10 committed, epoch 5 step 10 is the newest, whatever the upload order."""
    run_dir = tmp_path / "rd"
    store = remote.store("order", run_dir)
    store.open()
    step10 = make_checkpoint(run_dir, 5, step=10)
    end4 = make_checkpoint(run_dir, 4)
    store.checkpoint_verified(step10, run_dir)
    store.checkpoint_verified(end4, run_dir)
    assert store.drain(60) == []
    assert store.remote_checkpoints() == [end4, step10]
    store.remove_checkpoint(step10, run_dir)  # the newest: never taken away
    store.remove_checkpoint(end4, run_dir)
    pending = store.drain(5)
    assert len(pending) == 1 and "epoch 5 step 10" in pending[0], pending
    assert store.remote_checkpoints() == [step10]


def test_resume_removals_tell_the_checkpoints_of_one_epoch_apart(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    a = remote.store("resumed-mid", run_dir)
    a.open()
    step40, step80, end3 = (make_checkpoint(run_dir, 3, step=s) for s in (40, 80, None))
    for record in (step40, step80, end3):
        a.checkpoint_verified(record, run_dir)
    assert a.drain(60) == []
    a.close()

    b = remote.store("resumed-mid", run_dir)
    b.open()
    # (epoch, sha256) as the ledger has them: step 40's matches; another sha256 of epoch 3 matches nothing
    b.resume_removals([(3, step40.sha256), (3, "0" * 64)], run_dir)
    assert b.drain(60) == []
    assert b.remote_checkpoints() == [step80, end3]
    assert remote.backend("resumed-mid").head(step40.path) is None

    b.resume_removals([(3, end3.sha256)], run_dir)  # the newest: waits for something later
    pending = b.drain(5)
    assert len(pending) == 1 and "epoch 3 (" in pending[0] and "newer committed" in pending[0], pending
    assert b.remote_checkpoints() == [step80, end3]


def test_reupload_of_a_mid_epoch_position_replaces_its_commit(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    store = remote.store("again-mid", run_dir)
    store.open()
    first = make_checkpoint(run_dir, 6, step=500)
    store.checkpoint_verified(first, run_dir)
    assert store.drain(60) == []
    second = make_checkpoint(run_dir, 6, step=500)  # the same steps ran again (rollback), other bytes
    store.checkpoint_verified(second, run_dir)
    assert store.drain(60) == []
    assert store.remote_checkpoints() == [second]
    assert _manifests(remote, "again-mid")[manifest_key(6, 500)]["sha256"] == second.sha256
    assert store.ensure_local(first, tmp_path / "x") is False
    assert store.ensure_local(second, tmp_path / "y") is True


def test_a_manifest_whose_key_and_body_disagree_commits_nothing(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    store = remote.store("mismatch", run_dir)
    store.open()
    record = make_checkpoint(run_dir, 1, step=5)
    store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []
    raw = remote.backend("mismatch")
    body = json.loads(raw.get_bytes(manifest_key(1, 5))[0])
    body["step"] = 6
    raw.put_bytes(manifest_key(1, 5), json.dumps(body).encode())  # tampered: the key says step 5
    assert store.remote_checkpoints() == []
    assert store.ensure_local(record, tmp_path / "fresh") is False


# -- 2. a file that changes during its upload is never committed ---------------------------------


def test_a_file_changed_during_its_upload_is_not_committed(
    remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "rd"
    size = 64 * MiB  # S3: 8 parts of 8 MiB, 4 in flight: the reader is at most 5 parts in when it fires

    def rewrite_the_tail(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(size - MiB)
            f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())

    store, hooked = _hooked_store(remote, "changed", run_dir, rewrite_the_tail)
    store.open()
    record = make_checkpoint(run_dir, 7, size=size, step=120)
    store.checkpoint_verified(record, run_dir)
    assert store.drain(120) == [], "a changed file is dropped, not retried"
    assert hooked.fired == 1
    assert hashlib.sha256((run_dir / record.path).read_bytes()).hexdigest() != record.sha256
    assert _log_lines(caplog, "not uploading checkpoint epoch 7 step 120", "changed"), "the reason is logged"

    raw = remote.backend("changed")
    assert raw.get_bytes(manifest_key(7, 120)) is None
    assert raw.head(record.path) is None, "the object never took the key"
    assert store.remote_checkpoints() == []
    if remote.kind == "s3":
        client = remote.weed.client()
        left = client.list_multipart_uploads(Bucket=remote.weed.bucket, Prefix=f"{raw.root}/").get("Uploads", [])
        assert left == [], "the multipart upload was aborted"
    assert store.backlog_bytes() == 0 and store.upload_rate() is None


# -- 3. the gauges the watchdog plans with -------------------------------------------------------


def test_upload_rate_and_backlog_bytes(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    seen: list[int] = []
    store, hooked = _hooked_store(remote, "gauges", run_dir, lambda path: seen.append(store.backlog_bytes()))
    assert store.upload_rate() is None and store.backlog_bytes() == 0
    big = make_checkpoint(run_dir, 0, size=24 * MiB)  # S3: 3 parts of 8 MiB
    small = make_checkpoint(run_dir, 0, size=MiB, step=10)
    store.checkpoint_verified(big, run_dir)
    store.checkpoint_verified(small, run_dir)
    assert store.backlog_bytes() == big.size + small.size  # queued: the uploader has not started
    store.open()
    assert store.drain(120) == []
    assert hooked.fired == 1 and len(seen) == 1
    assert small.size < seen[0] < big.size + small.size, f"mid-upload backlog {seen[0]}: the part sent is off"
    assert store.backlog_bytes() == 0
    rate = store.upload_rate()
    assert isinstance(rate, float) and rate > 0

    store.resume_uploads([big, small], run_dir)  # committed already: nothing sent, no sample
    assert store.drain(60) == []
    assert store.backlog_bytes() == 0 and store.upload_rate() == rate


def test_the_local_store_uploads_nothing() -> None:
    local = LocalStore()
    assert local.upload_rate() is None and local.backlog_bytes() == 0


# -- 4. S3: payloads unsigned only while the server confirms each body's SHA-256 ----------------


def test_payloads_are_signed_when_the_server_does_not_confirm_checksums(weed: Weed, tmp_path: Path) -> None:
    from supervisor.store.s3 import S3Backend

    backend = S3Backend(storage_settings(weed), "unconfirmed")
    sent: list[tuple[str, str]] = []

    def header(request, name: str) -> str:
        value = request.headers.get(name)
        return value.decode() if isinstance(value, bytes) else str(value)

    def note(request, **kwargs) -> None:
        sent.append((header(request, "X-Amz-Content-SHA256"), header(request, "x-amz-checksum-sha256")))

    def forget_the_checksum(response_dict, **kwargs) -> None:
        response_dict["headers"].pop("x-amz-checksum-sha256", None)

    try:
        for client in (backend._client, backend._data_client):
            client.meta.events.register("before-send.s3.UploadPart", note)
        first = make_checkpoint(tmp_path, 0, size=20 * MiB)
        backend.put_file(first.path, tmp_path / first.path, first.sha256)
        assert sent and all(payload == "UNSIGNED-PAYLOAD" and checksum != "None" for payload, checksum in sent)

        sent.clear()
        backend._data_client.meta.events.register("before-parse.s3.UploadPart", forget_the_checksum)
        second = make_checkpoint(tmp_path, 1, size=20 * MiB)
        info = backend.put_file(second.path, tmp_path / second.path, second.sha256)
        signed = [payload for payload, _ in sent if payload != "UNSIGNED-PAYLOAD"]
        assert len(signed) == 3, sent  # every part sent (again) with a signed payload
        assert all(len(payload) == 64 for payload in signed)
        assert info.size == second.size
        body = weed.client().get_object(Bucket=weed.bucket, Key=f"unconfirmed/{second.path}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == second.sha256
    finally:
        backend.close()
