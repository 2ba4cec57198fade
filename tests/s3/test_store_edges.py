"""Edges of RemoteStore and Lease against a real SeaweedFS (and, where cheap, a plain folder):
retention during an outage, removals across a pause, a watch loop that never waits on the network,
a vanished lease object, stale download files, local I/O errors on the background threads.
Nothing of the store is mocked; outages are real (the server is killed and started again)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.store.backend import TransientStoreError
from supervisor.store.base import LeaseHeld
from supervisor.store.factory import open_store
from supervisor.store.lease import LEASE_KEY, Lease, LeaseInfo
from supervisor.store.remote import LEDGER_KEY, MANIFEST_DIR, manifest_key

from .s3_support import Remote, Weed, make_checkpoint, storage_settings, wait_for

MiB = 1024 * 1024


@pytest.fixture
def opened() -> Iterator[list]:
    """Stores a test opened itself; closed at the end (after the server is back)."""
    stores: list = []
    yield stores
    for store in reversed(stores):
        store.close()


def _epochs(keys: list[str]) -> set[int]:
    return {int(k.rsplit("epoch-", 1)[1].split(".")[0]) for k in keys if "epoch-" in k}


class CommitSampler:
    """Lists the committed manifests over and over from its own thread and its own client, keeping
    every listing that succeeded (listings fail while the store is unreachable)."""

    def __init__(self, remote: Remote, run: str) -> None:
        if remote.kind == "s3":
            backend = remote.store(run, retry_attempts=1).backend
            self._list = lambda: [o.key for o in backend.list(MANIFEST_DIR + "/")]
        else:  # plain listdir: unlike the backend's walk it fails while the folder is unmounted
            folder = Path(remote.backend(run).root) / MANIFEST_DIR
            self._list = lambda: os.listdir(folder)
        self.samples: list[set[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):  # a breath between listings: the machine is shared
            try:
                self.samples.append(_epochs(self._list()))
            except Exception:
                self._stop.wait(0.05)

    def __enter__(self) -> CommitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class Outage:
    """The store becomes unreachable: the S3 server is killed, or the mounted folder is unmounted
    (a plain file takes its place, so every access fails as it does on a dead mount)."""

    def __init__(self, remote: Remote, run: str) -> None:
        self.weed = remote.weed
        self.root = None if self.weed is not None else Path(remote.backend(run).root)

    def __enter__(self) -> Outage:
        if self.weed is not None:
            self.weed.kill()
        else:
            self.root.rename(self.root.with_name(self.root.name + ".unmounted"))
            self.root.write_text("not mounted")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.weed is not None:
            self.weed.start()
        else:
            self.root.unlink()
            self.root.with_name(self.root.name + ".unmounted").rename(self.root)


def _log_lines(caplog: pytest.LogCaptureFixture, *words: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if all(w in r.getMessage() for w in words)]


# -- 1. retention never empties the store --------------------------------------------------------


def test_retention_never_empties_the_store(remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Removals queued behind uploads during an outage run only once something newer is
    committed: a concurrent reader never sees the store without a checkpoint, nor going back."""
    caplog.set_level(logging.WARNING)
    run_dir = tmp_path / "rd"
    store = remote.store("keep2", run_dir, retry_attempts=2)
    store.open()
    records = {e: make_checkpoint(run_dir, e) for e in (0, 1)}
    for record in records.values():
        store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []
    with CommitSampler(remote, "keep2") as sampler:
        with Outage(remote, "keep2"):
            for epoch in range(2, 10):
                # keep_last = 2, the way the watchdog's retention acts after each verified checkpoint
                records[epoch] = make_checkpoint(run_dir, epoch, size=(4 * MiB if epoch >= 8 else 256 * 1024))
                store.checkpoint_verified(records[epoch], run_dir)
                store.remove_checkpoint(records[epoch - 2], run_dir)
            wait_for(lambda: _log_lines(caplog, "will retry"), 60, "the uploader to meet the outage")
            assert len(store.drain(0)) >= 10  # two uploads (and the one in flight), eight removals
        assert store.drain(180) == []
        seen = len(sampler.samples)
        wait_for(lambda: len(sampler.samples) > seen + 5, 30, "the sampler to list after the queue drained")
    assert [r.epoch for r in store.remote_checkpoints()] == [8, 9]
    raw = remote.backend("keep2")
    assert all(raw.head(records[e].path) is None for e in range(8))
    assert sampler.samples and all(sampler.samples), "a reader saw no committed checkpoint at all"
    newest = [max(s) for s in sampler.samples]
    assert newest == sorted(newest), "the newest committed epoch went down"
    assert newest[0] == 1 and newest[-1] == 9


# -- 2. removals are retried, and a pause hands them to the next start ---------------------------


def test_failed_removal_is_retried(weed: Weed, tmp_path: Path, opened: list, caplog) -> None:
    caplog.set_level(logging.WARNING)
    run_dir = tmp_path / "rd"
    store = open_store(storage_settings(weed, retry_attempts=2), "retry", run_dir)
    opened.append(store)
    store.open()
    records = [make_checkpoint(run_dir, e) for e in range(3)]
    for record in records:
        store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []
    weed.kill()
    try:
        store.remove_checkpoint(records[0], run_dir)
        wait_for(lambda: _log_lines(caplog, "will retry"), 60, "a failed removal")
    finally:
        weed.start()
    assert store.drain(120) == []
    raw = store.backend
    assert raw.get_bytes(manifest_key(0)) is None and raw.head(records[0].path) is None
    assert [r.epoch for r in store.remote_checkpoints()] == [1, 2]


def test_removal_pending_at_close_is_done_by_the_next_start(weed: Weed, tmp_path: Path, opened: list) -> None:
    settings = storage_settings(weed, lease_ttl_s=3.0, retry_attempts=2)
    run_dir = tmp_path / "rd"
    a = open_store(settings, "paused", run_dir)
    opened.append(a)
    a.open()
    records = [make_checkpoint(run_dir, e) for e in range(3)]
    for record in records:
        a.checkpoint_verified(record, run_dir)
    assert a.drain(60) == []
    weed.kill()
    try:
        a.remove_checkpoint(records[0], run_dir)
        assert any("removal of checkpoint epoch 0" in p for p in a.drain(0))
        a.close()  # a pause while the server is down
    finally:
        weed.start()

    def next_start():
        b = open_store(settings, "paused", run_dir)
        try:
            b.open()
        except (LeaseHeld, TransientStoreError):  # the paused session's lease runs out; the server warms up
            b.close()
            return None
        opened.append(b)
        return b

    b = wait_for(next_start, 60, "the next start to take the lease", interval=0.5)
    b.resume_removals([(0, records[0].sha256)], run_dir)
    assert b.drain(60) == []
    raw = b.backend
    assert raw.get_bytes(manifest_key(0)) is None and raw.head(records[0].path) is None
    assert [r.epoch for r in b.remote_checkpoints()] == [1, 2]
    assert all(raw.head(r.path) is not None for r in records[1:])


def test_resume_removals_matches_epoch_and_sha_and_keeps_the_newest(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    a = remote.store("resumed", run_dir)
    a.open()
    records = [make_checkpoint(run_dir, e) for e in range(3)]
    for record in records:
        a.checkpoint_verified(record, run_dir)
    assert a.drain(60) == []
    a.close()

    b = remote.store("resumed", run_dir)
    b.open()
    b.resume_removals([(0, records[0].sha256), (1, "0" * 64), (2, records[2].sha256), (7, "1" * 64)], run_dir)
    pending = b.drain(60)
    assert len(pending) == 1 and "epoch 2" in pending[0] and "newer committed checkpoint" in pending[0], pending
    assert [r.epoch for r in b.remote_checkpoints()] == [1, 2]  # epoch 1 is another version: kept

    newer = make_checkpoint(run_dir, 3)
    b.checkpoint_verified(newer, run_dir)  # once something newer is committed, the waiting removal runs
    assert b.drain(60) == []
    assert [r.epoch for r in b.remote_checkpoints()] == [1, 3]
    assert remote.backend("resumed").head(records[2].path) is None


# -- 3. the watch loop never waits on the network ------------------------------------------------


def test_queueing_methods_never_wait_on_the_network(weed: Weed, tmp_path: Path, opened: list, caplog) -> None:
    """With the server down and both store threads inside backend calls that retry for many
    minutes, every method the watch loop calls still returns; a method that did any network I/O,
    or waited for a thread that does, would not return before the deadline."""
    caplog.set_level(logging.WARNING)
    run_dir = tmp_path / "rd"
    store = open_store(storage_settings(weed, retry_attempts=100), "nowait", run_dir)
    opened.append(store)
    store.open()
    first = make_checkpoint(run_dir, 0)
    store.checkpoint_verified(first, run_dir)
    assert store.drain(60) == []
    ledger = run_dir / "ledger.jsonl"
    ledger.write_text("{}\n")

    def retrying_in(thread: str) -> bool:
        return any(r.threadName.startswith(thread) and "again in" in r.getMessage() for r in caplog.records)

    weed.kill()
    try:
        second, third = make_checkpoint(run_dir, 1), make_checkpoint(run_dir, 2)
        store.checkpoint_verified(second, run_dir)
        store.ledger_changed(ledger)
        wait_for(lambda: retrying_in("store-uploader"), 60, "the uploader to retry")
        calls = {
            "checkpoint_verified": lambda: store.checkpoint_verified(third, run_dir),
            "ledger_changed": lambda: store.ledger_changed(ledger),
            "remove_checkpoint": lambda: store.remove_checkpoint(first, run_dir),
            "resume_uploads": lambda: store.resume_uploads([second, third], run_dir),
            "resume_removals": lambda: store.resume_removals([(0, first.sha256)], run_dir),
            "lost_lease": store.lost_lease,
            "permanent_error": store.permanent_error,
            "writable": lambda: store.writable(0.0),
        }
        returned: dict[str, object] = {}
        for name, call in calls.items():
            threading.Thread(target=lambda n=name, c=call: returned.__setitem__(n, c()), daemon=True).start()
        try:
            wait_for(lambda: len(returned) == len(calls), 10, "every call to return")
        except AssertionError:
            raise AssertionError(f"blocked while the server is down: {sorted(set(calls) - set(returned))}") from None
        # The deadline means something only while the store's own work is still stuck on the network.
        pending = store.drain(0)
        assert any("epoch 1" in p for p in pending) and any("ledger" in p for p in pending), pending
        assert returned["lost_lease"] is False and returned["permanent_error"] is None
        assert returned["writable"] is True
    finally:
        weed.start()
    assert store.drain(240) == []
    assert [r.epoch for r in store.remote_checkpoints()] == [1, 2]


# -- 4. a vanished lease object ------------------------------------------------------------------


def test_vanished_lease_object_is_created_again(remote: Remote, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    raw = remote.backend("vanish")
    lease = Lease(raw, "vanish", 30.0, tmp_path)
    lease.acquire()
    raw.delete(LEASE_KEY)  # a lifecycle rule, or a person cleaning up
    assert lease.renew() is True
    assert lease.held() and not lease.lost
    assert LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).holder == lease.holder
    assert len(_log_lines(caplog, "lease object of run vanish vanished from", "re-created it")) == 1
    assert lease.renew() is True and lease.held()  # and renewals go on from the new object
    with pytest.raises(LeaseHeld):
        Lease(remote.backend("vanish"), "vanish", 30.0).acquire()


def test_vanished_lease_object_taken_by_another_is_lost(remote: Remote, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    raw = remote.backend("vanish2")
    lease = Lease(raw, "vanish2", 30.0, tmp_path)
    lease.acquire()
    raw.delete(LEASE_KEY)
    other = Lease(remote.backend("vanish2"), "vanish2", 30.0)
    other.acquire()  # another supervisor finds the run free and creates the object first
    assert lease.renew() is False
    assert lease.lost and not lease.held()
    assert LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).holder == other.holder
    assert _log_lines(caplog, "lost the lease of run vanish2", other.holder)


def test_vanished_lease_object_after_being_out_of_touch_is_lost(remote: Remote, tmp_path: Path, caplog) -> None:
    """Not renewed for most of the ttl (frozen, partitioned): another supervisor may have driven the
    run meanwhile, so a vanished object is not simply created again."""
    caplog.set_level(logging.WARNING)
    raw = remote.backend("vanish4")
    lease = Lease(raw, "vanish4", 0.5, tmp_path)  # no renewer thread: its renewals simply stop
    lease.acquire()
    wait_for(lambda: not lease.held(), 10, "the lease to go unrenewed for most of its ttl")
    raw.delete(LEASE_KEY)
    assert lease.renew() is False
    assert lease.lost and raw.get_bytes(LEASE_KEY) is None
    assert _log_lines(caplog, "lost the lease of run vanish4", "could not renew it")


class _ContenderAtTheWorstMoment:
    """The real backend; the first time a read finds no lease object, another supervisor creates
    it right then, between our look and our create."""

    def __init__(self, real, contender: Lease) -> None:
        self._real = real
        self._contender = contender
        self._armed = False

    def arm(self) -> None:
        self._armed = True

    def get_bytes(self, key: str):
        found = self._real.get_bytes(key)
        if key == LEASE_KEY and found is None and self._armed:
            self._armed = False
            self._contender.acquire()
        return found

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def test_vanished_lease_object_recreated_by_a_contender_first(remote: Remote, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    other = Lease(remote.backend("vanish3"), "vanish3", 30.0)
    racing = _ContenderAtTheWorstMoment(remote.backend("vanish3"), other)
    lease = Lease(racing, "vanish3", 30.0, tmp_path)
    lease.acquire()
    racing.delete(LEASE_KEY)
    racing.arm()
    assert lease.renew() is False
    assert lease.lost
    assert LeaseInfo.parse(racing.get_bytes(LEASE_KEY)[0]).holder == other.holder
    lines = _log_lines(caplog, "lost the lease of run vanish3", "vanished", other.holder)
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()


# -- 5. stale download files ---------------------------------------------------------------------


def test_stale_download_files_are_removed(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    store = remote.store("downloads", run_dir)
    store.open()
    record = make_checkpoint(run_dir, 3)
    store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []

    fresh = tmp_path / "fresh"
    folder = (fresh / record.path).parent
    folder.mkdir(parents=True)
    name = Path(record.path).name
    # what a killed download leaves: our temp file, s3transfer's, the file backend's
    stale = [folder / f".{name}.download", folder / f".{name}.download.a1B2c3D4", folder / f"..{name}.download.x1.tmp"]
    for path in stale:
        path.write_bytes((run_dir / record.path).read_bytes()[:1000] + b"junk")
    unrelated = folder / ".epoch-0004.pt.download"
    unrelated.write_bytes(b"another record's")
    assert store.ensure_local(record, fresh) is True
    assert (fresh / record.path).read_bytes() == (run_dir / record.path).read_bytes()
    assert not [p for p in stale if p.exists()]
    assert unrelated.exists()

    stale[0].write_bytes(b"left by a kill after the file was already whole")
    assert store.ensure_local(record, fresh) is True
    assert not stale[0].exists()


# -- 6. local I/O errors on the background threads -----------------------------------------------


def test_local_file_errors_neither_kill_nor_spin_the_threads(remote: Remote, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    store = remote.store("local-errors", tmp_path / "rd", retry_attempts=2)
    store.open()

    gone = tmp_path / "deleted-run-dir"
    lost = make_checkpoint(gone, 0)
    shutil.rmtree(gone)
    store.checkpoint_verified(lost, gone)
    store.ledger_changed(gone / "ledger.jsonl")
    assert store.drain(60) == [], "a job whose local file is gone is dropped, not retried forever"
    assert _log_lines(caplog, "not uploading checkpoint epoch 0") and _log_lines(caplog, "ledger", "is gone")

    run_dir = tmp_path / "rd"
    record = make_checkpoint(run_dir, 1)
    data = (run_dir / record.path).read_bytes()
    (run_dir / record.path).unlink()
    (run_dir / record.path).mkdir()  # reading it fails with an OSError that is not "gone"
    store.checkpoint_verified(record, run_dir)
    wait_for(lambda: len(_log_lines(caplog, "epoch 1", "will retry")) >= 2, 120, "the upload to be retried")
    failures = _log_lines(caplog, "epoch 1", "will retry")
    assert all(r.exc_info is None for r in failures), "one line per failure, no traceback"
    (run_dir / record.path).rmdir()
    (run_dir / record.path).write_bytes(data)
    assert store.drain(120) == []
    assert [r.epoch for r in store.remote_checkpoints()] == [1]

    ledger = run_dir / "ledger.jsonl"
    ledger.write_text('{"still": "mirrored"}\n')
    store.ledger_changed(ledger)
    assert store.drain(60) == []
    assert remote.backend("local-errors").get_bytes(LEDGER_KEY)[0] == ledger.read_bytes()


def test_a_local_file_gone_mid_upload_is_not_taken_for_an_unreachable_store(weed: Weed) -> None:
    """Retention may delete a checkpoint while its upload runs: s3transfer then raises FileNotFoundError.
    That is no network fault: the upload is dropped at once instead of retried as 'cannot reach'."""
    from supervisor.store.backend import LocalFileChanged
    from supervisor.store.s3 import S3Backend

    backend = S3Backend(storage_settings(weed), "gone-test")
    try:
        verdict = backend._classify(FileNotFoundError(2, "No such file or directory", "/x/epoch-0001.pt"), "upload")
        assert isinstance(verdict, LocalFileChanged) and "epoch-0001.pt is gone" in str(verdict)
        network = backend._classify(ConnectionRefusedError(111, "Connection refused"), "upload")
        assert isinstance(network, TransientStoreError)
    finally:
        backend.close()
