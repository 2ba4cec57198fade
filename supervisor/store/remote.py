"""RemoteStore: checkpoints and the ledger kept in an object store, so a run outlives its machine.

Remote layout under the run's root (<prefix>/<run name>/):
  lease.json                  who drives the run (lease.py)
  ledger.jsonl                mirror of the local ledger, rewritten after every change (coalesced)
  <record.path>               checkpoint bytes, at the same relative path as in the run dir
  manifest/epoch-EEEE.json    the commit record: epoch, path, size, sha256

Commit point last: a manifest is written only after its object is complete and the store confirmed
its checksum. A checkpoint without a manifest does not exist remotely. Re-uploading an epoch with
other bytes first removes the old manifest. All writes happen on background threads and only
while the lease is held; once it is lost they stop for good (fencing).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from supervisor.durable import atomic_write, sha256_file
from supervisor.layout import LEDGER_NAME
from supervisor.store.backend import LocalFileChanged, ObjectBackend, TransientStoreError
from supervisor.store.base import CheckpointRecord, Store, StoreError
from supervisor.store.lease import LEASE_KEY, Lease
from supervisor.store.progress import ProgressLog, human_bytes

log = logging.getLogger(__name__)

LEDGER_KEY = "ledger.jsonl"
MANIFEST_DIR = "manifest"
_RESERVED = (LEDGER_KEY, LEASE_KEY)


def manifest_key(epoch: int) -> str:
    return f"{MANIFEST_DIR}/epoch-{epoch:04d}.json"


def _object_key(record: CheckpointRecord) -> str:
    path = Path(record.path)
    if path.is_absolute() or ".." in path.parts or record.path in _RESERVED or path.parts[0] == MANIFEST_DIR:
        raise ValueError(f"checkpoint path {record.path!r} cannot be stored remotely")
    return path.as_posix()


@dataclass(frozen=True)
class _Job:
    kind: str  # "upload" or "remove"
    record: CheckpointRecord
    run_dir: Path

    def describe(self) -> str:
        what = "upload" if self.kind == "upload" else "removal"
        return f"{what} of checkpoint epoch {self.record.epoch} ({self.record.path}, {human_bytes(self.record.size)})"


class RemoteStore(Store):
    """A Store over an ObjectBackend; see the module docstring for layout and protocol."""

    def __init__(self, backend: ObjectBackend, run: str, lease_ttl_s: float = 60.0, run_dir: Path | None = None):
        self.backend = backend
        self.run = run
        self.lease = Lease(backend, run, lease_ttl_s, run_dir)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._active: _Job | None = None
        self._ledger_path: Path | None = None
        self._ledger_dirty = False
        self._ledger_active = False
        self._error: str | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def describe(self) -> str:
        return self.backend.describe()

    def open(self) -> None:
        """Check access, take the lease, start the lease renewer and the uploader threads."""
        self.backend.check()
        self.lease.acquire()
        self.lease.start()
        for name, target in (("uploader", self._upload_loop), ("ledger", self._ledger_loop)):
            thread = threading.Thread(target=target, name=f"store-{name}-{self.run}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("checkpoints of run %s go to %s", self.run, self.describe())

    def close(self) -> None:
        """Stop the threads (an upload in flight is abandoned; drain() first) and release the lease."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=2)
        # An upload still in flight could land after a successor took the lease: then let it expire.
        stuck = any(thread.is_alive() for thread in self._threads)
        if stuck:
            log.warning("a transfer is still running; the lease of run %s is left to expire", self.run)
        self.lease.stop(release=not stuck)
        self.backend.close()

    def lost_lease(self) -> bool:
        return self.lease.lost

    def writable(self, wait_s: float) -> bool:
        """False once the lease is lost. A lease past its renewal time (this process was frozen, or
        the network is down) makes us wait up to wait_s for the renewer to settle it: renewed, or
        lost. Still unsettled, local writes go on; remote ones stay fenced by held()."""
        deadline = time.monotonic() + wait_s
        while not self.lease.lost:
            if self.lease.held() or time.monotonic() >= deadline:
                return True
            time.sleep(0.05)
        return False

    def permanent_error(self) -> str | None:
        """The one-line reason background work stopped for good (bad credentials...), else None."""
        return self._error

    # -- resume -------------------------------------------------------------------------------

    def restore(self, run_dir: Path) -> bool:
        """Copy the remote ledger into a run dir that has none; True when the store had one."""
        target = run_dir / LEDGER_NAME
        if target.exists():
            log.info("run dir %s already has a ledger; not restoring from %s", run_dir, self.describe())
            return False
        found = self.backend.get_bytes(LEDGER_KEY)
        if found is None:
            return False
        atomic_write(target, lambda f: f.write(found[0]))
        log.info("restored the ledger of run %s from %s (%s)", self.run, self.describe(), human_bytes(len(found[0])))
        return True

    def remote_checkpoints(self) -> list[CheckpointRecord]:
        """The committed checkpoints (those with a manifest), by epoch."""
        out = []
        for info in self.backend.list(MANIFEST_DIR + "/"):
            found = self.backend.get_bytes(info.key)
            record = _parse_manifest(found[0]) if found else None
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: r.epoch)

    def ensure_local(self, record: CheckpointRecord, run_dir: Path) -> bool:
        """Make `record` whole under run_dir, downloading it if needed.

        False when the store has no committed copy with this sha256, or the copy is corrupt (then
        nothing is left under run_dir). Raises StoreError when the store itself cannot be reached.
        """
        local = run_dir / record.path
        if _is_whole(local, record):
            return True
        found = self.backend.get_bytes(manifest_key(record.epoch))
        committed = _parse_manifest(found[0]) if found else None
        if committed is None or committed.sha256 != record.sha256 or committed.path != record.path:
            log.warning("checkpoint epoch %d is not committed in %s", record.epoch, self.describe())
            return False
        tmp = local.with_name(f".{local.name}.download")
        started = time.monotonic()
        progress = ProgressLog(f"download of {record.path}", record.size)
        try:
            if not self.backend.get_file(_object_key(record), tmp, progress):
                log.warning("checkpoint epoch %d has a manifest but no object in %s", record.epoch, self.describe())
                return False
            if not _is_whole(tmp, record):
                log.warning(
                    "checkpoint epoch %d downloaded from %s does not match its sha256: corrupt, skipped",
                    record.epoch,
                    self.describe(),
                )
                return False
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        log.info(
            "downloaded checkpoint epoch %d (%s in %.1fs) and verified its sha256",
            record.epoch,
            human_bytes(record.size),
            elapsed,
        )
        return True

    # -- background work ----------------------------------------------------------------------

    def checkpoint_verified(self, record: CheckpointRecord, run_dir: Path) -> None:
        """Queue the upload; returns at once."""
        self._enqueue(_Job("upload", record, run_dir))

    def resume_uploads(self, records: list[CheckpointRecord], run_dir: Path) -> None:
        """Queue uploads of verified local checkpoints the store may lack (e.g. after a pause).

        Already committed ones are recognised by their manifest and skipped; also re-mirrors the ledger.
        """
        for record in records:
            if (run_dir / record.path).exists():
                self._enqueue(_Job("upload", record, run_dir))
        if (run_dir / LEDGER_NAME).exists():
            self.ledger_changed(run_dir / LEDGER_NAME)

    def remove_checkpoint(self, record: CheckpointRecord, run_dir: Path) -> None:
        """Delete the local file now; the manifest and then the object go in the background."""
        (run_dir / record.path).unlink(missing_ok=True)
        with self._cond:
            self._jobs = deque(j for j in self._jobs if j.record != record)
        self._enqueue(_Job("remove", record, run_dir))

    def ledger_changed(self, ledger_path: Path) -> None:
        with self._cond:
            self._ledger_path = ledger_path
            self._ledger_dirty = True
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> list[str]:
        """Wait up to timeout_s for queued uploads, removals and the ledger mirror; list what is left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._busy() and not self.lease.lost and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._pending()

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            if job not in self._jobs:
                self._jobs.append(job)
            self._cond.notify_all()

    def _busy(self) -> bool:
        return bool(self._jobs or self._active or self._ledger_dirty or self._ledger_active)

    def _pending(self) -> list[str]:
        reason = "lease lost" if self.lease.lost else self._error or "not finished"
        jobs = ([self._active] if self._active else []) + list(self._jobs)
        out = [f"{job.describe()}: {reason}" for job in jobs]
        if self._ledger_dirty or self._ledger_active:
            out.append(f"mirror of the ledger: {reason}")
        return out

    def _wait_writable(self) -> bool:
        """Block until the lease allows writing; False when we must stop (closing, lost, failed)."""
        with self._cond:
            while not self._stopping and self._error is None and not self.lease.lost:
                if self.lease.held():
                    return True
                self._cond.wait(0.2)
        return False

    def _fail(self, exc: StoreError) -> None:
        with self._cond:
            if self._error is None:
                self._error = str(exc)
                log.error("store %s: %s; uploads stop, the run should pause", self.describe(), exc)
            self._cond.notify_all()

    def _backoff(self, failures: int) -> None:
        delay = random.uniform(0, min(30.0, 0.5 * 2**failures))
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, timeout=delay)

    def _upload_loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or bool(self._jobs))
                if self._stopping:
                    return
            if not self._wait_writable():
                return
            with self._cond:
                if not self._jobs:
                    continue
                job = self._active = self._jobs.popleft()
            retry = False
            try:
                if job.kind == "upload":
                    self._upload(job)
                else:
                    self._remove(job)
                failures = 0
            except LocalFileChanged as exc:
                log.warning("not uploading checkpoint epoch %d: %s", job.record.epoch, exc)
            except TransientStoreError as exc:
                failures += 1
                retry = True
                log.warning("%s failed (%s); will retry", job.describe(), exc)
            except StoreError as exc:
                retry = True
                self._fail(exc)
            except Exception:  # a bug must not kill the uploader silently
                log.exception("%s failed unexpectedly", job.describe())
            with self._cond:
                if retry:
                    self._jobs.appendleft(job)
                self._active = None
                self._cond.notify_all()
            if retry:
                self._backoff(failures)

    def _upload(self, job: _Job) -> None:
        record, mkey = job.record, manifest_key(job.record.epoch)
        found = self.backend.get_bytes(mkey)
        committed = _parse_manifest(found[0]) if found else None
        if committed == record:
            head = self.backend.head(_object_key(record))
            if head is not None and head.size == record.size:
                log.debug("checkpoint epoch %d is already committed", record.epoch)
                return
        local = job.run_dir / record.path
        if not local.exists():
            log.warning("not uploading checkpoint epoch %d: %s is gone", record.epoch, local)
            return
        if committed is not None and self._wait_writable():
            self.backend.delete(mkey)  # uncommit before the object under it changes
        if not self._wait_writable():
            return self._requeue(job)
        started = time.monotonic()
        progress = ProgressLog(f"upload of {record.path}", record.size)
        self.backend.put_file(_object_key(record), local, record.sha256, progress)
        if not self._wait_writable():
            return self._requeue(job)
        self.backend.put_bytes(mkey, _dump_manifest(record))
        elapsed = time.monotonic() - started
        log.info(
            "committed checkpoint epoch %d to %s (%s in %.1fs, %s/s)",
            record.epoch,
            self.describe(),
            human_bytes(record.size),
            elapsed,
            human_bytes(record.size / max(elapsed, 1e-6)),
        )

    def _requeue(self, job: _Job) -> None:
        with self._cond:
            if not self.lease.lost:
                self._jobs.appendleft(job)

    def _remove(self, job: _Job) -> None:
        record, mkey = job.record, manifest_key(job.record.epoch)
        found = self.backend.get_bytes(mkey)
        committed = _parse_manifest(found[0]) if found else None
        if committed is not None and committed.sha256 != record.sha256:
            log.info("remote checkpoint epoch %d is another version; left in place", record.epoch)
            return
        if committed is not None:
            self.backend.delete(mkey)
        if self._wait_writable():
            self.backend.delete(_object_key(record))
            log.info("removed checkpoint epoch %d from %s", record.epoch, self.describe())

    def _ledger_loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._ledger_dirty)
                if self._stopping:
                    return
            if not self._wait_writable():
                return
            with self._cond:
                path, self._ledger_dirty, self._ledger_active = self._ledger_path, False, True
            ok = True
            try:
                if path is not None and self._wait_writable():
                    self.backend.put_bytes(LEDGER_KEY, path.read_bytes())
                failures = 0
            except TransientStoreError as exc:
                ok, failures = False, failures + 1
                log.warning("mirroring the ledger failed (%s); will retry", exc)
            except StoreError as exc:
                ok = False
                self._fail(exc)
            except OSError as exc:
                log.warning("cannot read the ledger %s to mirror it: %s", path, exc)
            with self._cond:
                self._ledger_active = False
                self._ledger_dirty = self._ledger_dirty or not ok
                self._cond.notify_all()
            if not ok:
                self._backoff(failures)


def _is_whole(path: Path, record: CheckpointRecord) -> bool:
    try:
        return path.stat().st_size == record.size and sha256_file(path) == record.sha256
    except OSError:
        return False


def _dump_manifest(record: CheckpointRecord) -> bytes:
    body = {"epoch": record.epoch, "path": record.path, "size": record.size, "sha256": record.sha256}
    body["committed_at"] = time.time()
    return json.dumps(body, sort_keys=True).encode()


def _parse_manifest(data: bytes) -> CheckpointRecord | None:
    try:
        raw = json.loads(data)
        return CheckpointRecord(int(raw["epoch"]), str(raw["path"]), int(raw["size"]), str(raw["sha256"]))
    except (ValueError, TypeError, KeyError):
        return None
