"""When an announced checkpoint counts, and reading an attempt's events into what it observed.

The rules (docs/guarantees.md): a checkpoint is verified only if its epoch lies in the attempt's
range (start_epoch .. epochs-1), its path is the run's path for that epoch under `[checkpoints]
pattern`, its bytes held still while they were hashed, and no trainer-caused fault came before
its announcement (a pause does not count as one: a checkpoint saved in the grace period counts).

`EventRules` turns the events of one attempt into observations. The live attempt and the next
start (reading a lost attempt's events after the watchdog died) both use it, so both judge alike.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import protocol as P
from supervisor.durable import is_temp_name, sha256_file
from supervisor.faults import Fault
from supervisor.store.base import END_OF_EPOCH

log = logging.getLogger("supervisor")

# A checkpoint announced by a protocol trainer is hashed only once it has not changed for this long:
# a file still being written in place (against the protocol) is not taken for a complete one.
ANNOUNCED_SETTLE_S = 0.5


def resolve_pattern(pattern: str, checkpoint_dir: Path, run_dir: Path) -> str:
    """The pattern as an absolute path pattern: `{checkpoint_dir}`/`{run_dir}` filled in; a relative
    pattern lies in the checkpoint dir."""
    filled = pattern.replace("{checkpoint_dir}", str(checkpoint_dir)).replace("{run_dir}", str(run_dir))
    return filled if os.path.isabs(filled) else str(checkpoint_dir / filled)


def expected_path(pattern: str, epoch: int, checkpoint_dir: Path, run_dir: Path, step: int | None = None,
                  step_pattern: str = P.DEFAULT_STEP_PATTERN) -> Path:  # fmt: skip
    """The run's checkpoint path for the end of `epoch`, or for `step` optimizer steps into it (in a run of
    steps, `epoch` is the step count and `pattern` names it {step})."""
    if step is None:
        return Path(P.checkpoint_name(epoch, resolve_pattern(pattern, checkpoint_dir, run_dir)))
    return Path(P.checkpoint_name(epoch, step=step, step_pattern=resolve_pattern(step_pattern, checkpoint_dir,
                                                                                 run_dir)))  # fmt: skip


def position(epoch: int, step: int | None) -> tuple[int, int]:
    """Training order of a checkpoint: (E, S) for S steps into E, (E, END_OF_EPOCH) for E's end."""
    return (epoch, END_OF_EPOCH if step is None else step)


def refusal(epoch: int, path: Path, start: tuple[int, int], epochs: int, expected: Path,
            step: int | None = None) -> str | None:  # fmt: skip
    """Why an announced checkpoint cannot count, or None when it may be hashed. `start` is the attempt's
    start position (start_epoch, start_step): a checkpoint must lie after it."""
    if not start[0] <= epoch < epochs:
        return f"epoch {epoch} is outside this attempt's epochs {start[0]}..{epochs - 1}"
    if step is not None and position(epoch, step) <= start:
        return f"step {step} of epoch {epoch} is not after the attempt's start (epoch {start[0]} step {start[1]})"
    if os.path.normpath(path) != os.path.normpath(expected):
        where = f"epoch {epoch}" if step is None else f"epoch {epoch} step {step}"
        return f"{path} is not the run's checkpoint path for {where} ({expected})"
    return None


def remove_stale_temps(folder: Path, older_than: float | None = None) -> int:
    """Delete the temp files of unfinished writes under `folder` (all, or those last written before the
    unix time `older_than`); returns how many went."""
    removed = 0
    for path in folder.rglob(".*"):
        try:
            if is_temp_name(path.name) and (older_than is None or path.stat().st_mtime < older_than):
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d unfinished checkpoint write(s) left behind in %s", removed, folder)
    return removed


class Unsettled(OSError):
    """The file kept changing while it was hashed."""


def _signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def hash_settled(path: Path, settle_s: float = ANNOUNCED_SETTLE_S, timeout_s: float = 120.0) -> tuple[int, str]:
    """(size, sha256) of a file whose size, mtime and inode held still for settle_s before and during the
    hash (settle_s 0: only during it, whatever its mtime says); raises Unsettled past timeout_s, OSError
    when it cannot be read. Runs off the watch loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = _signature(path)
        age = time.time() - before[1] / 1e9
        if settle_s <= 0 or age >= settle_s:
            digest = sha256_file(path)
            if _signature(path) == before:
                return before[0], digest
        if time.monotonic() > deadline:
            raise Unsettled(f"{path} kept changing for {timeout_s:.0f}s")
        time.sleep(min(max(settle_s - age, 0.05), 1.0))


@dataclass(frozen=True)
class Announced:
    """A checkpoint the trainer said is complete (the watchdog hashes and records it); `step` is set for
    a mid-epoch one."""

    epoch: int  # the run's position: an epoch, or a step count in a run of steps (noun "step")
    path: Path
    data: dict[str, Any]
    step: int | None = None
    noun: str = "epoch"
    # The training since the attempt's previous summary (an epoch's end, a checkpoint of a run of steps): mean
    # finite loss, last learning rate, steps; None for a mid-epoch checkpoint or when no step reported a loss.
    summary: dict[str, Any] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return position(self.epoch, self.step)

    @property
    def label(self) -> str:
        return f"{self.noun} {self.epoch}" if self.step is None else f"epoch {self.epoch} step {self.step}"

    @property
    def claims_sha256(self) -> bool:
        """The trainer hashed the bytes it wrote: no need to wait for them to settle (the claim is checked)."""
        claim = self.data.get("sha256")
        return isinstance(claim, str) and len(claim) == 64


@dataclass
class Observed:
    """What a batch of events showed."""

    checkpoints: list[Announced] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    fault: tuple[Fault, str] | None = None

    def extend(self, other: Observed) -> None:
        self.checkpoints += other.checkpoints
        self.metrics += other.metrics
        self.refused += other.refused
        self.fault = self.fault or other.fault


@dataclass(frozen=True)
class Mark:
    """Where an attempt stood when a checkpoint was announced: steps trained so far and the unix time."""

    steps: int
    t: float


class EventRules:
    """Interprets the protocol events of one attempt (pure apart from `resolve`).

    `epoch` is the furthest position the attempt reached (for `failed_epoch`), `steps` counts step events.
    In a run of steps (`unit` "steps") a position is a global step count: a step event's `step` S (finite
    loss: S done, S+1 in progress; non-finite: S failed), an eval's and a checkpoint's `step` (the state after
    S steps; never a mid-epoch checkpoint), and events' `epoch` fields are ignored.
    Events with an epoch outside start_epoch .. epochs-1 move nothing; a step whose loss is absent or
    not a number counts as a step but says nothing about NaN. `marks` remembers, per announced
    checkpoint position, how far the attempt had trained (for the work a resume from there loses).
    """

    def __init__(self, start_epoch: int, epochs: int, expected: Callable[[int, int | None], Path],
                 resolve: Callable[[str], Path], start_step: int = 0, unit: str = P.UNIT_EPOCHS) -> None:  # fmt: skip
        self.by_steps = unit == P.UNIT_STEPS
        self.noun = "step" if self.by_steps else "epoch"
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.epochs = epochs
        self.expected = expected
        self.resolve = resolve
        self.epoch = start_epoch
        self.steps = 0
        self.no_loss = 0  # step events without a numeric loss
        self.announced: set[tuple[int, int]] = set()  # positions
        self.handles_requests = False  # the trainer declared it honours checkpoint requests
        self.first_step_t: float | None = None
        self.last_step_t: float | None = None
        self.marks: dict[tuple[int, int], Mark] = {}
        self.step_times: deque[float] = deque(maxlen=256)  # the latest steps' times: time per step, save costs
        self._losses: list[float] = []  # finite step losses since the last summary
        self._lr: float | None = None  # the learning rate the last step reported

    @property
    def start(self) -> tuple[int, int]:
        return (self.start_epoch, self.start_step)

    def in_range(self, epoch: int | None) -> bool:
        return epoch is not None and self.start_epoch <= epoch < self.epochs

    def lost_since(self, resume: tuple[int, int]) -> tuple[int, float]:
        """(steps, seconds) this attempt trained after the position `resume`: from its mark when this
        attempt announced that checkpoint, else everything since its first step."""
        last = self.last_step_t
        if last is None:
            return 0, 0.0
        mark = self.marks.get(resume)
        if mark is not None:
            return max(0, self.steps - mark.steps), max(0.0, last - mark.t)
        return self.steps, max(0.0, last - (self.first_step_t or last))

    def mark_step(self, t: float) -> None:
        self.steps += 1
        self.first_step_t = t if self.first_step_t is None else self.first_step_t
        self.last_step_t = t
        self.step_times.append(t)

    def mark_position(self, position: int, t: float) -> None:
        """A zero-code run of steps: the output named global step `position`; steps trained = those since the
        attempt's start (a loss line is no step count there: scripts print every N steps)."""
        self.steps = max(self.steps, position - (self.start_epoch - 1))
        self.first_step_t = t if self.first_step_t is None else self.first_step_t
        self.last_step_t = t
        self.step_times.append(t)

    def last_checkpoint_t(self) -> float | None:
        """When this attempt last announced a checkpoint (unix time), or None."""
        return max((m.t for m in self.marks.values()), default=None)

    def position_of(self, ev: P.Event) -> int | None:
        """The run position an event speaks of: its epoch, or in a run of steps its (global) step."""
        if not self.by_steps:
            return ev.epoch
        step = ev.data.get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None

    def feed(self, ev: P.Event, accepting: bool, now: float | None = None) -> Observed:
        """One event; `accepting` is False once a trainer-caused fault was named (nothing after counts).
        `now` (unix time it arrived) stands in for an event without a numeric `t`."""
        out = Observed()
        if not accepting:
            return out
        d = ev.data
        t = P.to_number(d.get("t"))
        t = t if t is not None and math.isfinite(t) else (time.time() if now is None else now)
        if ev.kind == P.EVENT_HEARTBEAT and isinstance(d.get(P.HANDLES), list):
            self.handles_requests = self.handles_requests or P.CAPABILITY_CHECKPOINT_REQUEST in d[P.HANDLES]
        pos = self.position_of(ev)
        if ev.kind in (P.EVENT_STEP, P.EVENT_EVAL) and self.in_range(pos):
            self.epoch = max(self.epoch, pos)
        if ev.kind == P.EVENT_STEP:
            self.mark_step(t)
            loss = ev.loss
            if loss is None:
                self.no_loss += 1
            elif math.isfinite(loss):
                self._losses.append(loss)
            if loss is not None and not math.isfinite(loss):
                shown = str(d.get("loss"))
                shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"
                where = f"step {pos}" if self.by_steps else f"epoch {ev.epoch} step {d.get('step')}"
                out.fault = (Fault.NAN, f"training loss {shown} at {where}")
            if loss is not None and math.isfinite(loss) and self.by_steps and pos is not None and self.in_range(
                    pos + 1):  # fmt: skip
                self.epoch = max(self.epoch, pos + 1)  # step S done: S+1 in progress
            lr = P.to_number(d.get("lr"))
            if lr is not None and math.isfinite(lr):
                self._lr = lr
        elif ev.kind == P.EVENT_EVAL:
            metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
            numbers = {k: P.to_number(v) for k, v in metrics.items()}
            bad = {k: metrics[k] for k, v in numbers.items() if v is not None and not math.isfinite(v)}
            if bad:
                out.fault = (Fault.TEST_NAN, f"eval of {self.noun} {pos}: {bad}")
            elif self.in_range(pos):
                out.metrics.append((pos, numbers))
        elif ev.kind == P.EVENT_CHECKPOINT:
            out.extend(self._checkpoint(ev, t))
        return out

    def found(self, epoch: int, path: Path, t: float) -> Announced:
        """A checkpoint of `epoch`'s end found without an announcement (zero-code mode)."""
        self.epoch = max(self.epoch, epoch + 1)
        self.marks[position(epoch, None)] = Mark(self.steps, t)
        return Announced(epoch, path, {}, None, self.noun, self.summarize())

    def summarize(self) -> dict[str, Any] | None:
        """The training since the last summary (mean finite loss, last learning rate, steps), and start anew."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        out: dict[str, Any] = {"loss": sum(losses) / len(losses), "steps": len(losses)}
        if self._lr is not None:
            out["lr"] = self._lr
        return out

    def _checkpoint(self, ev: P.Event, t: float) -> Observed:
        out = Observed()
        raw, step = ev.data.get("path"), ev.data.get("step")
        if self.by_steps:
            return self._step_run_checkpoint(ev, t, raw)
        if ev.epoch is None or not isinstance(raw, str) or not raw or "\0" in raw:
            out.refused.append(f"checkpoint event without an integer epoch and a path: {str(ev.data)[:200]}")
            return out
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
            out.refused.append(f"checkpoint of epoch {ev.epoch} not counted: step {step!r} is not a whole number of "
                               "optimizer steps >= 1 (leave 'step' out for the end of the epoch)")  # fmt: skip
            return out
        path = self.resolve(raw)
        why = refusal(ev.epoch, path, self.start, self.epochs, self.expected(ev.epoch, step), step)
        if why is not None:
            where = f"epoch {ev.epoch}" if step is None else f"epoch {ev.epoch} step {step}"
            out.refused.append(f"checkpoint of {where} not counted: {why}")
            return out
        pos = position(ev.epoch, step)
        self.marks.setdefault(pos, Mark(self.steps, t))  # also for one recorded already (a lost attempt's)
        if pos not in self.announced:
            self.announced.add(pos)
            self.epoch = max(self.epoch, ev.epoch + 1 if step is None else ev.epoch)
            out.checkpoints.append(Announced(ev.epoch, path, ev.data, step,
                                             summary=self.summarize() if step is None else None))
        return out

    def _step_run_checkpoint(self, ev: P.Event, t: float, raw: Any) -> Observed:
        """A checkpoint in a run of steps: the state after `step` global steps, at the pattern's path for it."""
        out = Observed()
        step = self.position_of(ev)
        if step is None or step < 1 or not isinstance(raw, str) or not raw or "\0" in raw:
            out.refused.append("checkpoint event without a whole number of steps >= 1 and a path (a run of steps: "
                               f"{{\"event\":\"checkpoint\",\"step\":S,\"path\":P}}): {str(ev.data)[:200]}")
            return out
        path = self.resolve(raw)
        why = refusal(step, path, self.start, self.epochs, self.expected(step, None))
        if why is not None:
            out.refused.append(f"checkpoint of step {step} not counted: {why.replace('epoch', 'step')}")
            return out
        pos = position(step, None)
        self.marks.setdefault(pos, Mark(self.steps, t))
        if pos not in self.announced:
            self.announced.add(pos)
            self.epoch = max(self.epoch, step + 1)
            out.checkpoints.append(Announced(step, path, ev.data, None, self.noun, self.summarize()))
        return out
