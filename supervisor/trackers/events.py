"""Ledger facts -> what a tracker writes, pure and incremental: every tracker's output is a function of the
ledger alone, so a restarted supervisor or a new machine that replays the same facts writes the same thing.

Two translators share one reading of the facts (`RunFacts`): `LiveCurves` for a tracker that can discard
points (TensorBoard: a purge at a rewind) and `FinalCurves` for one that keeps every value it is given
(MLflow, W&B: only positions a verified checkpoint made final are written, each value once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from supervisor.faults import NORMAL_START
from supervisor.ledger import to_int


def _number(value: Any) -> float | None:
    """A finite float, or None for anything a curve cannot show (non-numbers, NaN, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def ledger_id(facts: list[dict[str, Any]]) -> str:
    """What tells one supervisor run from another of the same name: its ledger's first timestamp."""
    return str(facts[0].get("ts")) if facts else ""


@dataclass(frozen=True)
class Restart:
    """One attempt after the first: where it resumed, why, with which seed, and what the one before lost."""

    attempt: int
    position: int  # the first position it writes again (an epoch, or a global step in a run of steps)
    load: int  # the position of the checkpoint it loaded; -1: a fresh start
    load_step: int | None  # steps into `load` of a mid-epoch checkpoint
    seed: int
    reason: str
    lost_steps: int | None
    lost_s: float | None
    detail: str
    ts: float

    def line(self, noun: str) -> str:
        """The restart in words, one line."""
        load = "a fresh start" if self.load < 0 else f"{noun} {self.load}"
        if self.load_step is not None:
            load += f" step {self.load_step}"
        why = f"{self.reason} ({self.detail})" if self.detail else self.reason
        lost = "" if self.lost_steps is None else f"; lost {self.lost_steps} steps ({self.lost_s or 0.0:.1f}s)"
        return f"attempt {self.attempt} at {noun} {self.position} from {load}, seed {self.seed}: {why}{lost}"


@dataclass
class _Attempt:
    attempt: int
    start: int
    load: int
    load_step: int | None
    seed: int
    reason: str
    detail: str = ""
    lost_steps: int | None = None
    lost_s: float | None = None


@dataclass
class RunFacts:
    """The part of the ledger every tracker needs, folded one fact at a time."""

    unit: str = "epochs"
    attempts: list[_Attempt] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    lost_steps: int = 0
    lost_s: float = 0.0

    @property
    def noun(self) -> str:
        return "step" if self.unit == "steps" else "epoch"

    def feed(self, f: dict[str, Any]) -> Restart | None:
        """Fold one fact; returns the Restart an attempt_started after the first one makes. Raises (KeyError,
        TypeError, ValueError) for a fact of the wrong shape before changing anything."""
        kind = f.get("fact")
        if kind == "session_started" and f.get("unit") in ("epochs", "steps"):
            self.unit = f["unit"]
        elif kind == "attempt_started":
            load = to_int(f["load_epoch"])
            a = _Attempt(to_int(f["attempt"]), to_int(f.get("start_epoch", load + 1)), load,
                         None if f.get("load_step") is None else to_int(f["load_step"]), to_int(f["seed"]),
                         str(f.get("reason", NORMAL_START)))  # fmt: skip
            before = self.attempts[-1] if self.attempts else None
            self.attempts.append(a)
            if before is None:
                return None
            r = Restart(a.attempt, a.start, a.load, a.load_step, a.seed, a.reason, before.lost_steps, before.lost_s,
                        before.detail, float(f.get("ts", 0.0)))  # fmt: skip
            self.restarts.append(r)
            return r
        elif kind == "attempt_ended":
            a = self._attempt(to_int(f["attempt"]))
            if a is not None:
                a.detail = str(f.get("detail") or "")
        elif kind == "work_lost":
            a = self._attempt(to_int(f["attempt"]))
            steps, seconds = to_int(f["steps"]), float(f["seconds"])
            if a is not None:
                a.lost_steps, a.lost_s = steps, seconds
            self.lost_steps += steps
            self.lost_s += seconds
        return None

    def _attempt(self, number: int) -> _Attempt | None:
        return next((a for a in reversed(self.attempts) if a.attempt == number), None)

    def table(self) -> str:
        """The restart table in markdown: position | load position | seed | reason | work lost, one row an attempt."""
        noun = self.noun
        rows = [f"| {noun} | load_{noun} | seed | reason | lost steps | lost s |",
                "| :---: | :---: | :---: | :--- | ---: | ---: |"]  # fmt: skip
        for a in self.attempts:
            load = str(a.load) if a.load_step is None else f"{a.load} @ step {a.load_step}"
            lost = "" if a.lost_steps is None else f"{a.lost_steps} | {a.lost_s or 0.0:.1f}"
            rows.append(f"| {a.start} | {load} | {a.seed} | {a.reason} | {lost or ' | '} |")
        return "\n".join(rows) + "\n"


def values_of(f: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(position, {tag: value}) of a `train` or `metrics` fact: train/loss, train/lr, eval/<name>; None for
    other facts. Values that are not finite numbers are left out."""
    kind = f.get("fact")
    if kind == "train":
        raw = {"train/loss": f.get("loss"), "train/lr": f.get("lr")}
    elif kind == "metrics":
        metrics = f.get("metrics")
        if not isinstance(metrics, dict):
            raise ValueError("metrics is not a table")
        raw = {f"eval/{k}": v for k, v in metrics.items()}
    else:
        return None
    position = to_int(f["epoch"])
    return position, {k: n for k, v in raw.items() if (n := _number(v)) is not None}


# What LiveCurves asks a writer to do; `ts` is the fact's time (unix seconds), so a replay writes the same.
@dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float
    ts: float


@dataclass(frozen=True)
class Text:
    tag: str
    step: int
    text: str
    ts: float


@dataclass(frozen=True)
class Purge:
    """Discard every point at `step` and after (TensorBoard: a SessionLog START at that step)."""

    step: int
    ts: float


@dataclass(frozen=True)
class Params:
    params: dict[str, Any]
    ts: float


LiveOp = Scalar | Text | Purge | Params


class LiveCurves:
    """The translator for a tracker that can purge: points go out as they come; an attempt that starts at or
    below the highest step written purges from its start first, so every tag keeps one value per step and
    its steps only increase. The params sit at step 0 and are written again after a purge that reaches 0."""

    def __init__(self, params: dict[str, Any]):
        self.run = RunFacts()
        self.params = params
        self.high = -1  # the highest step written (curves and restarts; not the params)
        self.last: dict[str, int] = {}  # per tag: the highest step written
        self._params_out = False

    def feed(self, f: dict[str, Any]) -> list[LiveOp]:
        """The operations one fact asks for (a fact of the wrong shape raises before changing anything)."""
        ts = float(f.get("ts", 0.0))
        ops: list[LiveOp] = [] if self._params_out else [Params(self.params, ts)]
        found = values_of(f)
        if f.get("fact") == "attempt_started":
            start = to_int(f.get("start_epoch", to_int(f["load_epoch"]) + 1))
            restart = self.run.feed(f)
            if start <= self.high:
                ops += self.purge(start, ts)
            if restart is not None:
                ops += self._restart(restart)
        elif found is not None:
            position, values = found
            for tag, value in values.items():
                if position > self.last.get(tag, -1):  # a second report of a position on the same line: the first
                    ops.append(Scalar(tag, position, value, ts))
                    self.last[tag] = position
                    self.high = max(self.high, position)
        else:
            self.run.feed(f)
        self._params_out = True
        return ops

    def purge(self, step: int, ts: float) -> list[LiveOp]:
        """Discard the points at `step` and after; the params come back when the purge took them."""
        self.high = min(self.high, step - 1)
        self.last = {tag: min(s, step - 1) for tag, s in self.last.items()}
        ops: list[LiveOp] = [Purge(step, ts)]
        if step <= 0:
            ops.append(Params(self.params, ts))
        return ops

    def _restart(self, r: Restart) -> list[LiveOp]:
        """The restart count, work lost so far and the whole restart table at the step it resumed from: a later
        purge there takes the earlier table, the new one holds every restart."""
        run, step = self.run, r.position
        text = f"{r.line(run.noun)}\n\n{run.table()}"
        ops: list[LiveOp] = [Scalar("restarts", step, float(len(run.restarts)), r.ts),
                             Scalar("work_lost/steps", step, float(run.lost_steps), r.ts),
                             Scalar("work_lost/seconds", step, run.lost_s, r.ts), Text("restart_log", step, text, r.ts)]
        for op in ops:
            self.last[op.tag] = step  # type: ignore[union-attr]
        self.high = max(self.high, step)
        return ops


# What FinalCurves asks a writer to do.
@dataclass(frozen=True)
class Metrics:
    """Values of final positions: (key, step, value, ts); each (key, step) once, steps increasing per key."""

    points: list[tuple[str, int, float, float]]


@dataclass(frozen=True)
class RestartOp:
    restart: Restart
    count: int  # restarts so far, this one included
    table: str
    noun: str
    lost_steps: int  # work lost so far, by every attempt before this one
    lost_s: float


@dataclass(frozen=True)
class Status:
    """The run ended (`status` is the ledger's) or, with status "running", an attempt started after it ended."""

    status: str
    diagnosis: str
    ts: float


FinalOp = Metrics | RestartOp | Status


class FinalCurves:
    """The translator for a tracker that keeps every value it is given: a position's values go out once a
    verified checkpoint at or after it is on the current line of training (train facts are written at
    checkpoints; metrics wait for theirs); an attempt that resumes earlier drops the waiting values of the
    positions it trains again. Each (key, step) is written once, first value wins: after a rollback past
    written positions, their new values are not written (the ledger and the report keep them)."""

    def __init__(self) -> None:
        self.run = RunFacts()
        self.final = -1  # the highest position a verified checkpoint of the current line made final
        self.pending: dict[int, dict[str, tuple[float, float]]] = {}
        self.written: dict[str, int] = {}  # per key: the highest step written
        self.ended = False

    def feed(self, f: dict[str, Any]) -> list[FinalOp]:
        """The operations one fact asks for (a fact of the wrong shape raises before changing anything)."""
        kind, ts = f.get("fact"), float(f.get("ts", 0.0))
        found = values_of(f)
        if found is not None:
            position, values = found
            self.pending.setdefault(position, {}).update({k: (v, ts) for k, v in values.items()})
            return self._release()
        if kind == "checkpoint":
            position = to_int(f["epoch"])
            mid_epoch = f.get("step") is not None
            self.final = max(self.final, position - 1 if mid_epoch and self.run.unit == "epochs" else position)
            return self._release()
        ops: list[FinalOp] = []
        if kind == "attempt_started":
            start = to_int(f.get("start_epoch", to_int(f["load_epoch"]) + 1))
            restart = self.run.feed(f)
            self.final = min(self.final, start - 1)
            self.pending = {p: v for p, v in self.pending.items() if p < start}
            if self.ended:
                ops.append(Status("running", "", ts))
                self.ended = False
            if restart is not None:
                run = self.run
                ops.append(RestartOp(restart, len(run.restarts), run.table(), run.noun, run.lost_steps, run.lost_s))
        elif kind == "run_ended":
            self.ended = True
            ops.append(Status(str(f["status"]), str(f.get("diagnosis") or ""), ts))
        else:
            self.run.feed(f)
        return ops

    def _release(self) -> list[FinalOp]:
        points = []
        for position in sorted(p for p in self.pending if p <= self.final):
            for key, (value, ts) in self.pending.pop(position).items():
                if position > self.written.get(key, -1):
                    points.append((key, position, value, ts))
                    self.written[key] = position
        return [Metrics(points)] if points else []
