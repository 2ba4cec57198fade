"""The run lifecycle: lock the run dir, read the ledger, launch attempts, record what happens, decide.

    start -> (launch attempt -> watch -> record -> decide)* -> completed | paused | gave up
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

from filelock import FileLock, Timeout

from supervisor import __version__, policy
from supervisor import ledger as L
from supervisor.attempt import Attempt, AttemptResult, AttemptSpec, event_rules
from supervisor.checkpoints import ANNOUNCED_SETTLE_S, Announced, Observed, hash_settled, remove_stale_temps
from supervisor.config import RunConfig
from supervisor.durable import atomic_write
from supervisor.faults import Fault
from supervisor.layout import RunLayout, describe_holder
from supervisor.monitors.disk import free_bytes
from supervisor.monitors.events import EventTail
from supervisor.oserrors import describe_os_error
from supervisor.platforms import Platform, detect
from supervisor.platforms.notices import NoticePoller
from supervisor.store.base import CheckpointRecord, Store, StoreError

log = logging.getLogger("supervisor")

EXIT_COMPLETED, EXIT_GAVE_UP, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 75
# A watch loop that did not run for this long was frozen; after it, the fencing question waits up to
# FENCE_WAIT_S for the lease thread (which wakes with it and renews at once) before anything is written.
FROZEN_S, FENCE_WAIT_S = 2.0, 3.0


class LockHeld(RuntimeError):
    """Another supervisor drives this run dir."""


class Watchdog:
    """Drives one run to completed (0), gave up (1) or paused (75); owns the watch loop and every decision."""

    def __init__(self, cfg: RunConfig, store: Store, platform: Platform | None = None, echo: bool = True):
        self.cfg = cfg
        self.store = store
        self.run_dir = cfg.resolved_run_dir()
        self.layout = RunLayout(self.run_dir)
        self.platform = platform or detect(cfg.platform.detect, cfg.platform.session_limit_s)
        self.echo = echo
        # The fencing question is settled by the lease thread; asking it never waits on the network.
        self.ledger = L.Ledger(self.layout.ledger, on_append=store.ledger_changed, fenced=store.lost_lease)
        self._pause_why: str | None = None
        self._attempt: Attempt | None = None
        p = cfg.platform
        self.notices = NoticePoller(p.spot, p.notice_poll_s, p.metadata_url)
        self._stop: Fault | None = None
        self._signals = 0
        self._resuming_from: int | None = None
        self._high_water_at_start = -1
        self._attempt_progressed = False
        self._launched_wall = 0.0
        self._last_tick = time.monotonic()
        self._pending: list[tuple[Announced, int, Future]] = []
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")

    # -- outside requests ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self._stop = Fault.STOPPED
        log.warning("received %s: stopping the trainer, then pausing the run", signal.Signals(signum).name)
        if self._signals > 1 and self._attempt is not None:
            log.warning("second signal: killing the trainer now")
            self._attempt.kill_tree()

    def stop_reason(self) -> Fault | None:
        """A pause asked for from outside (signal, STOP file, store failure, spot notice, clock); reads
        only what other threads concluded. Raises Fenced once another supervisor took the run."""
        if self.store.lost_lease():
            raise L.Fenced("this supervisor lost the run's lease")
        if self._stop is None and (error := self.store.permanent_error()) is not None:
            log.error("%s: pausing the run", error)
            self._stop, self._pause_why = Fault.STOPPED, error
        if self._stop is None and self.layout.stop_request.exists():
            self.layout.stop_request.unlink(missing_ok=True)
            log.warning("stop requested (supervisor stop): pausing the run")
            self._stop = Fault.STOPPED
        if self._stop is None and (notice := self.notices.notice()) is not None:
            log.warning("%s: pausing the run so it can resume on another machine", notice)
            self._stop = Fault.PREEMPTED
        deadline = self.platform.deadline(self.cfg.platform.stop_margin_s)
        if self._stop is None and deadline is not None and time.time() >= deadline:
            log.warning("%s session limit is near: pausing the run so it can resume elsewhere", self.platform.name)
            self._stop = Fault.TIME_LIMIT
        return self._stop

    def _check_fence(self) -> None:
        """After the loop did not run for FROZEN_S (SIGSTOP, a suspended VM), another supervisor may
        have taken the run: let the lease thread settle that (renewed, or lost) before anything is
        written. This is the only wait on the store, and only after a freeze, never in an outage."""
        now = time.monotonic()
        gap, self._last_tick = now - self._last_tick, now
        if gap > FROZEN_S and not self.store.writable(wait_s=FENCE_WAIT_S):
            raise L.Fenced(f"this supervisor was frozen for {gap:.0f}s and lost the run's lease meanwhile")

    # -- checkpoints --------------------------------------------------------------------------

    def view(self) -> L.RunView:
        return L.fold(self.ledger.facts())

    def hash_announced(self, announced: Announced, attempt: int, settle_s: float = ANNOUNCED_SETTLE_S) -> None:
        """A checkpoint was announced: hash it in the background so the watch loop never stalls."""
        self._pending.append((announced, attempt, self._hasher.submit(hash_settled, announced.path, settle_s)))

    def record_hashed(self, wait: bool = False) -> None:
        """Record announced checkpoints whose hashing finished, in announcement order."""
        while self._pending and (wait or self._pending[0][2].done()):
            announced, attempt, future = self._pending.pop(0)
            try:
                size, digest = future.result()
            except (OSError, ValueError) as exc:
                log.error("checkpoint of epoch %d at %s cannot be verified (%s): not recorded", announced.epoch,
                          announced.path, getattr(exc, "strerror", None) or exc)  # fmt: skip
                continue
            self._record_checkpoint(announced, attempt, size, digest)

    def _record_checkpoint(self, announced: Announced, attempt: int, size: int, digest: str) -> None:
        epoch, data = announced.epoch, announced.data
        claimed = data.get("sha256")
        if isinstance(claimed, str) and claimed != digest:
            log.error("checkpoint of epoch %d: sha256 differs from the trainer's claim: not recorded", epoch)
            return
        if isinstance(data.get("size"), int) and data["size"] != size:
            log.error("checkpoint of epoch %d: %d bytes, the trainer announced %d: not recorded", epoch, size,
                      data["size"])  # fmt: skip
            return
        try:
            rel = announced.path.resolve().relative_to(self.run_dir).as_posix()
        except ValueError:
            rel = str(announced.path.resolve())
        self.ledger.append(L.CHECKPOINT, epoch=epoch, path=rel, size=size, sha256=digest, attempt=attempt)
        if epoch > self._high_water_at_start:
            self._attempt_progressed = True
        self.store.checkpoint_verified(CheckpointRecord(epoch, rel, size, digest), self.run_dir)
        log.info("epoch %d checkpoint verified (%.1f MB, sha256 %s...)", epoch, size / 1e6, digest[:12])
        self.apply_retention(self.cfg.checkpoints.keep_last)

    def _take(self, seen: Observed, attempt: int, settle_s: float = ANNOUNCED_SETTLE_S) -> None:
        """Record what the attempt observed: metrics now, checkpoints once hashed (once they held still
        for settle_s: 0 when their writer is known to be dead)."""
        for epoch, metrics in seen.metrics:
            self.ledger.append(L.METRICS, epoch=epoch, metrics=metrics)
        for line in seen.refused:
            log.warning("attempt %d: %s", attempt, line)
            self.ledger.append(L.NOTE, attempt=attempt, note=line)
        for announced in seen.checkpoints:
            self.hash_announced(announced, attempt, settle_s)

    def apply_retention(self, keep_last: int) -> None:
        c = self.cfg.checkpoints
        view = self.view()
        protect = {self._resuming_from} if self._resuming_from is not None else set()
        for epoch in policy.retention(view, keep_last, c.keep_best, c.best_metric, c.best_mode, protect):
            record = view.checkpoints[epoch]
            self.ledger.append(L.CHECKPOINT_REMOVED, epoch=epoch, sha256=record.sha256, path=record.path,
                               why="retention")  # fmt: skip
            self.store.remove_checkpoint(record, self.run_dir)
            (self.run_dir / record.path).unlink(missing_ok=True)
            log.info("retention: removed checkpoint of epoch %d", epoch)

    def guard_disk(self, attempt: Attempt) -> None:
        """Below disk_min_free: prune old checkpoints and stale temp files; still below is `disk full`."""
        minimum = self.cfg.watch.disk_min_free
        if minimum is None or free_bytes(self.run_dir) >= minimum:
            return
        log.warning("free disk space below disk_min_free: pruning old checkpoints and unfinished writes")
        self.apply_retention(1)
        remove_stale_temps(self.layout.checkpoints, older_than=self._launched_wall - 2.0)
        if free_bytes(self.run_dir) < minimum:
            attempt.set_fault(Fault.DISK_FULL, f"free space below disk_min_free ({minimum} bytes)")

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.layout.lock))
            lock.acquire(timeout=0)
        except Timeout:
            raise LockHeld(f"run dir {self.run_dir} is in use by {describe_holder(self.run_dir)}; "
                           "stop it first (supervisor stop) or wait for it to end") from None  # fmt: skip
        except OSError as exc:
            return self._fs_failure(exc, can_record=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            atomic_write(self.layout.holder, lambda f: f.write(json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()))  # fmt: skip
            self.layout.stop_request.unlink(missing_ok=True)
            self.store.open()
            self.notices.start()
            if not self.layout.ledger.exists() and self.store.restore(self.run_dir):
                log.info("continuing the run found in %s", self.store.describe())
            for warning in self.ledger.open():
                log.warning("%s", warning)
            view = self.view()
            for warning in view.skipped:
                log.warning("ledger: %s", warning)
            self.store.resume_uploads(list(view.checkpoints.values()), self.run_dir)
            self.store.resume_removals(view.removed, self.run_dir)
            return self._drive()
        except L.Fenced:
            if self._attempt is not None:
                self._attempt.kill_tree()
            raise LockHeld(f"run '{self.cfg.name}' was taken over by another supervisor (its lease in "
                           f"{self.store.describe()} is lost): this one stopped writing") from None  # fmt: skip
        except OSError as exc:
            return self._fs_failure(exc, can_record=True)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.notices.close()
            self._hasher.shutdown(wait=True)
            self.store.close()
            with contextlib.suppress(OSError):
                self.layout.holder.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                lock.release()

    def _fs_failure(self, exc: OSError, can_record: bool) -> int:
        """An OS error on the supervisor's own files: stop the trainer, say what and how to fix it in one
        line, record it when the ledger can still be written; pause (75) when the condition may pass."""
        if self._attempt is not None:
            self._attempt.kill_tree()
        code, line = describe_os_error(exc, "write")
        if exc.errno == errno.ENOENT and can_record:
            line = (f"{exc.filename or self.run_dir} vanished while the run was going (was the run dir deleted?); "
                    "`supervisor start` again continues from the store, or starts afresh")
            code = EXIT_PAUSED
        log.error("%s", line)
        if can_record and self.ledger.opened:  # never onto a torn tail that could not be set aside
            with contextlib.suppress(OSError, L.Fenced):  # not a give-up: fixed, the same start continues
                self.ledger.append(L.RUN_ENDED, status=L.STATUS_PAUSED, diagnosis=line, not_uploaded=[])
        return code

    def _close_lost_attempt(self, view: L.RunView) -> None:
        """An attempt whose supervisor vanished: record what its events announced (checkpoints that are
        complete, metrics), then close it, before anything decides where to resume."""
        last = view.last
        if last is None or last.ended:
            return
        rules = event_rules(self.cfg, self.run_dir, last.start_epoch)
        rules.announced |= {f.get("epoch") for f in self.ledger.facts()  # recorded before it died: bytes may
                            if f.get("fact") == L.CHECKPOINT and f.get("attempt") == last.attempt}  # have rotted since
        fault: tuple[Fault, str] | None = None
        self._high_water_at_start, self._attempt_progressed = view.high_water, False
        for ev in EventTail(self.layout.attempt_events(last.attempt)).poll():
            seen = rules.feed(ev, accepting=fault is None)
            fault = fault or seen.fault
            self._take(seen, last.attempt, settle_s=0.0)  # the shim killed its writer with the watchdog
        self.record_hashed(wait=True)
        reason, detail = Fault.SESSION_LOST, "the supervisor driving it vanished"
        if fault is not None:
            reason, detail = fault[0], f"{fault[1]} (read from its events after the supervisor vanished)"
        self.ledger.append(L.ATTEMPT_ENDED, attempt=last.attempt, fault=reason.value, exit="unknown",
                           failed_epoch=rules.epoch, steps=rules.steps, progressed=self._attempt_progressed,
                           tail=[], detail=detail)  # fmt: skip
        log.warning("attempt %d was left running by a supervisor that vanished: closed as '%s'%s", last.attempt,
                    reason.value, f", its events up to epoch {rules.epoch} read" if rules.steps else "")  # fmt: skip

    def _drive(self) -> int:
        cfg = self.cfg
        self._close_lost_attempt(self.view())
        view = self.view()
        self.ledger.append(L.SESSION_STARTED, pid=os.getpid(), host=socket.gethostname(), version=__version__,
                           store=self.store.describe(), platform=self.platform.name)  # fmt: skip
        self._write_params()
        decision = policy.first_launch(view, cfg.seeds.pool, cfg.name, cfg.epochs)
        while True:
            if isinstance(decision, policy.Complete):
                return self._end(L.STATUS_COMPLETED, EXIT_COMPLETED, "all epochs verified")
            if isinstance(decision, policy.Pause):
                return self._end(L.STATUS_PAUSED, EXIT_PAUSED, decision.reason)
            if isinstance(decision, policy.GiveUp):
                log.error("giving up: %s", decision.diagnosis)
                return self._end(L.STATUS_GAVE_UP, EXIT_GAVE_UP, decision.diagnosis)
            if decision.delay_s > 0:
                log.info("waiting %.1fs before the next attempt", decision.delay_s)
                if self._wait(decision.delay_s):
                    return self._end(L.STATUS_PAUSED, EXIT_PAUSED, self._stop.value)
            if self.stop_reason() is not None:
                return self._end(L.STATUS_PAUSED, EXIT_PAUSED, self._stop.value)
            decision = self._run_attempt(decision)

    def _wait(self, seconds: float) -> bool:
        """Sleep, waking early for a stop request; True if one came."""
        deadline = seconds + (now := time.monotonic())
        self._last_tick = now
        while time.monotonic() < deadline:
            self._check_fence()
            if self.stop_reason() is not None:
                return True
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return False

    def _resume_source(self, load_epoch: int) -> tuple[int, CheckpointRecord | None]:
        """The checkpoint to load, made local and whole; falls back to older ones that are not."""
        while load_epoch >= 0:
            view = self.view()
            record = view.checkpoints.get(load_epoch)
            if record is not None and self.store.ensure_local(record, self.run_dir):
                return load_epoch, record
            why = "missing from the ledger" if record is None else "missing or corrupt (sha256 mismatch)"
            if record is not None:
                self.ledger.append(L.CHECKPOINT_UNAVAILABLE, epoch=load_epoch, sha256=record.sha256, why=why)
            log.warning("checkpoint of epoch %d is %s: falling back to the previous verified one", load_epoch, why)
            load_epoch = policy.resume_epoch(self.view(), before=load_epoch)
        return -1, None

    def _run_attempt(self, launch: policy.Launch) -> policy.Decision:
        cfg = self.cfg
        try:
            load_epoch, record = self._resume_source(launch.load_epoch)
        except StoreError as exc:
            log.error("cannot fetch the checkpoint to resume from: %s", exc)
            self._pause_why = str(exc)
            return policy.Pause(Fault.STOPPED.value)
        view = self.view()
        number = view.next_attempt
        spec = AttemptSpec(
            attempt=number, seed=launch.seed, load_epoch=load_epoch, batch_divisor=launch.batch_divisor,
            load_path=(self.run_dir / record.path) if record else None, load_sha256=record.sha256 if record else None,
        )  # fmt: skip
        self._resuming_from = load_epoch if load_epoch >= 0 else None
        self._high_water_at_start = view.high_water
        self._attempt_progressed = False
        remove_stale_temps(self.layout.checkpoints)  # no trainer runs now: every temp file is a dead attempt's
        attempt = self._attempt = Attempt(cfg, self.run_dir, spec, echo=self.echo)
        self._launched_wall = time.time()
        argv = attempt.launch()
        self.ledger.append(L.ATTEMPT_STARTED, attempt=number, seed=spec.seed, load_epoch=load_epoch,
                           start_epoch=spec.start_epoch, reason=launch.reason, batch_divisor=spec.batch_divisor,
                           pid=attempt.proc.pid, host=socket.gethostname(), command=argv)  # fmt: skip
        note = f" ({launch.note})" if launch.note else ""
        log.info("attempt %d: epoch %d from checkpoint %d, seed %d, reason '%s'%s", number, spec.start_epoch,
                 load_epoch, spec.seed, launch.reason, note)  # fmt: skip
        result = self._watch(attempt)
        self.record_hashed(wait=True)
        view = self.view()
        fault, detail = result.fault, result.detail
        if fault is None and not policy.is_complete(view, cfg.epochs):
            fault = Fault.CRASH
            detail = f"exited 0 before the checkpoint of epoch {cfg.epochs - 1} was verified"
        self.ledger.append(L.ATTEMPT_ENDED, attempt=number, fault=fault.value if fault else None, exit=result.exit,
                           failed_epoch=result.failed_epoch, steps=result.steps, progressed=self._attempt_progressed,
                           detail=detail, tail=result.tail, detected_at=result.detected_at)  # fmt: skip
        self._attempt = None
        if fault is not None:
            log.info("attempt %d ended: %s (%s)", number, fault.value, result.exit)
        return policy.decide(self.view(), cfg.restart, cfg.seeds.pool, cfg.name, cfg.epochs, random.random())

    def _watch(self, attempt: Attempt) -> AttemptResult:
        """The watch loop: take what the attempt observed, ask it to stop when a pause is due, until it ends.
        Nothing here waits on the store or the network."""
        number = attempt.spec.attempt
        next_disk = self._last_tick = time.monotonic()
        while True:
            self._check_fence()
            seen, rc = attempt.poll()
            self._take(seen, number)
            self.record_hashed()
            if attempt.pump.write_error is not None:
                raise attempt.pump.write_error
            if attempt.fault is None and (reason := self.stop_reason()) is not None:
                attempt.set_fault(reason, "pause requested")  # before the exit check: our kill may end it
            if rc is not None:
                break
            if attempt.fault is None and time.monotonic() >= next_disk:
                next_disk = time.monotonic() + 2.0
                self.guard_disk(attempt)
            attempt.enforce()
            time.sleep(self.cfg.watch.poll_interval_s)
        result, seen = attempt.finish(rc)
        self._take(seen, number)
        if attempt.pump.write_error is not None:
            raise attempt.pump.write_error
        return result

    def _write_params(self) -> None:
        data = json.dumps(self.cfg.trainer.params, indent=2, sort_keys=True).encode()
        atomic_write(self.layout.params, lambda f: f.write(data))

    def _end(self, status: str, code: int, why: str) -> int:
        budget = self.cfg.storage.drain_timeout_s if self.cfg.storage else 0.0
        missing = self.store.drain(budget)
        if missing:
            log.warning("not yet in %s (the next start uploads them): %s", self.store.describe(), ", ".join(missing))
        why = self._pause_why or why
        self.ledger.append(L.RUN_ENDED, status=status, diagnosis=why, not_uploaded=missing)
        if not missing:  # the last ledger line itself; after a drain that timed out it would time out too
            self.store.drain(min(budget, 30.0))
        log.info("run %s: %s (%s)", status, self.cfg.name, why)
        return code
