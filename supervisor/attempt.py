"""One trainer attempt: launch it under the shim, observe every signal source, end it, name the fault.

The attempt observes and returns what it saw (`poll() -> Observed`); the watchdog owns the loop,
records what the attempt observed and decides when to ask it to stop. Lifecycle (each transition
is logged; the watchdog writes the ledger lines):
    launching -> running -> stopping -> ended
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor import protocol as P
from supervisor.checkpoints import Announced, EventRules, Observed, expected_path, resolve_pattern
from supervisor.config import RunConfig, fill_placeholders
from supervisor.durable import atomic_write
from supervisor.faults import Fault, classify_exit, classify_line, describe_exit, grace_s
from supervisor.layout import RunLayout
from supervisor.monitors.events import EventTail
from supervisor.monitors.files import CheckpointScanner
from supervisor.monitors.memory import OomKillWatch, memory_budget, tree_memory
from supervisor.monitors.output import OutputPump
from supervisor.monitors.snapshot import FileSnapshots, restore
from supervisor.shim import ENV_WATCHDOG_PID

log = logging.getLogger("supervisor")

ALLOWED = {
    "launching": {"running", "ended"},
    "running": {"stopping", "ended"},
    "stopping": {"ended"},
    "ended": set(),
}


@dataclass(frozen=True)
class AttemptSpec:
    """Everything that makes one attempt different from the others."""

    attempt: int
    seed: int
    load_epoch: int
    batch_divisor: int
    load_path: Path | None = None
    load_sha256: str | None = None
    load_step: int | None = None  # a mid-epoch checkpoint: optimizer steps of load_epoch it holds

    @property
    def start_epoch(self) -> int:
        return self.load_epoch if self.load_step is not None else self.load_epoch + 1

    @property
    def start_step(self) -> int:
        return self.load_step or 0


@dataclass
class AttemptResult:
    fault: Fault | None
    exit: str
    failed_epoch: int
    steps: int
    detail: str = ""
    tail: list[str] = field(default_factory=list)
    detected_at: float | None = None  # unix time the watchdog named the fault


def build_argv(cfg: RunConfig, values: dict[str, str], resume: bool = False) -> list[str]:
    """The trainer command (plus `resume_args` or `fresh_args`) with placeholders filled; a leading `python`
    runs under our interpreter."""
    t = cfg.trainer
    argv = [fill_placeholders(a, values) for a in [*t.command, *(t.resume_args if resume else t.fresh_args)]]
    if argv and re.fullmatch(r"python[0-9.]*", argv[0]):
        argv[0] = sys.executable
    return argv


class Attempt:
    """One attempt from launch to its end; never raises for trainer faults (it names them)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, spec: AttemptSpec, echo: bool = True):
        self.cfg = cfg
        self.run_dir = run_dir
        self.spec = spec
        self.echo = echo
        self.state = "launching"
        layout = RunLayout(run_dir)
        self.events_path = layout.attempt_events(spec.attempt)
        self.log_path = layout.attempt_log(spec.attempt)
        self.checkpoint_dir = layout.checkpoints
        self.params_path = layout.params
        self.proc: subprocess.Popen[bytes] | None = None
        self.fault: Fault | None = None
        self.detail = ""
        self.detected_wall: float | None = None
        self.request_path = layout.attempt_request(spec.attempt)
        self.rules = event_rules(cfg, run_dir, spec.start_epoch, spec.start_step)
        self.requests: dict[int, tuple[str, float]] = {}  # id -> (reason, unix time asked)
        self.served: dict[int, Announced] = {}  # request id -> the checkpoint that answered it
        self._request_until: float | None = None  # a pause waits this long (monotonic) for its checkpoint
        self._previous_line: dict[str, str] = {}  # per stream, to skip the code a traceback quotes
        self.kill_at: float | None = None
        self._scanner: CheckpointScanner | None = None
        self._snapshots: FileSnapshots | None = None
        self._metric_res = [re.compile(r) for r in cfg.watch.metric_regex]
        self._last_position: int | None = None  # zero-code: the epoch/step the output named last
        self._tail = EventTail(self.events_path)
        self._warned_no_loss = False
        self._next_scan = 0.0

    # -- state ------------------------------------------------------------------------------

    def _to(self, state: str, why: str) -> None:
        if state not in ALLOWED[self.state]:
            raise RuntimeError(f"attempt {self.spec.attempt}: illegal transition {self.state} -> {state}")
        log.debug("attempt %d: %s -> %s (%s)", self.spec.attempt, self.state, state, why)
        self.state = state

    @property
    def epoch(self) -> int:
        return self.rules.epoch

    @property
    def accepting(self) -> bool:
        """Whether what the trainer reports still counts: not after a trainer-caused fault (a pause is none)."""
        return self.fault is None or self.fault.external

    def set_fault(self, fault: Fault, detail: str) -> None:
        """Name the fault that ends this attempt (the first one named wins)."""
        if self.fault is None:
            self.fault = fault
            self.detail = detail
            self.detected_wall = time.time()
            log.warning("attempt %d: %s during %s %d: %s", self.spec.attempt, fault, self.rules.noun, self.epoch,
                        detail)  # fmt: skip

    # -- launch -----------------------------------------------------------------------------

    @property
    def by_steps(self) -> bool:
        return self.cfg.unit == P.UNIT_STEPS

    @property
    def resuming(self) -> bool:
        return self.spec.load_path is not None

    def env(self) -> dict[str, str]:
        s = self.spec
        env = dict(os.environ)
        t = self.cfg.trainer
        values = self.placeholders()
        for extra in (t.env, t.resume_env if self.resuming else t.fresh_env):
            env.update({k: fill_placeholders(v, values) for k, v in extra.items()})
        for name in (P.ENV_LOAD_EPOCH, P.ENV_START_EPOCH, P.ENV_EPOCHS, P.ENV_STEPS):
            env.pop(name, None)  # a supervisor running under another one: only this run's unit is set
        if self.by_steps:  # positions are optimizer steps: the loaded checkpoint's, the total
            unit = {P.ENV_STEPS: str(self.cfg.steps), P.ENV_START_STEP: str(max(0, s.load_epoch))}
        else:
            unit = {P.ENV_LOAD_EPOCH: str(s.load_epoch), P.ENV_START_EPOCH: str(s.start_epoch),
                    P.ENV_START_STEP: str(s.start_step), P.ENV_EPOCHS: str(self.cfg.epochs)}  # fmt: skip
        env.update(unit)
        env.update({
            P.ENV_UNIT: self.cfg.unit,
            P.ENV_CHECKPOINT_PATTERN: self.cfg.checkpoints.pattern,
            P.ENV_RUN_DIR: str(self.run_dir),
            P.ENV_CHECKPOINT_DIR: str(self.checkpoint_dir),
            P.ENV_EVENTS: str(self.events_path),
            P.ENV_SEED: str(s.seed),
            P.ENV_CHECKPOINT_REQUEST: str(self.request_path),
            P.ENV_ATTEMPT: str(s.attempt),
            P.ENV_PARAMS: str(self.params_path),
            P.ENV_BATCH_DIVISOR: str(s.batch_divisor),
            P.ENV_LOAD_PATH: str(s.load_path or ""),
            P.ENV_LOAD_SHA256: s.load_sha256 or "",
            "PYTHONUNBUFFERED": "1",
            ENV_WATCHDOG_PID: str(os.getpid()),
        })  # fmt: skip
        return env

    def placeholders(self) -> dict[str, str]:
        s = self.spec
        values = {
            "seed": str(s.seed), "run_dir": str(self.run_dir),
            "checkpoint_dir": str(self.checkpoint_dir), "attempt": str(s.attempt),
            "batch_divisor": str(s.batch_divisor), "load_path": str(s.load_path or ""),
            "params": str(self.params_path), "python": sys.executable,
        }  # fmt: skip
        if self.by_steps:  # a position is a step count: the loaded one (empty on a fresh start), the total
            loaded = s.load_epoch >= 0
            values.update(steps=str(self.cfg.steps), start_step=str(max(0, s.load_epoch)),
                          load_step=str(s.load_epoch) if loaded else "")  # fmt: skip
        else:
            values.update(load_epoch=str(s.load_epoch), start_epoch=str(s.start_epoch), start_step=str(s.start_step),
                          load_step="" if s.load_step is None else str(s.load_step),
                          epochs=str(self.cfg.epochs))  # fmt: skip
        return values

    def _script_file(self) -> Path | None:
        """Zero-code `[checkpoints] file`: the one file the script overwrites, resolved against its cwd."""
        file = self.cfg.checkpoints.file
        if file is None:
            return None
        path = Path(fill_placeholders(file, self.placeholders())).expanduser()
        return path if path.is_absolute() else self.cfg.base_dir / (self.cfg.trainer.cwd or ".") / path

    def _prepare_file(self, source: Path) -> None:
        """Before the launch: put the checkpoint to resume from where the script expects its file; on a fresh
        start after earlier attempts, set the file an earlier attempt left aside (the script must not find it)."""
        s = self.spec
        if s.load_path is not None:
            restore(s.load_path, source)
            log.info("attempt %d: put the checkpoint to resume from back in %s", s.attempt, source)
        elif source.exists() and s.attempt > 0:
            aside = self.run_dir / "set-aside" / f"{source.name}.before-attempt-{s.attempt:04d}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, aside)
            log.warning("attempt %d starts afresh: moved %s, left by an earlier attempt, to %s", s.attempt, source,
                        aside)  # fmt: skip
        elif source.exists():
            log.warning("%s exists before the run's first attempt: whether the script uses it is up to its "
                        "fresh-start arguments (trainer.fresh_args)", source)  # fmt: skip

    def launch(self) -> list[str]:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        c = self.cfg.checkpoints
        if self.cfg.trainer.mode == "zero-code":
            positions = range(self.spec.start_epoch, self.cfg.span)
            if (source := self._script_file()) is not None:
                self._prepare_file(source)
                self._snapshots = FileSnapshots(source, c.settle_s, lambda key: self.rules.expected(key, None),
                                                positions, by_epoch=not self.by_steps)  # fmt: skip
                self._snapshots.baseline()
            else:
                pattern = resolve_pattern(c.pattern, self.checkpoint_dir, self.run_dir)
                self._scanner = CheckpointScanner(pattern, c.settle_s, positions, "step" if self.by_steps else "epoch")
                self._scanner.baseline()
        self.request_path.unlink(missing_ok=True)  # a request of an earlier run of this number is not for us
        argv = build_argv(self.cfg, self.placeholders(), self.resuming)
        cwd = self.cfg.base_dir / (self.cfg.trainer.cwd or ".")
        self.pump = OutputPump(self.log_path, self.cfg.watch.tail_lines, echo=self.echo)
        self.oom = OomKillWatch()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.shim", "--", *argv],
            cwd=cwd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pump.attach(self.proc.stdout, "stdout")
        self.pump.attach(self.proc.stderr, "stderr")
        now = time.monotonic()
        self._last_activity = now
        self._next_mem = self._next_cg = now
        self._budget = memory_budget(self.cfg.watch.memory_limit)
        self._to("running", f"pid {self.proc.pid}")
        return argv

    # -- ending -----------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill_tree(self) -> None:
        """SIGKILL the shim, the trainer and every descendant, including ones that left the group."""
        if self.proc is None:
            return
        try:
            victims = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            victims = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM now (forwarded to the trainer by the shim), SIGKILL after grace_s."""
        if self.state == "running":
            self._to("stopping", f"grace {grace_s:.1f}s")
        if self.kill_at is None:
            if grace_s <= 0:
                self.kill_tree()
                self.kill_at = time.monotonic()
            else:
                self._signal(signal.SIGTERM)
                self.kill_at = time.monotonic() + grace_s

    # -- checkpoint requests ------------------------------------------------------------------

    @property
    def handles_requests(self) -> bool:
        return self.rules.handles_requests

    def request_checkpoint(self, reason: str, stop: bool = False) -> int | None:
        """Ask the trainer for a checkpoint at its next optimizer step (and, with `stop`, to exit after it);
        None when it did not declare that it handles requests. The file is replaced atomically."""
        if not self.handles_requests or self.state not in ("running", "stopping"):
            return None
        rid = max(self.requests, default=0) + 1
        atomic_write(self.request_path, lambda f: f.write(P.CheckpointRequest(rid, reason, stop).to_json()))
        self.requests[rid] = (reason, time.time())
        log.info("attempt %d: asked the trainer for a checkpoint (%s%s)", self.spec.attempt, reason,
                 ", then to exit" if stop else "")  # fmt: skip
        return rid

    def outstanding(self) -> int | None:
        """The newest request not yet answered by a checkpoint, or None."""
        rid = max(self.requests, default=None)
        return rid if rid is not None and rid not in self.served else None

    def pause(self, fault: Fault, detail: str, budget_s: float) -> None:
        """A pause from outside: when the trainer handles requests, ask it for a final checkpoint and to exit,
        and wait up to budget_s for it before the SIGTERM; otherwise stop it as any fault (SIGTERM, grace)."""
        self.set_fault(fault, detail)
        if budget_s > 0 and self.request_checkpoint(fault.value, stop=True) is not None:
            self._request_until = time.monotonic() + budget_s

    def enforce(self, grace: float | None = None) -> None:
        """Act on the named fault: start the stop with the fault's grace period (or `grace`), SIGKILL when it
        is over. A pause that asked for a checkpoint first waits for it (or for its budget to run out)."""
        w = self.cfg.watch
        if self.fault is not None and self.kill_at is None:
            waiting = self._request_until is not None and time.monotonic() < self._request_until
            if waiting and self.outstanding() is not None:
                return
            if grace is None:
                grace = grace_s(self.fault, w.stop_grace_s, w.cuda_error_grace_s)
            self.stop(grace)
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            self.kill_tree()

    # -- observing --------------------------------------------------------------------------

    def _on_events(self, out: Observed) -> None:
        for ev in self._tail.poll():
            self._mark_activity(time.monotonic())
            seen = self.rules.feed(ev, self.accepting, time.time())
            if seen.fault is not None:
                self.set_fault(*seen.fault)
            for announced in seen.checkpoints:
                rid = announced.data.get("request")
                if isinstance(rid, int) and rid in self.requests:
                    self.served[rid] = announced
            out.extend(seen)
        if self.rules.no_loss and not self._warned_no_loss:
            self._warned_no_loss = True
            log.warning("attempt %d: step events without a numeric loss: NaN detection cannot work for them",
                        self.spec.attempt)  # fmt: skip

    def _on_line(self, stream: str, line: str, out: Observed, at: float | None = None) -> None:
        """One line of output; `at`: the unix time it was read (for naming the saves of a single file)."""
        previous, self._previous_line[stream] = self._previous_line.get(stream), line
        fault = classify_line(line, previous)
        if fault in (Fault.CUDA_ERROR, Fault.GPU_OOM, Fault.DISK_FULL) and self.fault is None:
            # Sticky CUDA errors poison the process: it may linger or hang. Give it a moment to exit.
            self.set_fault(fault, line.strip()[:300])
        if self.cfg.trainer.mode != "zero-code" or not self.accepting:
            return
        w = self.cfg.watch
        if self.by_steps:
            m = re.search(w.step_regex, line, re.IGNORECASE)
            position = int(m.group("step")) if m else None
        else:
            m = re.search(w.epoch_regex, line)
            position = int(m.group("epoch")) if m else None
        if position is not None:
            self._last_position = position
        if position is not None and self._snapshots is not None:
            self._snapshots.note_key(position, time.time() if at is None else at)
        if position is not None and self.rules.in_range(position) and position > self.rules.epoch:
            self.rules.epoch = position
            if self._scanner is not None:  # the script moved on: earlier checkpoints are complete
                self._found(self._scanner.poll(finished_below=position), out)
        if self.fault is not None:
            return  # a pause: its grace period is for saving, not for new losses
        self._metrics(line, out)
        if w.nan_regex and re.search(w.nan_regex, line):
            self.set_fault(Fault.NAN, line.strip()[:300])
        elif m := re.search(w.loss_regex, line, re.IGNORECASE):
            if self.by_steps and self._last_position is not None:
                self.rules.mark_position(self._last_position, time.time())
            else:
                self.rules.mark_step(time.time())
            value = P.to_number(m.group("loss"))
            if value is None or not math.isfinite(value):
                self.set_fault(Fault.NAN, line.strip()[:300])

    def _metrics(self, line: str, out: Observed) -> None:
        """`[watch] metric_regex`: named groups of a matching line are eval metrics of the current position."""
        metrics: dict[str, float | None] = {}
        for regex in self._metric_res:
            if m := regex.search(line):
                metrics.update({k: P.to_number(v) for k, v in m.groupdict().items() if v is not None})
        if not metrics:
            return
        bad = {k: v for k, v in metrics.items() if v is not None and not math.isfinite(v)}
        key = self.rules.epoch
        if bad:
            self.set_fault(Fault.TEST_NAN, f"eval at {self.rules.noun} {key}: {bad} ({line.strip()[:200]})")
        elif self.rules.in_range(key):
            out.metrics.append((key, {k: v for k, v in metrics.items() if v is not None}))

    def _found(self, files: list[tuple[int, Path]], out: Observed) -> None:
        for epoch, path in files:
            out.checkpoints.append(self.rules.found(epoch, path, time.time()))

    def _snapshotted(self, out: Observed, final: bool = False, alive: bool = True) -> None:
        """Saves of the script's one checkpoint file that became checkpoints; after a fault of the script, only
        saves from before it (complete: the output moved past them)."""
        if self._snapshots is None:
            return
        cutoff = None if self.accepting else self.detected_wall
        for snap in self._snapshots.poll(final=final, alive=alive, cutoff=cutoff):
            announced = self.rules.found(snap.key, snap.path, time.time())
            data = {"sha256": snap.sha256, "size": snap.size}
            out.checkpoints.append(Announced(announced.epoch, announced.path, data, None, announced.noun))

    def _mark_activity(self, at: float) -> None:
        self._last_activity = max(self._last_activity, at)

    def _check_health(self, now: float) -> None:
        """Hang and memory guard (the trainer's own state; the watchdog guards the disk)."""
        w = self.cfg.watch
        # Until the first step (or checkpoint) a trainer loads data, compiles, evaluates: startup_timeout_s.
        started = self.rules.steps > 0 or bool(self.rules.marks)
        limit = w.heartbeat_timeout_s if started else (w.startup_timeout_s or w.heartbeat_timeout_s)
        if now - self._last_activity > limit:
            self.set_fault(Fault.HANG, f"no event and no output for {now - self._last_activity:.0f}s")
        elif self._budget is not None and now >= self._next_mem:
            self._next_mem = now + 0.5
            used = tree_memory(self.proc.pid)
            if used > self._budget:
                budget = self._budget / 2**30
                self.set_fault(Fault.CPU_OOM, f"trainer tree uses {used / 2**30:.2f} GiB > memory_limit {budget:.2f} "
                               "GiB: stopped before the kernel OOM killer acts")  # fmt: skip

    def poll(self) -> tuple[Observed, int | None]:
        """Read everything new (events, output, files) and check the trainer's health; returns what was
        observed and the exit status of the process tree once it is gone (else None)."""
        out = Observed()
        now = time.monotonic()
        self._on_events(out)
        for stream, line, at in self.pump.drain():
            self._mark_activity(at)
            self._on_line(stream, line, out, time.time() - (now - at))
        if self._scanner is not None and self.accepting and now >= self._next_scan:
            self._next_scan = now + 0.5  # a folder walk: not at every poll
            self._found(self._scanner.poll(), out)
        self._snapshotted(out)  # one stat of one file
        if now >= self._next_cg:
            self._next_cg = now + 0.5
            self.oom.sample_tree(self.proc.pid)
        rc = self.proc.poll()
        if rc is None and self.fault is None:
            self._check_health(now)
        return out, rc

    def finish(self, rc: int) -> tuple[AttemptResult, Observed]:
        """After the exit: read what was written just before it, name the fault, end the attempt."""
        self.kill_tree()  # anything the trainer left behind
        self.pump.join()
        out = Observed()
        self._on_events(out)
        now = time.monotonic()
        for stream, line, at in self.pump.drain():
            self._on_line(stream, line, out, time.time() - (now - at))
        if self._scanner is not None and rc == 0 and self.accepting:
            self._found(self._scanner.poll(final=True), out)
        if self._snapshots is not None:
            self._snapshotted(out, final=rc == 0 and self.accepting, alive=False)
            self._snapshots.close()
        tail = list(self.pump.tail)
        self.pump.close()
        oom_killed = self.oom.fired()
        if self.fault is None:
            fault = classify_exit(rc, tail, oom_killed)
            if fault is not None:
                self.set_fault(fault, f"{describe_exit(rc)}; last output: {tail[-1] if tail else ''}"[:300])
        self._to("ended", describe_exit(rc))
        result = AttemptResult(self.fault, describe_exit(rc), self.epoch, self.rules.steps, self.detail, tail[-20:],
                               self.detected_wall)  # fmt: skip
        return result, out


def event_rules(cfg: RunConfig, run_dir: Path, start_epoch: int, start_step: int = 0) -> EventRules:
    """The checkpoint rules of an attempt of this run that starts at `start_epoch` (`start_step` into it)."""
    layout = RunLayout(run_dir)
    cwd = cfg.base_dir / (cfg.trainer.cwd or ".")

    def resolve(raw: str) -> Path:
        path = Path(raw)
        return path if path.is_absolute() else cwd / path

    def expected(epoch: int, step: int | None = None) -> Path:
        c = cfg.checkpoints
        return expected_path(c.pattern, epoch, layout.checkpoints, run_dir, step, c.step_pattern)

    return EventRules(start_epoch, cfg.span, expected, resolve, start_step, unit=cfg.unit)
