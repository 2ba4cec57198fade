"""The append-only run record (`<run_dir>/ledger.jsonl`) and the views derived from it.

Every fact is one JSON line, flushed and fsynced before the watchdog acts on it. Views (restart
table, verified checkpoints, seeds used, status) are pure folds over the facts, so the policy and
the reports never need any other state.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.faults import NORMAL_START
from supervisor.layout import LEDGER_NAME  # noqa: F401 - re-exported
from supervisor.store.base import CheckpointRecord

# Fact kinds.
SESSION_STARTED = "session_started"
ATTEMPT_STARTED = "attempt_started"
ATTEMPT_ENDED = "attempt_ended"
CHECKPOINT = "checkpoint"
CHECKPOINT_REMOVED = "checkpoint_removed"
CHECKPOINT_UNAVAILABLE = "checkpoint_unavailable"
METRICS = "metrics"
RUN_ENDED = "run_ended"
NOTE = "note"

STATUS_RUNNING = "running"
STATUS_PAUSED = "paused"
STATUS_COMPLETED = "completed"
STATUS_GAVE_UP = "gave up"


class Fenced(RuntimeError):
    """Another supervisor took this run over: nothing more may be written."""


class Ledger:
    """Appends facts to ledger.jsonl; each line is on disk (fsync) before append() returns.

    `fenced()` is asked before every write; once it says True, append() raises Fenced.
    """

    def __init__(self, path: Path, on_append: Any = None, fenced: Any = None):
        self.path = path
        self._on_append = on_append
        self._fenced = fenced

    def append(self, fact: str, **fields: Any) -> dict[str, Any]:
        if self._fenced is not None and self._fenced():
            raise Fenced(f"not writing '{fact}' to {self.path}: this supervisor lost the run's lease")
        record = {"fact": fact, "ts": round(time.time(), 3), **fields}
        line = json.dumps(record, separators=(",", ":"), allow_nan=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self._on_append is not None:
            self._on_append(self.path)
        return record

    def facts(self) -> list[dict[str, Any]]:
        return read_facts(self.path)


def read_facts(path: Path) -> list[dict[str, Any]]:
    """All facts of a ledger file; a torn last line (the writer died mid-write) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    facts = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "fact" in obj:
            facts.append(obj)
    return facts


@dataclass
class AttemptView:
    """One attempt as the ledger tells it."""

    attempt: int
    seed: int
    load_epoch: int
    start_epoch: int
    reason: str
    batch_divisor: int = 1
    started_at: float = 0.0
    host: str = ""
    pid: int | None = None
    ended: bool = False
    fault: str | None = None
    exit: str | None = None
    failed_epoch: int | None = None
    steps: int = 0
    progressed: bool = False
    tail: list[str] = field(default_factory=list)
    ended_at: float | None = None


@dataclass
class RunView:
    """Everything the policy and reports need, folded from the facts."""

    attempts: list[AttemptView] = field(default_factory=list)
    checkpoints: dict[int, CheckpointRecord] = field(default_factory=dict)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    status: str = STATUS_RUNNING
    diagnosis: str | None = None
    high_water: int = -1
    budget_start: int = 0  # attempts before this index were judged by an earlier give-up

    @property
    def seeds_used(self) -> set[int]:
        return {a.seed for a in self.attempts}

    @property
    def last(self) -> AttemptView | None:
        return self.attempts[-1] if self.attempts else None

    def verified_epochs(self) -> list[int]:
        return sorted(self.checkpoints)

    def restart_rows(self) -> list[dict[str, Any]]:
        """The table the user used to keep by hand: epoch | load_epoch | seed | reason."""
        return [
            {"epoch": a.start_epoch, "load_epoch": a.load_epoch, "seed": a.seed, "reason": a.reason}
            for a in self.attempts
        ]

    def best(self, metric: str, mode: str = "max") -> tuple[float, int] | None:
        """(value, epoch) of the best finite `metric` among evaluated epochs."""
        import math

        found = [
            (float(m[metric]), e)
            for e, m in self.metrics.items()
            if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])
        ]
        if not found:
            return None
        return max(found) if mode == "max" else min(found)


def fold(facts: list[dict[str, Any]]) -> RunView:
    """The RunView of a list of facts (pure)."""
    view = RunView()
    by_id: dict[int, AttemptView] = {}
    for f in facts:
        kind = f.get("fact")
        if kind == ATTEMPT_STARTED:
            a = AttemptView(
                attempt=int(f["attempt"]),
                seed=int(f["seed"]),
                load_epoch=int(f["load_epoch"]),
                start_epoch=int(f.get("start_epoch", int(f["load_epoch"]) + 1)),
                reason=str(f.get("reason", NORMAL_START)),
                batch_divisor=int(f.get("batch_divisor", 1)),
                started_at=float(f.get("ts", 0.0)),
                host=str(f.get("host", "")),
                pid=f.get("pid"),
            )
            by_id[a.attempt] = a
            view.attempts.append(a)
            view.status = STATUS_RUNNING
        elif kind == ATTEMPT_ENDED and int(f["attempt"]) in by_id:
            a = by_id[int(f["attempt"])]
            a.ended = True
            a.fault = f.get("fault")
            a.exit = f.get("exit")
            a.failed_epoch = f.get("failed_epoch")
            a.steps = int(f.get("steps", 0))
            a.progressed = bool(f.get("progressed", False))
            a.tail = list(f.get("tail", []))
            a.ended_at = float(f.get("ts", 0.0))
        elif kind == CHECKPOINT:
            rec = CheckpointRecord(int(f["epoch"]), str(f["path"]), int(f["size"]), str(f["sha256"]))
            view.checkpoints[rec.epoch] = rec
            view.high_water = max(view.high_water, rec.epoch)
        elif kind in (CHECKPOINT_REMOVED, CHECKPOINT_UNAVAILABLE):
            rec = view.checkpoints.get(int(f["epoch"]))
            if rec is not None and rec.sha256 == f.get("sha256", rec.sha256):
                del view.checkpoints[rec.epoch]
        elif kind == METRICS:
            view.metrics[int(f["epoch"])] = dict(f.get("metrics", {}))
        elif kind == RUN_ENDED:
            view.status = str(f["status"])
            view.diagnosis = f.get("diagnosis")
            if view.status == STATUS_GAVE_UP:
                view.budget_start = len(view.attempts)
    return view
