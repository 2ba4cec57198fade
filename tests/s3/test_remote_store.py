"""RemoteStore over a real SeaweedFS and over a plain folder: commit protocol, restore, integrity,
retention, leases. No part of the store is mocked."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from supervisor.store.base import LeaseHeld
from supervisor.store.lease import LEASE_KEY, LeaseInfo, _boot_id
from supervisor.store.remote import LEDGER_KEY, manifest_key

from .s3_support import Remote, make_checkpoint, wait_for


def _ledger(run_dir: Path, *lines: dict) -> Path:
    path = run_dir / "ledger.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return path


def test_commit_restore_and_download(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "machine-a"
    store = remote.store("run1", run_dir)
    store.open()
    records = [make_checkpoint(run_dir, epoch) for epoch in range(3)]
    for record in records:
        store.checkpoint_verified(record, run_dir)
        store.ledger_changed(_ledger(run_dir, {"kind": "checkpoint", "epoch": record.epoch}))
    assert store.drain(60) == []

    raw = remote.backend("run1")
    for record in records:
        manifest = json.loads(raw.get_bytes(manifest_key(record.epoch))[0])
        assert (manifest["epoch"], manifest["size"], manifest["sha256"]) == (record.epoch, record.size, record.sha256)
        assert raw.head(record.path).size == record.size
    assert raw.get_bytes(LEDGER_KEY)[0] == (run_dir / "ledger.jsonl").read_bytes()
    assert store.remote_checkpoints() == records
    store.close()

    # Another machine, empty run dir: the ledger comes back, then the checkpoint it resumes from.
    fresh = tmp_path / "machine-b"
    other = remote.store("run1", fresh)
    other.open()
    assert other.restore(fresh) is True
    assert (fresh / "ledger.jsonl").read_bytes() == (run_dir / "ledger.jsonl").read_bytes()
    assert other.ensure_local(records[2], fresh) is True
    assert (fresh / records[2].path).read_bytes() == (run_dir / records[2].path).read_bytes()
    assert other.restore(fresh) is False  # never overwrites a local ledger


def test_restore_without_remote_run(remote: Remote, tmp_path: Path) -> None:
    store = remote.store("never-ran", tmp_path / "rd")
    store.open()
    assert store.restore(tmp_path / "rd") is False
    assert not (tmp_path / "rd" / "ledger.jsonl").exists()


def test_corrupt_or_missing_object_is_refused(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "a"
    store = remote.store("run2", run_dir)
    store.open()
    good, bad, gone = (make_checkpoint(run_dir, e) for e in range(3))
    for record in (good, bad, gone):
        store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []

    raw = remote.backend("run2")
    tampered = tmp_path / "tampered"
    data = bytearray((run_dir / bad.path).read_bytes())
    data[1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    if remote.kind == "s3":
        client = remote.weed.client()
        client.put_object(Bucket=remote.weed.bucket, Key=f"{raw.root}/{bad.path}", Body=bytes(data))
    else:
        (raw.root / bad.path).write_bytes(bytes(data))
    raw.delete(gone.path)

    fresh = tmp_path / "b"
    assert store.ensure_local(bad, fresh) is False
    assert store.ensure_local(gone, fresh) is False
    assert not (fresh / bad.path).exists() and not (fresh / gone.path).exists()
    assert not [p for p in fresh.rglob("*") if p.is_file()], "no partial or corrupt file may stay behind"
    assert store.ensure_local(good, fresh) is True

    uncommitted = make_checkpoint(tmp_path / "c", 7)
    assert store.ensure_local(uncommitted, fresh) is False


def test_retention_removes_object_and_manifest(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    store = remote.store("run3", run_dir)
    store.open()
    records = [make_checkpoint(run_dir, e) for e in range(3)]
    for record in records:
        store.checkpoint_verified(record, run_dir)
    assert store.drain(60) == []
    store.remove_checkpoint(records[0], run_dir)
    assert not (run_dir / records[0].path).exists()
    assert store.drain(60) == []
    raw = remote.backend("run3")
    assert raw.get_bytes(manifest_key(0)) is None
    assert raw.head(records[0].path) is None
    assert [r.epoch for r in store.remote_checkpoints()] == [1, 2]
    assert store.ensure_local(records[0], tmp_path / "fresh") is False


def test_reupload_of_an_epoch_replaces_the_commit(remote: Remote, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    store = remote.store("run4", run_dir)
    store.open()
    first = make_checkpoint(run_dir, 5)
    store.checkpoint_verified(first, run_dir)
    assert store.drain(60) == []
    second = make_checkpoint(run_dir, 5)  # the epoch ran again (rollback) and wrote other bytes
    store.checkpoint_verified(second, run_dir)
    store.resume_uploads([second], run_dir)  # already queued or committed: no duplicate work
    assert store.drain(60) == []
    assert store.remote_checkpoints() == [second]
    assert store.ensure_local(first, tmp_path / "x") is False
    assert store.ensure_local(second, tmp_path / "y") is True


def test_two_supervisors_race_for_one_run(remote: Remote, tmp_path: Path) -> None:
    stores = [remote.store("raced", tmp_path / f"machine-{i}") for i in range(2)]
    outcomes: list[object] = [None, None]
    barrier = threading.Barrier(2)

    def contend(i: int) -> None:
        barrier.wait()
        try:
            stores[i].open()
            outcomes[i] = "won"
        except LeaseHeld as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(map(str, outcomes)).count("won") == 1, outcomes
    winner = stores[outcomes.index("won")]
    loser_error = next(o for o in outcomes if isinstance(o, LeaseHeld))
    message = str(loser_error)
    assert "\n" not in message
    assert winner.lease.holder in message and winner.lease.host in message
    assert re.search(r"renewed [0-2]s ago", message)


def test_released_lease_is_taken_at_once(remote: Remote, tmp_path: Path) -> None:
    first = remote.store("handover", tmp_path / "a")
    first.open()
    first.close()
    second = remote.store("handover", tmp_path / "b")
    second.open()  # no waiting for the ttl: the lease was released
    assert not second.lost_lease()


def test_stale_lease_is_taken_over_but_a_live_one_is_not(remote: Remote, tmp_path: Path) -> None:
    raw = remote.backend("stale")
    now = time.time()
    ghost = LeaseInfo("stale", "ghost0000000", 4242, "vanished-host", "", "/x", now - 500, now - 100, 30.0)
    raw.put_bytes(LEASE_KEY, ghost.dump())
    store = remote.store("stale", tmp_path / "a")
    store.open()
    held = LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0])
    assert held.holder == store.lease.holder

    live = LeaseInfo("live", "other0000000", 4242, "busy-host", "", "/x", now, now - 5, 30.0)
    raw_live = remote.backend("live")
    raw_live.put_bytes(LEASE_KEY, live.dump())
    with pytest.raises(LeaseHeld) as info:
        remote.store("live", tmp_path / "b").open()
    assert "other0000000" in str(info.value) and "busy-host" in str(info.value)
    assert re.search(r"renewed [5-7]s ago", str(info.value))


def test_lease_left_by_a_dead_supervisor_of_this_run_dir(remote: Remote, tmp_path: Path) -> None:
    """kill -9 of the supervisor, then start again on the same machine: no wait for the ttl."""
    run_dir = tmp_path / "rd"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    raw = remote.backend("crashed")
    now = time.time()
    doc = LeaseInfo(
        "crashed", "dead00000000", dead.pid, socket.gethostname(), _boot_id(), str(run_dir.resolve()), now, now, 30.0
    )
    raw.put_bytes(LEASE_KEY, doc.dump())
    store = remote.store("crashed", run_dir)
    store.open()
    assert LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).holder == store.lease.holder


def test_lease_is_renewed_in_the_background(remote: Remote, tmp_path: Path) -> None:
    store = remote.store("renewing", tmp_path / "a", lease_ttl_s=1.5)
    store.open()
    raw = remote.backend("renewing")
    first = LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).renewed_at
    wait_for(lambda: LeaseInfo.parse(raw.get_bytes(LEASE_KEY)[0]).renewed_at > first, 10, "a renewal")
    assert store.lease.held() and not store.lost_lease()
