"""RemoteStore: checkpoints and the ledger kept in an object store, so a run outlives its machine.

Remote layout under the run's root (<prefix>/<run name>/):
  lease.json                               who drives the run (lease.py)
  ledger.jsonl                             mirror of the local ledger, rewritten after every change (coalesced)
  <record.path>                            checkpoint bytes, at the same relative path as in the run dir
  manifest/epoch-EEEE.json                 the commit record of epoch E's end: epoch, path, size, sha256
  manifest/epoch-EEEE-step-SSSSSSSS.json   the commit record of a checkpoint S steps into epoch E (+ step)

A checkpoint is known by its position (record.position: epoch, then step, an epoch's end after all
of its steps); each position has one manifest key, and the key and the manifest must agree.

Commit point last: a manifest is written only after its object is complete and the store confirmed
its checksum. A checkpoint without a manifest does not exist remotely. Re-uploading a position with
other bytes first removes the old manifest. All writes happen on background threads and only
while the lease is held; once it is lost they stop for good (fencing).

Retention never empties the store: uploads always run before removals, and a removal of a
checkpoint runs only while the store holds a committed manifest at a strictly later position,
looked up at that moment. Until then it waits in the queue (and, if the run pauses first, the next
start queues it again through resume_removals). The queueing methods and the two gauges
(upload_rate, backlog_bytes; base.py lists them all) never wait on the network; the threads and
their rules are in jobs.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path

from supervisor.durable import atomic_write, sha256_file
from supervisor.layout import LEDGER_NAME
from supervisor.store.backend import ObjectBackend
from supervisor.store.base import END_OF_EPOCH, CheckpointRecord, Store
from supervisor.store.jobs import Actions, Background, Job
from supervisor.store.lease import LEASE_KEY, Lease
from supervisor.store.progress import ProgressLog, human_bytes

log = logging.getLogger(__name__)

LEDGER_KEY = "ledger.jsonl"
MANIFEST_DIR = "manifest"
_RESERVED = (LEDGER_KEY, LEASE_KEY)
_MANIFEST_RE = re.compile(rf"^{MANIFEST_DIR}/epoch-(\d+)(?:-step-(\d+))?\.json$")


def manifest_key(epoch: int, step: int | None = None) -> str:
    """The manifest of epoch `epoch`'s end, or with `step` of the checkpoint `step` steps into it."""
    if step is None:
        return f"{MANIFEST_DIR}/epoch-{epoch:04d}.json"
    return f"{MANIFEST_DIR}/epoch-{epoch:04d}-step-{step:08d}.json"


def _manifest_key_of(record: CheckpointRecord) -> str:
    return manifest_key(record.epoch, record.step)


def _key_position(key: str) -> tuple[int, int] | None:
    """The position a manifest key names; None for a key that names none."""
    m = _MANIFEST_RE.match(key)
    if m is None:
        return None
    return (int(m.group(1)), END_OF_EPOCH if m.group(2) is None else int(m.group(2)))


def _object_key(record: CheckpointRecord) -> str:
    path = Path(record.path)
    if path.is_absolute() or ".." in path.parts or record.path in _RESERVED or path.parts[0] == MANIFEST_DIR:
        raise ValueError(f"checkpoint path {record.path!r} cannot be stored remotely")
    return path.as_posix()


class RemoteStore(Store):
    """A Store over an ObjectBackend; see the module docstring for layout and protocol."""

    def __init__(self, backend: ObjectBackend, run: str, lease_ttl_s: float = 60.0, run_dir: Path | None = None):
        self.backend = backend
        self.run = run
        self.lease = Lease(backend, run, lease_ttl_s, run_dir)
        actions = Actions(self._upload, self._remove, self._newest_committed, self._match_resumed, self._mirror)
        self._work = Background(run, backend.describe(), self.lease, actions)

    # -- lifecycle ----------------------------------------------------------------------------

    def describe(self) -> str:
        return self.backend.describe()

    def open(self) -> None:
        """Check access, take the lease, start the lease renewer and the uploader threads."""
        self.backend.check()
        self.lease.acquire()
        self.lease.start()
        self._work.start()
        log.info("checkpoints of run %s go to %s", self.run, self.describe())

    def close(self) -> None:
        """Stop the threads (an upload in flight is abandoned; drain() first) and release the lease."""
        stuck = self._work.stop()
        # An upload still in flight could land after a successor took the lease: then let it expire.
        # So does a lease whose renewals fail (the store does not answer): releasing would only retry.
        if stuck:
            log.warning("a transfer is still running; the lease of run %s is left to expire", self.run)
        elif not self.lease.held():
            log.warning("the store does not answer; the lease of run %s is left to expire", self.run)
        self.lease.stop(release=not stuck and self.lease.held())
        self.backend.close()

    def lost_lease(self) -> bool:
        """True once another supervisor took the run over; reads a flag, never waits."""
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
        return self._work.error

    def upload_rate(self) -> float | None:
        """Bytes per second of recent checkpoint uploads (the median of the last 5, each timed from the
        start of its job to its commit); None until one completed. Reads what the uploader recorded,
        never waits."""
        return self._work.upload_rate()

    def backlog_bytes(self) -> int:
        """Bytes of checkpoint uploads still to send: those queued plus what the one in flight has not
        sent yet; 0 when idle. Reads what the uploader keeps, never waits."""
        return self._work.backlog_bytes()

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
        """The committed checkpoints (those with a readable manifest), in training order (by position)."""
        out = []
        for position, key in self._listed_manifests():
            record = self._read_manifest(key, position)
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: r.position)

    def ensure_local(self, record: CheckpointRecord, run_dir: Path) -> bool:
        """Make `record` whole under run_dir, downloading it if needed.

        False when the store has no committed copy with this sha256, or the copy is corrupt (then
        nothing is left under run_dir). Raises StoreError when the store itself cannot be reached.
        Temp files a killed download left beside it are removed first: downloads start from zero.
        """
        local = run_dir / record.path
        _remove_stale_downloads(local)
        if _is_whole(local, record):
            return True
        committed = self._read_manifest(_manifest_key_of(record), record.position)
        if committed is None or committed.sha256 != record.sha256 or committed.path != record.path:
            log.warning("checkpoint %s is not committed in %s", record.label, self.describe())
            return False
        tmp = local.with_name(f".{local.name}.download")
        started = time.monotonic()
        progress = ProgressLog(f"download of {record.path}", record.size)
        try:
            if not self.backend.get_file(_object_key(record), tmp, progress):
                log.warning("checkpoint %s has a manifest but no object in %s", record.label, self.describe())
                return False
            if not _is_whole(tmp, record):
                log.warning(
                    "checkpoint %s downloaded from %s does not match its sha256: corrupt, skipped",
                    record.label,
                    self.describe(),
                )
                return False
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        log.info(
            "downloaded checkpoint %s (%s in %.1fs) and verified its sha256",
            record.label,
            human_bytes(record.size),
            elapsed,
        )
        return True

    # -- the caller's side: queue and return, never wait on the network ------------------------

    def checkpoint_verified(self, record: CheckpointRecord, run_dir: Path) -> None:
        """Queue the upload; returns at once."""
        self._work.add_upload(record, run_dir)

    def resume_uploads(self, records: list[CheckpointRecord], run_dir: Path) -> None:
        """Queue uploads of verified local checkpoints the store may lack (e.g. after a pause).

        Already committed ones are recognised by their manifest and skipped; also re-mirrors the ledger.
        """
        for record in records:
            if (run_dir / record.path).exists():
                self._work.add_upload(record, run_dir)
        if (run_dir / LEDGER_NAME).exists():
            self.ledger_changed(run_dir / LEDGER_NAME)

    def resume_removals(self, removed: list[tuple[int, str]], run_dir: Path) -> None:
        """Queue removals an earlier session could not finish; returns at once.

        In the background, every committed manifest whose (epoch, sha256) is in `removed`, of an
        epoch's end or of a step in it, gets a removal job, subject to the rule of every removal (a
        commit at a later position must exist).
        """
        self._work.resume_removals(removed, run_dir)

    def remove_checkpoint(self, record: CheckpointRecord, run_dir: Path) -> None:
        """Delete the local file now; the manifest and then the object go in the background, once a
        checkpoint at a later position is committed remotely."""
        try:
            (run_dir / record.path).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete %s: %s", run_dir / record.path, exc)
        self._work.add_removal(record, run_dir)

    def ledger_changed(self, ledger_path: Path) -> None:
        """Mirror the ledger in the background; changes in quick succession are written once."""
        self._work.ledger_changed(ledger_path)

    def drain(self, timeout_s: float) -> list[str]:
        """Wait up to timeout_s for queued uploads, removals and the ledger mirror; list what is left.

        Removals that wait for a newer committed checkpoint are not waited for; they are listed.
        """
        return self._work.drain(timeout_s)

    # -- the remote operations, run on the background threads (jobs.py) ------------------------

    def _upload(self, job: Job, progress: ProgressLog) -> None:
        """Upload and commit `job.record` unless it is committed already; writes are fenced."""
        record, mkey = job.record, _manifest_key_of(job.record)
        found = self.backend.get_bytes(mkey)
        if found is not None and _parse_manifest(found[0]) == record:
            head = self.backend.head(_object_key(record))
            if head is not None and head.size == record.size:
                log.debug("checkpoint %s is already committed", record.label)
                return
        local = job.run_dir / record.path
        if not local.exists():
            log.warning("not uploading checkpoint %s: %s is gone", record.label, local)
            return
        if found is not None:
            self._work.fence()
            self.backend.delete(mkey)  # uncommit before the object under it changes
        self._work.fence()
        started = time.monotonic()
        self.backend.put_file(_object_key(record), local, record.sha256, progress)
        self._work.fence()
        self.backend.put_bytes(mkey, _dump_manifest(record))
        elapsed = time.monotonic() - started
        log.info(
            "committed checkpoint %s to %s (%s in %.1fs, %s/s)",
            record.label,
            self.describe(),
            human_bytes(record.size),
            elapsed,
            human_bytes(record.size / max(elapsed, 1e-6)),
        )

    def _remove(self, job: Job) -> None:
        """Uncommit, then delete `job.record`, unless the store holds another version of its position."""
        record, mkey = job.record, _manifest_key_of(job.record)
        found = self.backend.get_bytes(mkey)
        committed = _parse_manifest(found[0]) if found else None
        if committed is not None and committed.sha256 != record.sha256:
            log.info("remote checkpoint %s is another version; left in place", record.label)
            return
        if found is not None:
            self._work.fence()
            self.backend.delete(mkey)
        self._work.fence()
        self.backend.delete(_object_key(record))
        log.info("removed checkpoint %s from %s", record.label, self.describe())

    def _listed_manifests(self) -> list[tuple[tuple[int, int], str]]:
        """(position, key) of every manifest key in the store, listed now."""
        listed = ((_key_position(info.key), info.key) for info in self.backend.list(MANIFEST_DIR + "/"))
        return [(position, key) for position, key in listed if position is not None]

    def _read_manifest(self, key: str, position: tuple[int, int]) -> CheckpointRecord | None:
        """The record a manifest commits, if it is readable and names the position its key does."""
        found = self.backend.get_bytes(key)
        record = _parse_manifest(found[0]) if found else None
        return record if record is not None and record.position == position else None

    def _newest_committed(self) -> tuple[int, int] | None:
        """The latest position with a readable manifest in the store, looked up now; None when none."""
        for position, key in sorted(self._listed_manifests(), reverse=True):
            if self._read_manifest(key, position) is not None:
                return position
        return None

    def _match_resumed(self, removed: list[tuple[int, str]], run_dir: Path) -> list[Job]:
        """Removal jobs for the committed checkpoints (epoch ends and mid-epoch ones) whose (epoch,
        sha256) is in `removed`; the sha256 tells apart the checkpoints of one epoch."""
        wanted = set(removed)
        return [Job("remove", r, run_dir) for r in self.remote_checkpoints() if (r.epoch, r.sha256) in wanted]

    def _mirror(self, data: bytes) -> None:
        self.backend.put_bytes(LEDGER_KEY, data)


def _remove_stale_downloads(local: Path) -> None:
    """Delete temp files of earlier downloads of `local` (ours, the backends' and s3transfer's)."""
    prefixes = (f".{local.name}.download", f"..{local.name}.download")
    with contextlib.suppress(OSError):
        for entry in local.parent.iterdir():
            if entry.name.startswith(prefixes) and entry.is_file():
                log.info("removing %s, left by an interrupted download", entry)
                entry.unlink(missing_ok=True)


def _is_whole(path: Path, record: CheckpointRecord) -> bool:
    try:
        return path.stat().st_size == record.size and sha256_file(path) == record.sha256
    except OSError:
        return False


def _dump_manifest(record: CheckpointRecord) -> bytes:
    """The manifest body; "step" only for a mid-epoch checkpoint (epoch ends keep their old form)."""
    body: dict[str, object] = {"epoch": record.epoch, "path": record.path, "size": record.size}
    body["sha256"] = record.sha256
    if record.step is not None:
        body["step"] = record.step
    body["committed_at"] = time.time()
    return json.dumps(body, sort_keys=True).encode()


def _parse_manifest(data: bytes) -> CheckpointRecord | None:
    try:
        raw = json.loads(data)
        step = raw.get("step")
        return CheckpointRecord(
            int(raw["epoch"]),
            str(raw["path"]),
            int(raw["size"]),
            str(raw["sha256"]),
            None if step is None else int(step),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
