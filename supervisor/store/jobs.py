"""The background work of a RemoteStore: what runs in which order, on which thread, and when again.

Two threads. The uploader runs checkpoint jobs one at a time: every queued upload before any
removal, whenever the removal was queued; a removal only when `newest_committed()`, asked at that
moment, names a position (epoch, step) strictly later than the one it takes away; otherwise it
waits until an upload finishes (or, on pause, for the next start). The ledger thread mirrors the
latest ledger, coalescing changes. A job that fails for a reason a later try may fix (network,
server, local I/O) is logged in one line and goes back to the head of its queue after a backoff
with jitter; one that cannot work (its local file is gone or changed, a bug) is dropped with one
line. The uploader also keeps the two gauges the watchdog plans with: the rate of the last few
uploads and the bytes still to send. The caller's side only touches the queues under a lock that is
never held across I/O, so it never waits on the network.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor.store.backend import LocalFileChanged, TransientStoreError
from supervisor.store.base import CheckpointRecord, StoreError
from supervisor.store.lease import Lease
from supervisor.store.progress import ProgressLog, human_bytes

log = logging.getLogger(__name__)


RATE_SAMPLES = 5


class Fenced(Exception):
    """The lease does not allow writing now (not held, lost, closing): the job waits in its queue."""


class Retry(Exception):
    """A job failed for a reason a later try may fix; it was logged and put back in its queue."""


@dataclass(frozen=True)
class Job:
    kind: str  # "upload" or "remove"
    record: CheckpointRecord
    run_dir: Path

    def describe(self) -> str:
        what = "upload" if self.kind == "upload" else "removal"
        return f"{what} of checkpoint {self.record.label} ({self.record.path}, {human_bytes(self.record.size)})"


@dataclass(frozen=True)
class Actions:
    """The remote operations the threads perform; each may raise TransientStoreError / StoreError."""

    upload: Callable[[Job, ProgressLog], None]  # reports the bytes it sends to the ProgressLog
    remove: Callable[[Job], None]
    newest_committed: Callable[[], tuple[int, int] | None]  # latest committed position now; None: none
    match_resumed: Callable[[list[tuple[int, str]], Path], list[Job]]  # removal jobs for (epoch, sha256)
    mirror_ledger: Callable[[bytes], None]


class Background:
    """Queues and threads of one store; the public methods return at once unless they say otherwise."""

    def __init__(self, run: str, where: str, lease: Lease, actions: Actions) -> None:
        self.run = run
        self.where = where
        self.lease = lease
        self.actions = actions
        # Guards every field below; never held across I/O.
        self._cond = threading.Condition()
        self._uploads: deque[Job] = deque()
        self._removals: deque[Job] = deque()
        self._resumed: list[tuple[int, str]] = []
        self._resumed_dir = Path(".")
        self._removals_waiting = False  # the last look found no removal allowed; new work resets it
        self._active: Job | None = None
        self._progress: ProgressLog | None = None  # of the active upload
        self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)  # bytes/s of the last completed uploads
        self._ledger_path: Path | None = None
        self._ledger_dirty = False
        self._ledger_active = False
        self._error: str | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # -- the caller's side --------------------------------------------------------------------

    def start(self) -> None:
        for name, wants, step in (
            ("uploader", self._has_work, self._upload_step),
            ("ledger", lambda: self._ledger_dirty, self._mirror_step),
        ):
            thread = threading.Thread(target=self._worker, args=(wants, step), name=f"store-{name}-{self.run}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self) -> bool:
        """Stop the threads, waiting 2 s for all of them together; True if one is still stuck in a transfer
        (its daemon thread is abandoned: a pause must not wait on a store that does not answer)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + 2.0
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return any(thread.is_alive() for thread in self._threads)

    @property
    def error(self) -> str | None:
        return self._error

    def upload_rate(self) -> float | None:
        """Median bytes/s of the last RATE_SAMPLES uploads that sent bytes; None before the first."""
        with self._cond:
            rates = list(self._rates)
        return statistics.median(rates) if rates else None

    def backlog_bytes(self) -> int:
        """Bytes of the queued uploads plus what the one in flight has still to send."""
        with self._cond:
            left = sum(job.record.size for job in self._uploads)
            if self._active is not None and self._active.kind == "upload":
                sent = self._progress.done if self._progress is not None else 0
                left += max(0, self._active.record.size - sent)
        return left

    def add_upload(self, record: CheckpointRecord, run_dir: Path) -> None:
        self._add(Job("upload", record, run_dir))

    def add_removal(self, record: CheckpointRecord, run_dir: Path) -> None:
        """Queue a removal; a queued (not yet running) upload of the same record is dropped."""
        with self._cond:
            self._uploads = deque(j for j in self._uploads if j.record != record)
        self._add(Job("remove", record, run_dir))

    def resume_removals(self, removed: list[tuple[int, str]], run_dir: Path) -> None:
        pairs = [(int(epoch), str(sha256)) for epoch, sha256 in removed]  # JSON may hand lists, not tuples
        with self._cond:
            self._resumed.extend(p for p in pairs if p not in self._resumed)
            self._resumed_dir = run_dir
            self._removals_waiting = False
            self._cond.notify_all()

    def ledger_changed(self, path: Path) -> None:
        with self._cond:
            self._ledger_path = path
            self._ledger_dirty = True
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> list[str]:
        """Wait up to timeout_s for the queues to empty; list what is left. Blocks the caller."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._busy() and not self.lease.lost and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._pending()

    def _add(self, job: Job) -> None:
        with self._cond:
            queue = self._uploads if job.kind == "upload" else self._removals
            if job not in queue:
                queue.append(job)
            if job.kind == "remove":
                self._removals_waiting = False
            self._cond.notify_all()

    def _has_work(self) -> bool:
        return bool(self._uploads or self._resumed or (self._removals and not self._removals_waiting))

    def _busy(self) -> bool:
        return self._has_work() or bool(self._active or self._ledger_dirty or self._ledger_active)

    def _pending(self) -> list[str]:
        reason = "lease lost" if self.lease.lost else self._error or "not finished"
        jobs = ([self._active] if self._active else []) + list(self._uploads)
        out = [f"{job.describe()}: {reason}" for job in jobs]
        waits = "waits for a newer committed checkpoint" if self._removals_waiting and not self._error else reason
        out += [f"{job.describe()}: {waits}" for job in self._removals]
        out += [f"removal of a checkpoint of epoch {e} (sha256 {s[:12]}...) left by an earlier session: {reason}"
                for e, s in self._resumed]  # fmt: skip
        if self._ledger_dirty or self._ledger_active:
            out.append(f"mirror of the ledger: {reason}")
        return out

    # -- the threads --------------------------------------------------------------------------

    def wait_writable(self) -> bool:
        """Block until the lease allows writing; False when we must stop (closing, lost, failed)."""
        with self._cond:
            while not self._stopping and self._error is None and not self.lease.lost:
                if self.lease.held():
                    return True
                self._cond.wait(0.2)
        return False

    def fence(self) -> None:
        """Called by the actions right before every remote write: raise Fenced unless the lease is held."""
        if not self.wait_writable():
            raise Fenced

    def _fail(self, exc: StoreError) -> None:
        with self._cond:
            if self._stopping:
                return  # closing abandons a transfer: that is no fault of the store
            first = self._error is None
            if first:
                self._error = str(exc)
            self._cond.notify_all()
        if first:
            log.error("store %s: %s; uploads stop, the run should pause", self.where, exc)

    def _backoff(self, failures: int) -> None:
        delay = random.uniform(0, min(30.0, 0.5 * 2**failures))
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, timeout=delay)

    def _worker(self, wants: Callable[[], bool], step: Callable[[], None]) -> None:
        """Run `step` whenever `wants()` holds, until closing; failures back off, never spin."""
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or wants())
                if self._stopping:
                    return
            if not self.wait_writable():
                return
            try:
                step()
                failures = 0
            except Fenced:
                pass  # the job went back to its queue; wait_writable decides what comes next
            except Retry:
                failures += 1
                self._backoff(failures)
            except TransientStoreError as exc:  # each step logs its own; this is a safety net
                log.warning("background work of run %s failed (%s); will retry", self.run, exc)
                failures += 1
                self._backoff(failures)
            except StoreError as exc:
                self._fail(exc)
            except Exception:  # a bug must neither kill the thread silently nor make it spin
                log.exception("background work of run %s failed unexpectedly; it goes on", self.run)
                failures += 1
                self._backoff(failures)

    def _upload_step(self) -> None:
        """One unit of work: the next upload; else match resumed removals; else one allowed removal."""
        with self._cond:
            job = self._active = self._uploads.popleft() if self._uploads else None
            resumed, run_dir = list(self._resumed), self._resumed_dir
        if job is not None:
            self._run(job, self._timed_upload)
        elif resumed:
            self._match_resumed(resumed, run_dir)
        else:
            self._next_removal()

    def _timed_upload(self, job: Job) -> None:
        """The upload action, its bytes sent counted for backlog_bytes; one that sent bytes (not one found
        committed already) adds a rate sample, timed from its start to its commit, before the job counts
        as done."""
        progress = ProgressLog(f"upload of {job.record.path}", job.record.size)
        with self._cond:
            self._progress = progress
        started = time.monotonic()
        self.actions.upload(job, progress)
        if progress.done > 0:
            rate = job.record.size / max(time.monotonic() - started, 1e-6)
            with self._cond:
                self._rates.append(rate)

    def _match_resumed(self, pairs: list[tuple[int, str]], run_dir: Path) -> None:
        try:
            jobs = self.actions.match_resumed(pairs, run_dir)
        except (TransientStoreError, OSError) as exc:
            log.warning("listing the checkpoints in %s to resume removals failed (%s); will retry", self.where, exc)
            raise Retry from None
        with self._cond:
            self._resumed = [p for p in self._resumed if p not in pairs]
            self._removals.extend(j for j in jobs if j not in self._removals)
            self._removals_waiting = False
            self._cond.notify_all()
        if jobs:
            labels = ", ".join(j.record.label for j in jobs)
            log.info("resuming the removal of checkpoints %s left by an earlier session", labels)

    def _next_removal(self) -> None:
        """Run the first queued removal at a position before the latest remote commit; none: wait for an
        upload."""
        try:
            newest = self.actions.newest_committed()
        except (TransientStoreError, OSError) as exc:
            log.warning("looking up the committed checkpoints in %s failed (%s); will retry", self.where, exc)
            raise Retry from None
        with self._cond:
            if self._uploads:
                return  # an upload arrived meanwhile: it goes first
            job = next((j for j in self._removals if newest is not None and j.record.position < newest), None)
            if job is not None:
                self._removals.remove(job)
                self._active = job
            else:
                newly_waiting, self._removals_waiting = not self._removals_waiting, True
                waiting = [j.record.label for j in sorted(self._removals, key=lambda j: j.record.position)]
                self._cond.notify_all()
        if job is not None:
            self._run(job, self.actions.remove)
        elif newly_waiting and waiting:
            log.info(
                "removal of checkpoints %s waits: %s holds no committed checkpoint after them",
                ", ".join(waiting),
                self.where,
            )

    def _run(self, job: Job, action: Callable[[Job], None]) -> None:
        """Do `job`; one that may work later goes back to the head of its queue, one that cannot is dropped."""
        keep = True
        try:
            action(job)
            keep = False
        except LocalFileChanged as exc:
            keep = False
            log.warning("not uploading checkpoint %s: %s", job.record.label, exc)
        except (TransientStoreError, OSError) as exc:
            local = job.run_dir / job.record.path
            if job.kind == "upload" and not local.exists():
                keep = False
                log.warning("not uploading checkpoint %s: %s is gone", job.record.label, local)
                return
            log.warning("%s failed (%s); will retry", job.describe(), exc)
            raise Retry from None
        except (Fenced, StoreError):
            raise
        except Exception:
            keep = False
            log.exception("%s failed unexpectedly; dropped", job.describe())
        finally:
            with self._cond:
                if keep:
                    (self._uploads if job.kind == "upload" else self._removals).appendleft(job)
                self._active = self._progress = None
                if job.kind == "upload":
                    self._removals_waiting = False  # a new commit may allow a waiting removal
                self._cond.notify_all()

    def _mirror_step(self) -> None:
        """Write the latest ledger remotely; a failure marks it dirty again (a vanished file does not)."""
        with self._cond:
            path, self._ledger_dirty, self._ledger_active = self._ledger_path, False, True
        again = True
        try:
            if path is not None:
                data = path.read_bytes()
                self.fence()
                self.actions.mirror_ledger(data)
            again = False
        except FileNotFoundError:
            again = False
            log.warning("the ledger %s is gone; not mirroring it", path)
        except (TransientStoreError, OSError) as exc:
            log.warning("mirroring the ledger failed (%s); will retry", exc)
            raise Retry from None
        finally:
            with self._cond:
                self._ledger_active = False
                self._ledger_dirty = self._ledger_dirty or again
                self._cond.notify_all()
