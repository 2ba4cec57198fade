"""One trainer attempt: launch it under the shim, watch every signal source, end it, name the fault.

Lifecycle (each transition is logged; the watchdog writes the ledger lines):
    launching -> running -> stopping -> ended
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor import protocol as P
from supervisor.config import RunConfig
from supervisor.faults import Fault, classify_exit, classify_line, describe_exit
from supervisor.layout import RunLayout
from supervisor.monitors.disk import free_bytes
from supervisor.monitors.events import EventTail
from supervisor.monitors.files import CheckpointScanner
from supervisor.monitors.memory import OomKillWatch, memory_budget, tree_memory
from supervisor.monitors.output import OutputPump
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

    @property
    def start_epoch(self) -> int:
        return self.load_epoch + 1


@dataclass
class AttemptResult:
    fault: Fault | None
    exit: str
    failed_epoch: int
    steps: int
    detail: str = ""
    tail: list[str] = field(default_factory=list)
    detected_at: float | None = None  # unix time the watchdog named the fault


@dataclass
class Hooks:
    """What the attempt reports back while it runs (the watchdog records it)."""

    on_checkpoint: Callable[[int, Path, dict], None]
    on_metrics: Callable[[int, dict], None]
    stop_reason: Callable[[], Fault | None]  # a pause asked for from outside (signal, stop file, clock)
    on_disk_low: Callable[[], bool]  # prune; True if space is now enough
    tick: Callable[[], None]  # called once per watch-loop iteration


def build_argv(cfg: RunConfig, values: dict[str, str]) -> list[str]:
    """The trainer command with placeholders filled; a leading `python` runs under our interpreter."""
    argv = [re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), a) for a in cfg.trainer.command]
    if argv and re.fullmatch(r"python[0-9.]*", argv[0]):
        argv[0] = sys.executable
    return argv


class Attempt:
    """Runs one attempt to its end and returns an AttemptResult; never raises for trainer faults."""

    def __init__(self, cfg: RunConfig, run_dir: Path, spec: AttemptSpec, hooks: Hooks, echo: bool = True):
        self.cfg = cfg
        self.run_dir = run_dir
        self.spec = spec
        self.hooks = hooks
        self.echo = echo
        self.state = "launching"
        layout = RunLayout(run_dir)
        layout.attempts.mkdir(parents=True, exist_ok=True)
        self.events_path = layout.attempt_events(spec.attempt)
        self.log_path = layout.attempt_log(spec.attempt)
        self.checkpoint_dir = layout.checkpoints
        self.params_path = layout.params
        self.proc: subprocess.Popen[bytes] | None = None
        self.fault: Fault | None = None
        self.detail = ""
        self.detected_wall: float | None = None
        self.epoch = spec.start_epoch
        self.steps = 0
        self.recorded: set[int] = set()
        self._previous_line: dict[str, str] = {}  # per stream, to skip the code a traceback quotes
        self.kill_at: float | None = None
        self._scanner: CheckpointScanner | None = None

    # -- state ------------------------------------------------------------------------------

    def _to(self, state: str, why: str) -> None:
        if state not in ALLOWED[self.state]:
            raise RuntimeError(f"attempt {self.spec.attempt}: illegal transition {self.state} -> {state}")
        log.debug("attempt %d: %s -> %s (%s)", self.spec.attempt, self.state, state, why)
        self.state = state

    def _set_fault(self, fault: Fault, detail: str) -> None:
        if self.fault is None:
            self.fault = fault
            self.detail = detail
            self.detected_wall = time.time()
            log.warning("attempt %d: %s during epoch %d: %s", self.spec.attempt, fault, self.epoch, detail)

    # -- launch -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        s = self.spec
        env = dict(os.environ)
        env.update(self.cfg.trainer.env)
        env.update({
            P.ENV_RUN_DIR: str(self.run_dir),
            P.ENV_CHECKPOINT_DIR: str(self.checkpoint_dir),
            P.ENV_EVENTS: str(self.events_path),
            P.ENV_SEED: str(s.seed),
            P.ENV_LOAD_EPOCH: str(s.load_epoch),
            P.ENV_START_EPOCH: str(s.start_epoch),
            P.ENV_EPOCHS: str(self.cfg.epochs),
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
        return {
            "seed": str(s.seed), "load_epoch": str(s.load_epoch), "start_epoch": str(s.start_epoch),
            "epochs": str(self.cfg.epochs), "run_dir": str(self.run_dir),
            "checkpoint_dir": str(self.checkpoint_dir), "attempt": str(s.attempt),
            "batch_divisor": str(s.batch_divisor), "load_path": str(s.load_path or ""),
            "params": str(self.params_path), "python": sys.executable,
        }  # fmt: skip

    def launch(self) -> list[str]:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        argv = build_argv(self.cfg, self.placeholders())
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

    # -- watching ---------------------------------------------------------------------------

    def _on_event(self, ev: P.Event) -> None:
        if self.fault is not None:
            return  # nothing after a fault counts: its epoch did not end cleanly
        d = ev.data
        if ev.epoch is not None and ev.kind in (P.EVENT_STEP, P.EVENT_EVAL):
            self.epoch = max(self.epoch, ev.epoch)
        if ev.kind == P.EVENT_STEP:
            self.steps += 1
            if not P.is_finite(d.get("loss")):
                self._set_fault(Fault.NAN, f"training loss {d.get('loss')} at step {d.get('step')}")
        elif ev.kind == P.EVENT_EVAL:
            metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
            bad = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not P.is_finite(v)}
            bad = {k: v for k, v in bad.items() if P.to_number(v) is not None}
            if bad:
                self._set_fault(Fault.TEST_NAN, f"eval of epoch {ev.epoch}: {bad}")
            elif ev.epoch is not None:
                self.hooks.on_metrics(ev.epoch, {k: P.to_number(v) for k, v in metrics.items()})
        elif ev.kind == P.EVENT_CHECKPOINT and ev.epoch is not None and isinstance(d.get("path"), str):
            path = Path(d["path"])
            if not path.is_absolute():
                path = (self.cfg.base_dir / (self.cfg.trainer.cwd or ".") / path).resolve()
            self._record(ev.epoch, path, d)

    def _record(self, epoch: int, path: Path, data: dict) -> None:
        if epoch in self.recorded:
            return
        self.recorded.add(epoch)
        self.epoch = max(self.epoch, epoch + 1)
        self.hooks.on_checkpoint(epoch, path, data)

    def _on_line(self, stream: str, line: str, at: float) -> None:
        previous, self._previous_line[stream] = self._previous_line.get(stream), line
        fault = classify_line(line, previous)
        if fault in (Fault.CUDA_ERROR, Fault.GPU_OOM, Fault.DISK_FULL) and self.fault is None:
            # Sticky CUDA errors poison the process: it may linger or hang. Give it a moment to exit.
            self._set_fault(fault, line.strip()[:300])
        if self.cfg.trainer.mode != "zero-code" or self.fault is not None:
            return
        w = self.cfg.watch
        if (m := re.search(w.epoch_regex, line)) and int(m.group("epoch")) > self.epoch:
            self.epoch = int(m.group("epoch"))
            if self._scanner is not None:  # the script moved on: earlier checkpoints are complete
                for epoch, path in self._scanner.poll(self.recorded, finished_below=self.epoch):
                    self._record(epoch, path, {})
        if w.nan_regex and re.search(w.nan_regex, line):
            self._set_fault(Fault.NAN, line.strip()[:300])
        elif m := re.search(w.loss_regex, line, re.IGNORECASE):
            self.steps += 1
            value = P.to_number(m.group("loss"))
            if value is None or not math.isfinite(value):
                self._set_fault(Fault.NAN, line.strip()[:300])

    def run(self) -> AttemptResult:
        """Watch the attempt until its process tree is gone; return how it ended."""
        w = self.cfg.watch
        tail = self._tail = EventTail(self.events_path)
        scanner = self._scanner = None
        if self.cfg.trainer.mode == "zero-code":
            root = self.cfg.base_dir / (self.cfg.trainer.cwd or ".")
            pattern = self.cfg.checkpoints.pattern.replace("{checkpoint_dir}", str(self.checkpoint_dir))
            pattern = pattern.replace("{run_dir}", str(self.run_dir))
            if Path(pattern).is_absolute():
                root, pattern = Path("/"), pattern.lstrip("/")
            scanner = self._scanner = CheckpointScanner(root, pattern, self.cfg.checkpoints.settle_s)
        budget = memory_budget(w.memory_limit)
        started = last_activity = time.monotonic()
        seen_activity = False
        next_mem = next_disk = next_scan = next_cg = started
        self._to("running", f"pid {self.proc.pid}")
        while True:
            now = time.monotonic()
            for ev in tail.poll():
                last_activity, seen_activity = now, True
                self._on_event(ev)
            for stream, line, at in self.pump.drain():
                last_activity, seen_activity = max(last_activity, at), True
                self._on_line(stream, line, at)
            if scanner is not None and now >= next_scan and self.fault is None:
                next_scan = now + 0.5
                for epoch, path in scanner.poll(self.recorded):
                    self._record(epoch, path, {})
            self.hooks.tick()
            if self.fault is None and (reason := self.hooks.stop_reason()) is not None:
                self._set_fault(reason, "pause requested")  # before the exit check: our kill may end it
            if now >= next_cg:
                next_cg = now + 0.5
                self.oom.sample_tree(self.proc.pid)
            rc = self.proc.poll()
            if rc is not None:
                break
            if self.fault is None:
                limit = w.heartbeat_timeout_s if seen_activity else (w.startup_timeout_s or w.heartbeat_timeout_s)
                if now - last_activity > limit:
                    self._set_fault(Fault.HANG, f"no event and no output for {now - last_activity:.0f}s")
                elif budget is not None and now >= next_mem:
                    next_mem = now + 0.5
                    used = tree_memory(self.proc.pid)
                    if used > budget:
                        self._set_fault(
                            Fault.CPU_OOM,
                            f"trainer tree uses {used / 2**30:.2f} GiB > memory_limit {budget / 2**30:.2f} GiB:"
                            " stopped before the kernel OOM killer acts",
                        )
                if self.fault is None and w.disk_min_free is not None and now >= next_disk:
                    next_disk = now + 2.0
                    if free_bytes(self.run_dir) < w.disk_min_free and not self.hooks.on_disk_low():
                        self._set_fault(Fault.DISK_FULL, f"free space below disk_min_free ({w.disk_min_free} bytes)")
            if self.fault is not None and self.kill_at is None:
                if self.fault in (Fault.STOPPED, Fault.TIME_LIMIT, Fault.PREEMPTED):
                    self.stop(w.stop_grace_s)
                elif self.fault in (Fault.HANG, Fault.CPU_OOM):
                    self.stop(0)
                elif self.fault in (Fault.CUDA_ERROR, Fault.GPU_OOM):
                    self.stop(w.cuda_error_grace_s)
                else:  # nan, test nan, disk full: the trainer usually exits by itself
                    self.stop(min(5.0, w.stop_grace_s))
            if self.kill_at is not None and now >= self.kill_at:
                self.kill_tree()
            time.sleep(w.poll_interval_s)
        return self._finish(rc, started)

    def _finish(self, rc: int, started: float) -> AttemptResult:
        self.kill_tree()  # anything the trainer left behind
        self.pump.join()
        for ev in self._tail.poll():  # written just before the exit
            self._on_event(ev)
        for stream, line, at in self.pump.drain():
            self._on_line(stream, line, at)
        if self._scanner is not None and rc == 0 and self.fault is None:
            for epoch, path in self._scanner.poll(self.recorded, final=True):
                self._record(epoch, path, {})
        tail = list(self.pump.tail)
        self.pump.close()
        oom_killed = self.oom.fired()
        if self.fault is None:
            fault = classify_exit(rc, tail, oom_killed)
            if fault is not None:
                self._set_fault(fault, f"{describe_exit(rc)}; last output: {tail[-1] if tail else ''}"[:300])
        self._to("ended", describe_exit(rc))
        return AttemptResult(self.fault, describe_exit(rc), self.epoch, self.steps, self.detail, tail[-20:],
                             self.detected_wall)  # fmt: skip
