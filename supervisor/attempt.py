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
    rank: int | None = None  # under torchrun: the rank the fault was seen in
    node: int | None = None  # several nodes: the node it was seen on


# torchrun prefixes every line of every rank with this (`--log-line-prefix-template`); RANK_PREFIX reads it back.
RANK_TEMPLATE = "[rank${rank}]: "
RANK_PREFIX = re.compile(r"^\[rank(\d+)\]: ?")
# torchrun's summary of a failed group names the first failure after "Root Cause": "  rank      : 1 (local_rank: 1)".
ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank")
PYTHON = re.compile(r"(?:.*/)?python[0-9.]*")


def build_argv(cfg: RunConfig, values: dict[str, str], resume: bool = False, log_dir: Path | None = None) -> list[str]:
    """The trainer command (plus `resume_args` or `fresh_args`) with placeholders filled; a leading `python`
    runs under our interpreter. With `launcher = "torchrun"`, wrapped in torch.distributed.run (torchrun_argv)."""
    t = cfg.trainer
    argv = [fill_placeholders(a, values) for a in [*t.command, *(t.resume_args if resume else t.fresh_args)]]
    if argv and re.fullmatch(r"python[0-9.]*", argv[0]):
        argv[0] = sys.executable
    if t.launcher == "torchrun":
        run_id = f"{cfg.name}-{int(values['attempt']):04d}" if "attempt" in values else cfg.name  # a new one each time
        argv = torchrun_argv(cfg, argv, run_id, log_dir)
    return argv


def torchrun_argv(cfg: RunConfig, argv: list[str], run_id: str, log_dir: Path | None) -> list[str]:
    """`python -m torch.distributed.run` around the command: its restarts off (the supervisor restarts the whole
    group), every rank's output on the console prefixed with its global rank and kept per rank in `log_dir`.
    A Python command runs under the same interpreter (`python -m mod` as `--module mod`); any other under
    `--no-python` with the supervisor's interpreter."""
    t = cfg.trainer
    python = sys.executable
    if PYTHON.fullmatch(argv[0]):
        python, rest = argv[0], argv[1:]
        script = ["--module", *rest[1:]] if rest[:1] == ["-m"] else rest
    else:
        script = ["--no-python", *argv]
    run = [python, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc_per_node}", f"--nnodes={t.nnodes}",
           f"--node-rank={t.node_rank}", "--max-restarts=0", "--tee=3", f"--log-line-prefix-template={RANK_TEMPLATE}"]
    if log_dir is not None:
        run.append(f"--log-dir={log_dir}")
    if t.local_addr:
        run.append(f"--local-addr={t.local_addr}")
    if t.nnodes == 1 and t.rdzv_endpoint is None:
        run.append("--standalone")  # a free local port: runs on one box never collide
    else:
        run += [f"--rdzv-backend={t.rdzv_backend}", f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id={run_id}"]
        if t.nnodes > 1 and t.rdzv_backend == "c10d":  # the leader's agent serves the rendezvous, whatever the host
            run.append(f"--rdzv-conf=is_host={int(t.node_rank == 0)}")
    return run + script


def where(rank: int | None, node: int | None) -> str:
    """"node 1, rank 3", "rank 3" or "node 1": where a fault was seen."""
    return ", ".join(x for x in (f"node {node}" if node is not None else "", f"rank {rank}" if rank is not None
                                 else "") if x)  # fmt: skip


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
        self.ranks_dir = layout.attempt_ranks(spec.attempt)
        self.distributed = cfg.trainer.launcher == "torchrun"
        self.fault_rank: int | None = None  # the rank a fault was seen in (torchrun)
        self.node: int | None = None  # several nodes: the node a fault was seen on (the leader sets it)
        self._rank_tails: dict[int, EventTail] = {}  # ranks other than 0: their own events files
        self._rank_seen: dict[int, float] = {}  # rank -> unix time of its last event
        self._rank_step: dict[int, tuple[int, int]] = {}  # rank -> (epoch, step) of its last step event
        self._root_cause: int | None = None  # the rank torchrun's failure summary names
        self._in_root_cause = False
        self._rank_last: dict[int, str] = {}  # rank -> its last line of output
        self._next_rank_scan = 0.0
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

    def set_fault(self, fault: Fault, detail: str, rank: int | None = None, node: int | None = None) -> None:
        """Name the fault that ends this attempt (the first one named wins); `rank`: the process it was seen in,
        `node`: the node (several nodes; the leader names another node's fault)."""
        if self.fault is None:
            self.fault = fault
            self.fault_rank, self.node = rank, node
            self.detail = f"{where(rank, node)}: {detail}" if (rank, node) != (None, None) else detail
            detail = self.detail
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
            P.ENV_STEP_PATTERN: self.cfg.checkpoints.step_pattern,
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
        argv = build_argv(self.cfg, self.placeholders(), self.resuming, self.ranks_dir)
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

    def _new_events(self) -> list[tuple[int, P.Event]]:
        """(rank, event) read since the last poll: rank 0's from the attempt's events file; under torchrun also
        every other rank's own file. In the order they were written when every event carries its `t` (the
        client stamps each), else rank 0's first: a checkpoint of rank 0 and a NaN of rank 1 read in one poll
        are then judged in their true order."""
        events = [(0, ev) for ev in self._tail.poll()]
        if not self.distributed:
            return events
        now = time.monotonic()
        if now >= self._next_rank_scan:
            self._next_rank_scan = now + 0.5
            pattern = self.events_path.name.replace(".events.jsonl", ".rank-*.events.jsonl")
            for path in self.events_path.parent.glob(pattern):
                m = re.search(r"\.rank-(\d+)\.events\.jsonl$", path.name)
                if m and int(m.group(1)) not in self._rank_tails:
                    self._rank_tails[int(m.group(1))] = EventTail(path)
        for rank, tail in self._rank_tails.items():
            events += [(rank, ev) for ev in tail.poll()]
        times = [P.to_number(ev.data.get("t")) for _, ev in events]
        if all(t is not None and math.isfinite(t) for t in times):
            events = [e for _, e in sorted(zip(times, events, strict=True), key=lambda te: te[0])]
        return events

    def _on_rank_event(self, rank: int, ev: P.Event) -> None:
        """An event of a rank other than 0 (its step losses, heartbeats): a NaN there is named with its rank, and
        each rank's last event is its sign of life (a silent rank is a hang of it). Nothing else of it counts."""
        if ev.kind != P.EVENT_STEP or not self.accepting:
            return
        loss = ev.loss
        if loss is not None and not math.isfinite(loss):
            where = self.rules.position_of(ev)
            self.set_fault(Fault.NAN, f"training loss {ev.data.get('loss')} at {self.rules.noun} {where}", rank)

    def _note_rank(self, rank: int, ev: P.Event) -> None:
        t = P.to_number(ev.data.get("t"))  # when it was written (the client stamps every event), else read
        self._rank_seen[rank] = t if t is not None and math.isfinite(t) else time.time()
        step = ev.data.get("step")
        if ev.kind == P.EVENT_STEP and isinstance(step, int) and not isinstance(step, bool):
            self._rank_step[rank] = (ev.epoch if ev.epoch is not None else -1, step)

    def _behind(self) -> int | None:
        """The one rank whose last step is behind every other rank's: in a group that stopped, the one the
        others wait for in a collective (a stopped, stuck or slow process)."""
        if len(self._rank_step) < 2:
            return None
        ordered = sorted(self._rank_step.items(), key=lambda kv: kv[1])
        return ordered[0][0] if ordered[0][1] < ordered[1][1] else None

    def _on_events(self, out: Observed) -> None:
        for rank, ev in self._new_events():
            self._mark_activity(time.monotonic())
            if self.distributed:
                self._note_rank(rank, ev)
            if rank != 0:
                self._on_rank_event(rank, ev)
                continue
            seen = self.rules.feed(ev, self.accepting, time.time())
            if seen.fault is not None:
                # Rank 0 of a data-parallel trainer reports the group's mean loss: NaN when any rank's was; it may
                # say whose (`nonfinite_ranks`, as the reference trainer does).
                ranks = ev.data.get("nonfinite_ranks") if self.distributed else None
                named = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)] if isinstance(
                    ranks, list) else []  # fmt: skip
                self.set_fault(*seen.fault, named[0] if named else None)
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
        """One line of output; `at`: the unix time it was read (for naming the saves of a single file). Under
        torchrun a line starts with its rank (`[rank1]: `): each rank's lines are read as its own stream."""
        rank = None
        if self.distributed:
            if m := RANK_PREFIX.match(line):
                rank, line = int(m.group(1)), line[m.end():]
                stream = f"{stream}:{rank}"
                if line.strip():
                    self._rank_last[rank] = line.strip()
            elif line.startswith("Root Cause"):
                self._in_root_cause = True
            elif self._in_root_cause and self._root_cause is None and (m := ROOT_CAUSE_RANK.match(line)):
                self._root_cause = int(m.group(1))  # torchrun's summary: the first rank that failed
        previous, self._previous_line[stream] = self._previous_line.get(stream), line
        fault = classify_line(line, previous)
        if fault in (Fault.CUDA_ERROR, Fault.GPU_OOM, Fault.DISK_FULL) and self.fault is None:
            # Sticky CUDA errors poison the process: it may linger or hang. Give it a moment to exit.
            self.set_fault(fault, line.strip()[:300], rank)
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
            self.set_fault(Fault.NAN, line.strip()[:300], rank)
        elif m := re.search(w.loss_regex, line, re.IGNORECASE):
            if self.by_steps and self._last_position is not None:
                self.rules.mark_position(self._last_position, time.time())
            else:
                self.rules.mark_step(time.time())
            value = P.to_number(m.group("loss"))
            if value is None or not math.isfinite(value):
                self.set_fault(Fault.NAN, line.strip()[:300], rank)

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

    def _stale_rank(self, limit: float) -> int | None:
        """torchrun: a rank silent for longer than `limit` while another rank is not (each rank of a protocol
        trainer reports its steps; ranks that never reported are not judged). The rank behind the others in
        steps is named first: the times are those of reading, a poll apart at worst."""
        if len(self._rank_seen) < 2:
            return None
        now = time.time()
        rank = min(self._rank_seen, key=self._rank_seen.__getitem__)
        if now - self._rank_seen[rank] <= limit or now - max(self._rank_seen.values()) > limit:
            return None
        behind = self._behind()
        return rank if behind is None else behind

    def _check_health(self, now: float) -> None:
        """Hang and memory guard (the trainer's own state; the watchdog guards the disk)."""
        w = self.cfg.watch
        # Until the first step (or checkpoint) a trainer loads data, compiles, evaluates: startup_timeout_s.
        started = self.rules.steps > 0 or bool(self.rules.marks)
        limit = w.heartbeat_timeout_s if started else (w.startup_timeout_s or w.heartbeat_timeout_s)
        stale = self._stale_rank(limit) if started else None
        if now - self._last_activity > limit:
            behind = self._behind()
            where = "" if behind is None else (
                f" (it stopped at step {self._rank_step[behind][1]}; the other ranks went further and wait for it "
                "in a collective)")  # fmt: skip
            self.set_fault(Fault.HANG, f"no event and no output for {now - self._last_activity:.0f}s{where}",
                           behind)  # fmt: skip
        elif stale is not None:
            others = ", ".join(f"{r}" for r in sorted(self._rank_seen) if r != stale)
            silent = time.time() - self._rank_seen[stale]
            self.set_fault(Fault.HANG, f"no event for {silent:.0f}s while ranks {others} went on "
                           "(a stopped or stuck process; the others wait for it in a collective)", stale)  # fmt: skip
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
                last = next((x for x in reversed(tail) if x.strip() and "=====" not in x), "")
                last = self._rank_last.get(self._root_cause, last) if self._root_cause is not None else last
                self.set_fault(fault, f"{describe_exit(rc)}; last output: {last}"[:300], self._root_cause)
        self._to("ended", describe_exit(rc))
        result = AttemptResult(self.fault, describe_exit(rc), self.epoch, self.rules.steps, self.detail, tail[-20:],
                               self.detected_wall, self.fault_rank, self.node)  # fmt: skip
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
