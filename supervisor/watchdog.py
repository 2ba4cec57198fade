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
from supervisor import deadline as D
from supervisor import ledger as L
from supervisor.attempt import Attempt, AttemptResult, AttemptSpec, event_rules
from supervisor.checkpoints import (
    ANNOUNCED_SETTLE_S,
    Announced,
    EventRules,
    Observed,
    hash_settled,
    position,
    remove_stale_temps,
)
from supervisor.config import RunConfig
from supervisor.durable import atomic_write
from supervisor.exits import EXIT_COMPLETED, EXIT_GAVE_UP, EXIT_PAUSED, EXIT_USAGE
from supervisor.faults import Fault
from supervisor.layout import RunLayout, describe_holder
from supervisor.leader import Leading
from supervisor.monitors.disk import free_bytes
from supervisor.monitors.events import EventTail
from supervisor.nodes import Coordination, LeaderLink, new_session
from supervisor.oserrors import describe_os_error
from supervisor.platforms import Platform, detect
from supervisor.platforms.notices import NoticePoller
from supervisor.recording import Recording
from supervisor.store.base import END_OF_EPOCH, CheckpointRecord, Store, StoreError

log = logging.getLogger("supervisor")

# A watch loop that did not run for this long was frozen; after it, the fencing question waits up to
# FENCE_WAIT_S for the lease thread (which wakes with it and renews at once) before anything is written.
FROZEN_S, FENCE_WAIT_S = 2.0, 3.0
LIVE_EVERY_S = 2.0  # live.json (supervisor status) is rewritten this often during an attempt


class LockHeld(RuntimeError):
    """Another supervisor drives this run dir."""


class Watchdog(Leading, Recording):
    """Drives one run to completed (0), gave up (1) or paused (75); owns the watch loop and every decision."""

    def __init__(self, cfg: RunConfig, store: Store, platform: Platform | None = None, echo: bool = True):
        self.cfg = cfg
        self.store = store
        self.run_dir = cfg.resolved_run_dir()
        self.layout = RunLayout(self.run_dir)
        self.platform = platform or detect(cfg.platform.detect, cfg.platform.session_limit_s)
        self.echo = echo
        # The fencing question is settled by the lease thread; asking it never waits on the network.
        self.ledger = L.Ledger(self.layout.ledger, on_append=self._ledger_changed, fenced=store.lost_lease)
        self.trackers = None  # [record] trackers: opened at start (recording.py)
        self._pause_why: str | None = None
        self._attempt: Attempt | None = None
        p = cfg.platform
        self.notices = NoticePoller(p.spot, p.notice_poll_s, p.metadata_url, window_s=p.notice_window_s)
        self._stop: Fault | None = None
        self._signals = 0
        self._resuming_from: int | None = None
        self._high_water_at_start = -1
        self._attempt_progressed = False
        self._launched_wall = 0.0
        self._last_tick = time.monotonic()
        self._pending: list[tuple[Announced, int, Future]] = []
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._deadline: float | None = None  # unix time the machine goes away, once a pause knows it
        self.costs = D.Costs()  # measured this session; earlier sessions' in the ledger's plan facts
        self._interval: float | None = None  # every_s = "auto": the interval chosen last
        self._interval_measured = False  # ... from measured costs (not the first probe)
        self._interval_why: str | None = None
        self._lost_rules: tuple[int, EventRules] | None = None  # a lost attempt's events, for its work lost
        self._early: dict | None = None  # an [[early_stop]] rule that fired during the attempt
        self._earlier_costs = D.Costs()
        self.noun = "step" if cfg.unit == "steps" else "epoch"
        # Several nodes: this is the leader (node_rank 0); the others follow what it publishes (nodes.py).
        self.coord = Coordination(store.backend) if cfg.trainer.nnodes > 1 else None  # type: ignore[attr-defined]
        self.session = new_session()
        self._link: LeaderLink | None = None

    # -- outside requests ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        grace = self.cfg.platform.sigterm_grace_s
        if self._signals == 1 and grace is not None and signum == signal.SIGTERM:
            self._deadline = time.time() + grace  # SIGKILL follows: everything must be committed before it
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
            self._deadline = self.notices.deadline
            left = f" ({self._deadline - time.time():.0f}s left)" if self._deadline else ""
            log.warning("%s%s: pausing the run so it can resume on another machine", notice, left)
            self._stop = Fault.PREEMPTED
        end = self.platform.session_end
        if self._stop is None and end is not None:
            margin = D.time_limit_margin(self.current_costs(), self.cfg.platform.stop_margin_s, self._backlog())
            if time.time() >= end - margin:
                log.warning("%s session limit is near (%.0fs left, the final checkpoint needs %.0fs): pausing the "
                            "run so it can resume elsewhere", self.platform.name, end - time.time(),
                            margin)  # fmt: skip
                self._deadline = end
                self._stop = Fault.TIME_LIMIT
        return self._stop

    # -- the deadline plan ----------------------------------------------------------------------

    def _backlog(self) -> int:
        return self.store.backlog_bytes()

    def current_costs(self) -> D.Costs:
        """What this session measured, the rest from earlier sessions (the ledger's plan) or the config."""
        costs = self.costs
        rate = self.store.upload_rate()
        if rate:
            costs.upload_bps = rate
        attempt = self._attempt
        if attempt is not None and (step_s := D.median_interval(attempt.rules.step_times)) is not None:
            costs.step_s = step_s
        merged = costs.merged(self._earlier_costs)
        if merged.upload_bps is None and self.cfg.platform.upload_speed:
            merged.upload_bps = float(self.cfg.platform.upload_speed)
        return merged

    def _time_left(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.time()

    def _pause_grace(self) -> float | None:
        """The SIGTERM-to-SIGKILL grace of a pause with a deadline: what is left before the upload must start."""
        left = self._time_left()
        if left is None:
            return None
        budget = D.pause_budget(left, self.current_costs(), self._backlog(), self.cfg.watch.stop_grace_s)
        return min(self.cfg.watch.stop_grace_s, budget)

    def _measure(self, announced: Announced, attempt: Attempt | None) -> None:
        """What saving `announced` cost: the trainer's own figures (stall_s, write_s), else the time from the
        request to the announcement. What it cost training is measured once it is verified (_measure_cost)."""
        d = announced.data
        stall, write = D.seconds(d.get("stall_s")), D.seconds(d.get("write_s"))
        if stall is not None:
            self.costs.stall_s = stall
            self.costs.save_s = stall + (write or 0.0)
        elif attempt is not None and isinstance(rid := d.get("request"), int) and rid in attempt.requests:
            took = (D.seconds(d.get("t")) or time.time()) - attempt.requests[rid][1]
            if took >= 0:
                self.costs.save_s = took

    def _measure_cost(self, announced: Announced) -> None:
        """The training time a mid-epoch checkpoint took away, from its start (its announcement minus the
        trainer's stall_s + write_s) until now that we hashed it too: the steps training did not make meanwhile
        (the save and our hash compete with it for the CPU). Epoch ends are left out (evaluation precedes them)."""
        attempt, d = self._attempt, announced.data
        stall, write = D.seconds(d.get("stall_s")), D.seconds(d.get("write_s"))
        if attempt is None or announced.step is None or stall is None:
            return
        step_s = D.median_interval(attempt.rules.step_times)
        announced_t = D.seconds(d.get("t"))
        if step_s and announced_t:
            window = (announced_t - stall - (write or 0.0), max(time.time(), announced_t))
            self.costs.cost_s = D.save_cost(window, attempt.rules.step_times, step_s, stall)

    def _periodic(self, attempt: Attempt) -> None:
        """`[checkpoints] every_s`: ask for a mid-epoch checkpoint once that much training time has passed since
        the attempt's last checkpoint (or its first step); "auto" chooses the interval from measured costs."""
        every = self.cfg.checkpoints.every_s
        rules = attempt.rules
        if every is None or attempt.fault is not None or not attempt.handles_requests or rules.first_step_t is None:
            return
        if every == "auto":
            every, why = D.auto_interval(self.current_costs(), self.cfg.checkpoints.auto_overhead)
            measured = not why.startswith(D.PROBE_WHY)
            if self._interval is None or abs(every - self._interval) > 0.2 * self._interval or (
                    measured and not self._interval_measured):  # fmt: skip
                self._interval, self._interval_measured, self._interval_why = every, measured, why
                log.info("checkpoints every %.0fs of training (every_s = auto: %s)", every, why)
                self.ledger.append(L.PLAN, **self.current_costs().fields(), every_s=round(every, 1), why=why)
        since = max(rules.first_step_t, rules.last_checkpoint_t() or 0.0)
        outstanding = attempt.outstanding()
        if outstanding is not None and time.time() - attempt.requests[outstanding][1] < every:
            return  # asked already; a request unanswered for a whole interval is asked again
        if time.time() - since >= every:
            attempt.request_checkpoint("every_s")

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
                log.error("checkpoint of %s at %s cannot be verified (%s): not recorded", announced.label,
                          announced.path, getattr(exc, "strerror", None) or exc)  # fmt: skip
                continue
            self._record_checkpoint(announced, attempt, size, digest)

    def _record_checkpoint(self, announced: Announced, attempt: int, size: int, digest: str) -> None:
        epoch, step, data, label = announced.epoch, announced.step, announced.data, announced.label
        claimed = data.get("sha256")
        if isinstance(claimed, str) and claimed != digest:
            log.error("checkpoint of %s: sha256 differs from the trainer's claim: not recorded", label)
            return
        if isinstance(data.get("size"), int) and data["size"] != size:
            log.error("checkpoint of %s: %d bytes, the trainer announced %d: not recorded", label, size,
                      data["size"])  # fmt: skip
            return
        try:
            rel = announced.path.resolve().relative_to(self.run_dir).as_posix()
        except ValueError:
            rel = str(announced.path.resolve())
        at = {} if step is None else {"step": step}
        self.ledger.append(L.CHECKPOINT, epoch=epoch, **at, path=rel, size=size, sha256=digest, attempt=attempt)
        if announced.summary is not None:
            self.ledger.append(L.TRAIN, epoch=epoch, **announced.summary)
        if step is None and epoch > self._high_water_at_start:
            self._attempt_progressed = True
        self.costs.size = size
        self._measure_cost(announced)
        self.store.checkpoint_verified(CheckpointRecord(epoch, rel, size, digest, step), self.run_dir)
        log.info("%s checkpoint verified (%.1f MB, sha256 %s...)", label, size / 1e6, digest[:12])
        self._drop_partials(lambda pos: pos < announced.position, "superseded")
        self.apply_retention(self.cfg.checkpoints.keep_last)

    def _drop_partials(self, which: object, why: str) -> None:
        """Remove the mid-epoch checkpoints whose position `which` selects: `superseded` once a later checkpoint
        is verified, `abandoned` when an attempt resumes from an earlier point (their line of training ended)."""
        for pos, record in sorted(self.view().partials.items()):
            if not which(pos):  # type: ignore[operator]
                continue
            self.ledger.append(L.CHECKPOINT_REMOVED, epoch=record.epoch, step=record.step, sha256=record.sha256,
                               path=record.path, why=why)  # fmt: skip
            self.store.remove_checkpoint(record, self.run_dir)
            (self.run_dir / record.path).unlink(missing_ok=True)
            log.info("removed the %s checkpoint of %s", why, record.label)

    def _take(self, seen: Observed, attempt: int, settle_s: float = ANNOUNCED_SETTLE_S) -> None:
        """Record what the attempt observed: metrics now, checkpoints once hashed (once they held still
        for settle_s: 0 when their writer is known to be dead)."""
        for epoch, metrics in seen.metrics:
            self.ledger.append(L.METRICS, epoch=epoch, metrics=metrics)
        for line in seen.refused:
            log.warning("attempt %d: %s", attempt, line)
            self.ledger.append(L.NOTE, attempt=attempt, note=line)
        for announced in seen.checkpoints:
            self._measure(announced, self._attempt)
            self.hash_announced(announced, attempt, 0.0 if announced.claims_sha256 else settle_s)

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
            log.info("retention: removed checkpoint of %s %d", self.noun, epoch)

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
            if self.coord is not None:
                self.coord.set_session(self.session, L.STATUS_RUNNING)
                log.info("leader of %d nodes: each attempt is published in %s for the others", self.cfg.trainer.nnodes,
                         self.store.describe())  # fmt: skip
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
            if not self.open_trackers():
                return EXIT_USAGE
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
            self.close_trackers()
            self._hasher.shutdown(wait=True)
            self.store.close()
            with contextlib.suppress(OSError):
                self.layout.holder.unlink(missing_ok=True)
                self.layout.live.unlink(missing_ok=True)
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
        rules = event_rules(self.cfg, self.run_dir, last.start_epoch, last.start_step)
        rules.announced |= {position(f.get("epoch"), f.get("step")) for f in self.ledger.facts()  # recorded before
                            if f.get("fact") == L.CHECKPOINT and f.get("attempt") == last.attempt}  # it died; bytes
        # may have rotted since: not hashed again
        fault: tuple[Fault, str] | None = None
        self._high_water_at_start, self._attempt_progressed = view.high_water, False
        for ev in EventTail(self.layout.attempt_events(last.attempt)).poll():
            seen = rules.feed(ev, accepting=fault is None)
            fault = fault or seen.fault
            self._take(seen, last.attempt, settle_s=0.0)  # the shim killed its writer with the watchdog
        self.record_hashed(wait=True)
        self._lost_rules = (last.attempt, rules)
        reason, detail = Fault.SESSION_LOST, "the supervisor driving it vanished"
        if fault is not None:
            reason, detail = fault[0], f"{fault[1]} (read from its events after the supervisor vanished)"
        self.ledger.append(L.ATTEMPT_ENDED, attempt=last.attempt, fault=reason.value, exit="unknown",
                           failed_epoch=rules.epoch, steps=rules.steps, progressed=self._attempt_progressed,
                           tail=[], detail=detail)  # fmt: skip
        log.warning("attempt %d was left running by a supervisor that vanished: closed as '%s'%s", last.attempt,
                    reason.value,
                    f", its events up to {self.noun} {rules.epoch} read" if rules.steps else "")  # fmt: skip

    def _drive(self) -> int:
        cfg = self.cfg
        view = self.view()
        if view.attempts and view.unit != cfg.unit:
            log.error("run '%s' counts %s in its record (%s), but run.toml now says `%s = ...`: a run keeps its unit; "
                      "give the run a new name (or run_dir) to count %s", cfg.name, view.unit, self.layout.ledger,
                      cfg.unit, cfg.unit)  # fmt: skip
            return EXIT_USAGE
        self._close_lost_attempt(view)
        view = self.view()
        record = cfg.record.model_dump(exclude={"trackers", "mlflow_uri"})
        init = None if cfg.init is None else cfg.init.model_dump(exclude_none=True)
        self.ledger.append(L.SESSION_STARTED, pid=os.getpid(), host=socket.gethostname(), version=__version__,
                           store=self.store.describe(), platform=self.platform.name, unit=cfg.unit,
                           params=cfg.trainer.params, record=record, init=init)  # fmt: skip
        if (code := self._inherit()) is not None:
            return code
        view = self.view()
        self._write_params()
        self._earlier_costs = D.Costs.from_plan(view.plan)
        self._plan_warnings()
        decision = policy.first_launch(view, cfg.seeds.pool, cfg.name, cfg.span)
        if not cfg.checkpoints.require_last and view.status == L.STATUS_COMPLETED:
            decision = policy.Complete()  # it ended with an exit 0 before (require_last = false)
        if view.status == L.STATUS_EARLY_STOPPED and (fired := self._early_fired(view)) is not None:
            decision = policy.EarlyStop(f"{fired['rule']} (still: {fired['metric']} {fired['value']:g} at "
                                        f"{self.noun} {fired['epoch']})")  # fmt: skip
        if self._lost_rules is not None:
            self._record_lost(*self._lost_rules, decision)
        while True:
            if isinstance(decision, policy.Complete):
                done = policy.is_complete(self.view(), cfg.span)
                why = f"all {cfg.unit} verified" if done else "the trainer exited 0 (checkpoints.require_last = false)"
                return self._end(L.STATUS_COMPLETED, EXIT_COMPLETED, why)
            if isinstance(decision, policy.Pause):
                return self._end(L.STATUS_PAUSED, EXIT_PAUSED, decision.reason)
            if isinstance(decision, policy.GiveUp):
                log.error("giving up: %s", decision.diagnosis)
                return self._end(L.STATUS_GAVE_UP, EXIT_GAVE_UP, decision.diagnosis)
            if isinstance(decision, policy.EarlyStop):
                log.info("early stop: %s", decision.diagnosis)
                return self._end(L.STATUS_EARLY_STOPPED, EXIT_COMPLETED, decision.diagnosis)
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

    def _resume_source(self, load_epoch: int, load_step: int | None = None) -> tuple[int, CheckpointRecord | None]:
        """The checkpoint to load, made local and whole; falls back to older ones that are not (a mid-epoch
        checkpoint that cannot be had falls back to the end of the epoch before)."""
        if load_step is not None:
            record = self.view().partials.get((load_epoch, load_step))
            if record is not None and self.store.ensure_local(record, self.run_dir):
                return load_epoch, record
            if record is not None:
                self.ledger.append(L.CHECKPOINT_UNAVAILABLE, epoch=load_epoch, step=load_step, sha256=record.sha256,
                                   why="missing or corrupt (sha256 mismatch)")  # fmt: skip
            log.warning("checkpoint of epoch %d step %d cannot be had: falling back to the previous verified one",
                        load_epoch, load_step)  # fmt: skip
            load_epoch = policy.resume_epoch(self.view(), before=load_epoch)
        while load_epoch >= 0:
            view = self.view()
            record = view.checkpoints.get(load_epoch)
            if record is not None and self.store.ensure_local(record, self.run_dir):
                return load_epoch, record
            why = "missing from the ledger" if record is None else "missing or corrupt (sha256 mismatch)"
            if record is not None:
                self.ledger.append(L.CHECKPOINT_UNAVAILABLE, epoch=load_epoch, sha256=record.sha256, why=why)
            log.warning("checkpoint of %s %d is %s: falling back to the previous verified one", self.noun, load_epoch,
                        why)  # fmt: skip
            load_epoch = policy.resume_epoch(self.view(), before=load_epoch)
        return -1, None

    def _run_attempt(self, launch: policy.Launch) -> policy.Decision:
        cfg = self.cfg
        try:
            load_epoch, record = self._resume_source(launch.load_epoch, launch.load_step)
        except StoreError as exc:
            log.error("cannot fetch the checkpoint to resume from: %s", exc)
            self._pause_why = str(exc)
            return policy.Pause(Fault.STOPPED.value)
        view = self.view()
        number = view.next_attempt
        spec = AttemptSpec(
            attempt=number, seed=launch.seed, load_epoch=load_epoch, batch_divisor=launch.batch_divisor,
            load_path=(self.run_dir / record.path) if record else None, load_sha256=record.sha256 if record else None,
            load_step=record.step if record else None,
        )  # fmt: skip
        start = position(load_epoch, spec.load_step)
        self._drop_partials(lambda pos: pos > start, "abandoned")
        self._resuming_from = load_epoch if load_epoch >= 0 and spec.load_step is None else None
        self._high_water_at_start = view.high_water
        self._attempt_progressed = False
        remove_stale_temps(self.layout.checkpoints)  # no trainer runs now: every temp file is a dead attempt's
        if self.coord is not None:
            self._publish(spec, record)
        attempt = self._attempt = Attempt(cfg, self.run_dir, spec, echo=self.echo)
        self._launched_wall = time.time()
        argv = attempt.launch()
        if self.coord is not None:
            self._link = LeaderLink(self.coord, number, self.run_dir, attempt.events_path, attempt.request_path)
            self._link.start()
        self.ledger.append(L.ATTEMPT_STARTED, attempt=number, seed=spec.seed, load_epoch=load_epoch,
                           load_step=spec.load_step, start_epoch=spec.start_epoch, start_step=spec.start_step,
                           reason=launch.reason, batch_divisor=spec.batch_divisor, pid=attempt.proc.pid,
                           host=socket.gethostname(), command=argv)  # fmt: skip
        note = f" ({launch.note})" if launch.note else ""
        at = f" step {spec.start_step}" if spec.load_step is not None else ""
        source = f"{self.noun} {record.epoch}" if record and record.step is None else (
            record.label if record else "none (fresh start)")  # fmt: skip
        first = max(1, spec.start_epoch) if cfg.unit == "steps" else spec.start_epoch  # steps count from 1
        log.info("attempt %d: %s %d%s from checkpoint %s, seed %d, reason '%s'%s", number, self.noun, first, at,
                 source, spec.seed, launch.reason, note)  # fmt: skip
        result = self._watch(attempt)
        self.record_hashed(wait=True)
        view = self.view()
        fault, detail = result.fault, result.detail
        if fault is None and not policy.is_complete(view, cfg.span):
            if not cfg.checkpoints.require_last:
                return self._exited_done(number, result, view)
            fault, detail = Fault.INCOMPLETE, self._incomplete(result, view)
        placed = {} if result.rank is None else {"rank": result.rank}
        if result.node is not None:
            placed["node"] = result.node
        self.ledger.append(L.ATTEMPT_ENDED, attempt=number, fault=fault.value if fault else None, exit=result.exit,
                           failed_epoch=result.failed_epoch, steps=result.steps, progressed=self._attempt_progressed,
                           detail=detail, tail=result.tail, detected_at=result.detected_at, **placed)  # fmt: skip
        self._attempt = None
        if fault is not None:
            log.info("attempt %d ended: %s (%s)", number, fault.value, result.exit)
        if self._early is not None:
            fired, self._early = self._early, None
            self.ledger.append(L.EARLY_STOP, **fired)
            return policy.EarlyStop(f"{fired['rule']} ({fired['metric']} {fired['value']:g} at {self.noun} "
                                    f"{fired['epoch']})")  # fmt: skip
        decision = policy.decide(self.view(), cfg.restart, cfg.seeds.pool, cfg.name, cfg.span, random.random())
        self._record_lost(number, attempt.rules, decision)
        return decision

    def _incomplete(self, result: AttemptResult, view: L.RunView) -> str:
        """Why an exit 0 did not complete the run, and the two ways out."""
        last = self.cfg.span - 1
        newest = view.newest()
        have = f"the newest verified is {newest.label.replace('epoch', self.noun)}" if newest else "none is verified"
        return (f"the trainer exited 0 at {self.noun} {result.failed_epoch} before the checkpoint of {self.noun} "
                f"{last} was verified ({have}): if the script saves only on improvement or its last save is "
                f"optional, set [checkpoints] require_last = false; otherwise make it save at its last "
                f"{self.noun}")  # fmt: skip

    def _exited_done(self, number: int, result: AttemptResult, view: L.RunView) -> policy.Decision:
        """require_last = false: an exit 0 ends the run, its newest verified checkpoint the final one."""
        newest = view.newest()
        final = newest.label.replace("epoch", self.noun) if newest else "none"
        self.ledger.append(L.ATTEMPT_ENDED, attempt=number, fault=None, exit=result.exit,
                           failed_epoch=result.failed_epoch, steps=result.steps, progressed=self._attempt_progressed,
                           detail=f"exited 0: complete (require_last = false), final checkpoint {final}",
                           tail=result.tail, detected_at=result.detected_at)  # fmt: skip
        self._attempt = None
        if result.failed_epoch < self.cfg.span - 1:
            log.warning("the trainer exited 0 at %s %d, before %s %d: taken as the end of the run (require_last = "
                        "false)", self.noun, result.failed_epoch, self.noun, self.cfg.span - 1)  # fmt: skip
        log.info("run complete: the trainer exited 0; final checkpoint %s", final)
        return policy.Complete()

    def _record_lost(self, number: int, rules: EventRules, decision: policy.Decision) -> None:
        """The work of attempt `number` that the next one does again: the steps and training seconds after
        the checkpoint it resumes from (after a pause, the newest one; after a fault, the policy's choice)."""
        view = self.view()
        if isinstance(decision, policy.Complete):
            return
        if isinstance(decision, policy.Launch):
            resume = position(decision.load_epoch, decision.load_step)
        elif isinstance(decision, policy.Pause):
            newest = view.newest()
            resume = newest.position if newest else (-1, END_OF_EPOCH)
        else:
            resume = (max(view.checkpoints, default=-1), END_OF_EPOCH)
        steps, seconds = rules.lost_since(resume)
        step = None if resume[1] == END_OF_EPOCH else resume[1]
        self.ledger.append(L.WORK_LOST, attempt=number, steps=steps, seconds=round(seconds, 3),
                           resume_epoch=resume[0], resume_step=step)  # fmt: skip
        if steps:
            log.info("attempt %d: %d steps (%.1fs of training) after the resume point are lost", number, steps,
                     seconds)  # fmt: skip

    def _plan_warnings(self) -> None:
        """Say at start when a notice window or the SIGTERM grace cannot cover a final save and upload at the
        measured (earlier sessions) or configured costs."""
        for line in plan_shortfalls(self.cfg, self._earlier_costs):
            log.warning("deadline plan: %s", line)
        for line in self.cfg.resume_warnings():
            log.warning("%s", line)

    def _watch(self, attempt: Attempt) -> AttemptResult:
        """The watch loop: take what the attempt observed, ask it to stop when a pause is due, until it ends.
        Nothing here waits on the store or the network."""
        number = attempt.spec.attempt
        next_disk = next_live = self._last_tick = time.monotonic()
        while True:
            self._check_fence()
            seen, rc = attempt.poll()
            self._take(seen, number)
            self.record_hashed()
            if seen.metrics and self.cfg.early_stop and attempt.fault is None and self._early is None:
                self._early = self._early_fired(self.view())
                if self._early is not None:
                    attempt.pause(Fault.STOPPED, f"early stop: {self._early['rule']}", self.cfg.watch.stop_grace_s)
            if attempt.pump.write_error is not None:
                raise attempt.pump.write_error
            if attempt.fault is None and (reason := self.stop_reason()) is not None:
                # Before the exit check: our kill may end it. A trainer that handles requests saves first.
                budget = D.pause_budget(self._time_left(), self.current_costs(), self._backlog(),
                                        self.cfg.watch.stop_grace_s)  # fmt: skip
                attempt.pause(reason, "pause requested", budget)
                if self._link is not None:  # every node's group saves and stops too
                    self._link.stop_all(reason.value, pause=True)
            if self._link is not None and attempt.fault is None:
                self._node_failed(attempt)
            if rc is not None:
                break
            if attempt.fault is None and time.monotonic() >= next_disk:
                next_disk = time.monotonic() + 2.0
                self.guard_disk(attempt)
            self._periodic(attempt)
            if time.monotonic() >= next_live:
                next_live = time.monotonic() + LIVE_EVERY_S
                self._write_live(attempt)
                self.take_notes()
            attempt.enforce(self._pause_grace() if attempt.fault is not None and attempt.fault.external else None)
            time.sleep(self.cfg.watch.poll_interval_s)
        ends = self._gather_nodes(attempt) if self._link is not None else None
        result, seen = attempt.finish(rc)
        self._take(seen, number)
        if attempt.pump.write_error is not None:
            raise attempt.pump.write_error
        if ends is not None:
            self._blame(result, ends)
        return result

    def _write_params(self) -> None:
        data = json.dumps(self.cfg.trainer.params, indent=2, sort_keys=True).encode()
        atomic_write(self.layout.params, lambda f: f.write(data))

    def _end(self, status: str, code: int, why: str) -> int:
        budget = D.drain_budget(self._time_left(), self.cfg.storage.drain_timeout_s if self.cfg.storage else 0.0)
        missing = self.store.drain(budget)
        if missing:
            log.warning("not yet in %s (the next start uploads them): %s", self.store.describe(), ", ".join(missing))
        why = self._pause_why or why
        costs = self.current_costs()
        if any(v is not None for v in costs.fields().values()):
            self.ledger.append(L.PLAN, **costs.fields(), every_s=self._interval, why=self._interval_why)
        self.take_notes()
        self.ledger.append(L.RUN_ENDED, status=status, diagnosis=why, not_uploaded=missing)
        if self.coord is not None:  # the followers end with the same status
            try:
                self.coord.set_session(self.session, status)
            except StoreError as exc:
                log.warning("cannot tell the other nodes that the run ended (%s): they stop after join_timeout_s", exc)
        if not missing:  # the last ledger line itself; after a drain that timed out it would time out too
            self.store.drain(min(budget, 30.0))
        log.info("run %s: %s (%s)", status, self.cfg.name, why)
        return code


def plan_shortfalls(cfg: RunConfig, costs: D.Costs) -> list[str]:
    """The windows this run may get (SIGTERM grace, spot notices) too short for a final save and upload."""
    windows: dict[str, float] = {}
    if cfg.platform.sigterm_grace_s is not None:
        windows["the SIGTERM grace (platform.sigterm_grace_s)"] = cfg.platform.sigterm_grace_s
    if cfg.platform.spot != "off":
        from supervisor.platforms.notices import WINDOW_S

        spot = cfg.platform.spot
        window = cfg.platform.notice_window_s or (min(WINDOW_S.values()) if spot == "auto" else WINDOW_S[spot])
        windows["a spot notice" + (" (GCP and Azure give 30 s)" if spot == "auto" else f" ({spot})")] = window
    if cfg.platform.upload_speed and costs.upload_bps is None:
        costs = D.Costs(**{**costs.fields(), "upload_bps": float(cfg.platform.upload_speed)})
    return D.shortfalls(costs, windows)
