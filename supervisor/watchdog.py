"""The run lifecycle: lock the run dir, read the ledger, launch attempts, record what happens, decide.

    start -> (launch attempt -> watch -> record -> decide)* -> completed | paused | gave up
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from supervisor import __version__, policy
from supervisor import ledger as L
from supervisor.attempt import Attempt, AttemptSpec, Hooks
from supervisor.config import RunConfig
from supervisor.durable import atomic_write, sha256_file
from supervisor.faults import Fault
from supervisor.layout import RunLayout
from supervisor.platforms import Platform, detect
from supervisor.platforms.notices import NoticePoller
from supervisor.store.base import CheckpointRecord, Store, StoreError

log = logging.getLogger("supervisor")

EXIT_COMPLETED, EXIT_GAVE_UP, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 75


def _size_and_sha256(path: Path) -> tuple[int, str]:
    return path.stat().st_size, sha256_file(path)


class LockHeld(RuntimeError):
    """Another supervisor drives this run dir."""


def holder_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads(RunLayout(run_dir).holder.read_text())
    except (OSError, ValueError):
        return {}


def describe_holder(run_dir: Path) -> str:
    h = holder_info(run_dir)
    if not h:
        return "another supervisor"
    age = time.time() - float(h.get("started", time.time()))
    return f"pid {h.get('pid')} on host {h.get('host')} (running for {age:.0f}s)"


class Watchdog:
    """Drives one run to completed (0), gave up (1) or paused (75)."""

    def __init__(self, cfg: RunConfig, store: Store, platform: Platform | None = None, echo: bool = True):
        self.cfg = cfg
        self.store = store
        self.run_dir = cfg.resolved_run_dir()
        self.layout = RunLayout(self.run_dir)
        self.platform = platform or detect(cfg.platform.detect, cfg.platform.session_limit_s)
        self.echo = echo
        self.ledger = L.Ledger(self.layout.ledger, on_append=store.ledger_changed,
                               fenced=lambda: not store.writable(wait_s=5.0))  # fmt: skip
        self._pause_why: str | None = None
        self._attempt: Attempt | None = None
        p = cfg.platform
        self.notices = NoticePoller(p.spot, p.notice_poll_s, p.metadata_url)
        self._stop: Fault | None = None
        self._signals = 0
        self._resuming_from: int | None = None
        self._high_water_at_start = -1
        self._attempt_progressed = False
        self._pending: list[tuple[int, Path, dict, Future]] = []
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
        if self.store.lost_lease():
            if self._attempt is not None:
                self._attempt.kill_tree()  # fencing: another supervisor drives the run now
            return Fault.STOPPED
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

    # -- checkpoints --------------------------------------------------------------------------

    def view(self) -> L.RunView:
        return L.fold(self.ledger.facts())

    def on_checkpoint(self, epoch: int, path: Path, data: dict) -> None:
        """A checkpoint was announced: hash it in the background so the watch loop never stalls."""
        self._pending.append((epoch, path, data, self._hasher.submit(_size_and_sha256, path)))

    def record_hashed(self, wait: bool = False) -> None:
        """Record announced checkpoints whose hashing finished, in announcement order."""
        while self._pending and (wait or self._pending[0][3].done()):
            epoch, path, data, future = self._pending.pop(0)
            try:
                size, digest = future.result()
            except OSError as exc:
                log.error("checkpoint of epoch %d at %s cannot be read (%s): not recorded", epoch, path, exc.strerror)
                continue
            self._record_checkpoint(epoch, path, data, size, digest)

    def _record_checkpoint(self, epoch: int, path: Path, data: dict, size: int, digest: str) -> None:
        claimed = data.get("sha256")
        if isinstance(claimed, str) and claimed != digest:
            log.error("checkpoint of epoch %d: sha256 differs from the trainer's claim: not recorded", epoch)
            return
        try:
            rel = path.resolve().relative_to(self.run_dir).as_posix()
        except ValueError:
            rel = str(path.resolve())
        self.ledger.append(L.CHECKPOINT, epoch=epoch, path=rel, size=size, sha256=digest,
                           attempt=self._attempt.spec.attempt)  # fmt: skip
        if epoch > self._high_water_at_start:
            self._attempt_progressed = True
        record = CheckpointRecord(epoch, rel, size, digest)
        self.store.checkpoint_verified(record, self.run_dir)
        log.info("epoch %d checkpoint verified (%.1f MB, sha256 %s...)", epoch, size / 1e6, digest[:12])
        self.apply_retention(self.cfg.checkpoints.keep_last)

    def on_metrics(self, epoch: int, metrics: dict) -> None:
        self.ledger.append(L.METRICS, epoch=epoch, metrics=metrics)

    def apply_retention(self, keep_last: int) -> None:
        c = self.cfg.checkpoints
        view = self.view()
        protect = {self._resuming_from} if self._resuming_from is not None else set()
        for epoch in policy.retention(view, keep_last, c.keep_best, c.best_metric, c.best_mode, protect):
            record = view.checkpoints[epoch]
            self.store.remove_checkpoint(record, self.run_dir)
            (self.run_dir / record.path).unlink(missing_ok=True)
            self.ledger.append(L.CHECKPOINT_REMOVED, epoch=epoch, sha256=record.sha256, why="retention")
            log.info("retention: removed checkpoint of epoch %d", epoch)

    def on_disk_low(self) -> bool:
        from supervisor.monitors.disk import free_bytes

        log.warning("free disk space below disk_min_free: pruning old checkpoints")
        self.apply_retention(1)
        return free_bytes(self.run_dir) >= (self.cfg.watch.disk_min_free or 0)

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.layout.lock))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise LockHeld(f"run dir {self.run_dir} is in use by {describe_holder(self.run_dir)}; "
                           "stop it first (supervisor stop) or wait for it to end") from None  # fmt: skip
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            atomic_write(self.layout.holder, lambda f: f.write(json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()))  # fmt: skip
            self.layout.stop_request.unlink(missing_ok=True)
            self.store.open()
            self.notices.start()
            if not self.ledger.path.exists() and self.store.restore(self.run_dir):
                log.info("continuing the run found in %s", self.store.describe())
            self.store.resume_uploads(list(self.view().checkpoints.values()), self.run_dir)
            return self._drive()
        except L.Fenced:
            if self._attempt is not None:
                self._attempt.kill_tree()
            raise LockHeld(f"run '{self.cfg.name}' was taken over by another supervisor (its lease in "
                           f"{self.store.describe()} is lost): this one stopped writing") from None  # fmt: skip
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.notices.close()
            self._hasher.shutdown(wait=True)
            self.store.close()
            self.layout.holder.unlink(missing_ok=True)
            lock.release()

    def _close_lost_attempt(self, view: L.RunView) -> None:
        last = view.last
        if last is not None and not last.ended:
            self.ledger.append(L.ATTEMPT_ENDED, attempt=last.attempt, fault=Fault.SESSION_LOST.value,
                               exit="unknown", failed_epoch=view.high_water + 1, steps=0, progressed=False,
                               tail=[], detail="the supervisor driving it vanished")  # fmt: skip
            log.warning("attempt %d was left running by a supervisor that vanished: closed as 'session lost'",
                        last.attempt)  # fmt: skip

    def _drive(self) -> int:
        cfg = self.cfg
        view = self.view()
        self._close_lost_attempt(view)
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
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
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
        number = len(view.attempts)
        spec = AttemptSpec(
            attempt=number, seed=launch.seed, load_epoch=load_epoch, batch_divisor=launch.batch_divisor,
            load_path=(self.run_dir / record.path) if record else None, load_sha256=record.sha256 if record else None,
        )  # fmt: skip
        self._resuming_from = load_epoch if load_epoch >= 0 else None
        self._high_water_at_start = view.high_water
        self._attempt_progressed = False
        hooks = Hooks(self.on_checkpoint, self.on_metrics, self.stop_reason, self.on_disk_low, self.record_hashed)
        attempt = self._attempt = Attempt(cfg, self.run_dir, spec, hooks, echo=self.echo)
        argv = attempt.launch()
        self.ledger.append(L.ATTEMPT_STARTED, attempt=number, seed=spec.seed, load_epoch=load_epoch,
                           start_epoch=spec.start_epoch, reason=launch.reason, batch_divisor=spec.batch_divisor,
                           pid=attempt.proc.pid, host=socket.gethostname(), command=argv)  # fmt: skip
        note = f" ({launch.note})" if launch.note else ""
        log.info("attempt %d: epoch %d from checkpoint %d, seed %d, reason '%s'%s", number, spec.start_epoch,
                 load_epoch, spec.seed, launch.reason, note)  # fmt: skip
        result = attempt.run()
        self.record_hashed(wait=True)
        view = self.view()
        fault = result.fault
        detail = result.detail
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
        self.store.drain(min(budget, 30.0))  # the last ledger line itself
        log.info("run %s: %s (%s)", status, self.cfg.name, why)
        return code
