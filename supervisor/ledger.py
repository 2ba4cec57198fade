"""The append-only run record (`<run_dir>/ledger.jsonl`) and the views derived from it.

Every fact is one JSON line, flushed and fsynced before the watchdog acts on it. Views (restart
table, verified checkpoints, seeds used, status) are pure folds over the facts, so the policy and
the reports never need any other state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.durable import atomic_write
from supervisor.faults import NORMAL_START
from supervisor.layout import LEDGER_NAME, RunLayout
from supervisor.store.base import CheckpointRecord

__all__ = ["LEDGER_NAME", "Fenced", "Ledger", "RunView", "AttemptView", "fold", "read_facts", "parse_facts"]

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
WORK_LOST = "work_lost"  # attempt, steps, seconds, resume_epoch, resume_step: trained after the resume point
EARLY_STOP = "early_stop"  # rule, metric, value, epoch: an [[early_stop]] rule ended the run
TRAIN = "train"  # epoch (position), loss, lr, steps: the training that led to a verified checkpoint
PLAN = "plan"  # measured costs (step_s, save_s, size, upload_bps) and the checkpoint interval chosen

STATUS_RUNNING = "running"
STATUS_PAUSED = "paused"
STATUS_COMPLETED = "completed"
STATUS_GAVE_UP = "gave up"
STATUS_EARLY_STOPPED = "early stopped"


class Fenced(RuntimeError):
    """Another supervisor took this run over: nothing more may be written."""


class Ledger:
    """Appends facts to ledger.jsonl; each line is on disk (fsync) before append() returns.

    `open()` repairs a torn tail (sets it aside in a side file) and loads the facts once; after it,
    `facts()` is served from memory. `fenced()` is asked before every write and must not block;
    once it says True, append() raises Fenced. After open() a ledger that vanished (its run dir was
    deleted) fails with FileNotFoundError instead of silently starting a new, empty record.
    """

    def __init__(self, path: Path, on_append: Any = None, fenced: Any = None):
        self.path = path
        self._on_append = on_append
        self._fenced = fenced
        self._facts: list[dict[str, Any]] | None = None

    def open(self) -> list[str]:
        """Repair a torn tail and load every fact; returns one warning line per line set aside or skipped."""
        warnings = []
        with open(self.path, "ab"):  # created here, once: append() never creates it (see the class doc)
            pass
        set_aside = repair_torn_tail(self.path, RunLayout(self.path.parent))
        if set_aside is not None:
            warnings.append(f"the ledger's last line was torn (a write cut short); set aside in {set_aside.name}")
        facts, skipped = parse_facts(self.path)
        self._facts = facts
        return warnings + skipped

    @property
    def opened(self) -> bool:
        """True once open() repaired and loaded the ledger: only then may a fact be appended safely."""
        return self._facts is not None

    def append(self, fact: str, **fields: Any) -> dict[str, Any]:
        if self._fenced is not None and self._fenced():
            raise Fenced(f"not writing '{fact}' to {self.path}: this supervisor lost the run's lease")
        record = {"fact": fact, "ts": round(time.time(), 3), **fields}
        line = (json.dumps(record, separators=(",", ":"), allow_nan=True, default=str) + "\n").encode()
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if self._facts is None else 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "short write", str(self.path))
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # never leave half a line for the next fact to glue onto
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if self._facts is not None:
            self._facts.append(record)
        if self._on_append is not None:
            self._on_append(self.path)
        return record

    def facts(self) -> list[dict[str, Any]]:
        if self._facts is None:
            return read_facts(self.path)
        return list(self._facts)


def repair_torn_tail(path: Path, layout: RunLayout) -> Path | None:
    """If the ledger does not end with a newline, move the partial last line into a side file and
    cut it off (fsynced), so the next append starts on a line of its own. Returns the side file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if not data or data.endswith(b"\n"):
        return None
    keep = data.rfind(b"\n") + 1
    side = layout.torn_ledger(int(time.time() * 1000))
    atomic_write(side, lambda f: f.write(data[keep:]))
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    finally:
        os.close(fd)
    return side


def parse_facts(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(facts, warnings): every whole line that is a JSON object with a `fact`; the rest is skipped
    with one warning each (a torn last line is skipped silently: open() sets it aside)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    facts, warnings = [], []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("fact"), str):
            facts.append(obj)
        else:
            warnings.append(f"ledger line {number} is not a fact (not a JSON object with a 'fact'); skipped")
    del torn
    return facts, warnings


def read_facts(path: Path) -> list[dict[str, Any]]:
    """All facts of a ledger file; a torn last line and lines that are not facts are skipped."""
    return parse_facts(path)[0]


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
    load_step: int | None = None  # steps into load_epoch of a mid-epoch checkpoint; None: its end
    lost_steps: int | None = None  # trained after the point the next attempt resumed from
    lost_s: float | None = None
    detail: str = ""  # how it ended, in words (the fault's evidence)
    rank: int | None = None  # under torchrun: the rank the fault was seen in
    node: int | None = None  # several nodes: the node it was seen on

    @property
    def start_step(self) -> int:
        return self.load_step or 0


@dataclass
class RunView:
    """Everything the policy and reports need, folded from the facts."""

    attempts: list[AttemptView] = field(default_factory=list)
    checkpoints: dict[int, CheckpointRecord] = field(default_factory=dict)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    train: dict[int, dict[str, Any]] = field(default_factory=dict)  # position -> loss, lr, steps (TRAIN facts)
    # The record (docs/record.md): the last session's params, [record] and [init]; when sessions started (unix);
    # the user's notes (ts, text); the parent checkpoint a run started from; the early stop that ended it.
    params: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] | None = None
    sessions: list[float] = field(default_factory=list)
    notes: list[tuple[float, str]] = field(default_factory=list)
    parent: dict[str, Any] | None = None
    early_stop: dict[str, Any] | None = None
    ended_at: float | None = None
    status: str = STATUS_RUNNING
    diagnosis: str | None = None
    high_water: int = -1
    budget_start: int = 0  # attempts before this index were judged by an earlier give-up
    removed: list[tuple[int, str]] = field(default_factory=list)  # (epoch, sha256) retention let go
    skipped: list[str] = field(default_factory=list)  # facts of the wrong shape, not folded
    partials: dict[tuple[int, int], CheckpointRecord] = field(default_factory=dict)  # mid-epoch, by (epoch, step)
    plan: dict[str, Any] = field(default_factory=dict)  # the last `plan` fact's fields
    unit: str = "epochs"  # what positions count (session_started's `unit`): "epochs", or "steps" where every
    # `epoch` field of a fact (checkpoint, metrics, attempts' load/start/failed epoch) holds a global step count

    @property
    def noun(self) -> str:
        """What a position is called: "step" in a run of steps, else "epoch"."""
        return "step" if self.unit == "steps" else "epoch"

    def newest(self) -> CheckpointRecord | None:
        """The newest verified checkpoint, mid-epoch or not (training order)."""
        records = [*self.checkpoints.values(), *self.partials.values()]
        return max(records, key=lambda r: r.position, default=None)

    @property
    def next_attempt(self) -> int:
        """The number of the next attempt: one past the highest ever recorded."""
        return max((a.attempt for a in self.attempts), default=-1) + 1

    @property
    def seeds_used(self) -> set[int]:
        return {a.seed for a in self.attempts}

    @property
    def last(self) -> AttemptView | None:
        return self.attempts[-1] if self.attempts else None

    def verified_epochs(self) -> list[int]:
        return sorted(self.checkpoints)

    def restart_rows(self) -> list[dict[str, Any]]:
        """The table the user used to keep by hand: epoch | load_epoch | seed | reason; in a run of steps
        step | load_step | seed | reason (load_step -1: a fresh start)."""
        if self.unit == "steps":
            rows = [{"step": max(1, a.start_epoch), "load_step": a.load_epoch, "seed": a.seed, "reason": a.reason}
                    for a in self.attempts]  # fmt: skip
        else:
            rows = [{"epoch": a.start_epoch, "load_epoch": a.load_epoch, "load_step": a.load_step, "seed": a.seed,
                     "reason": a.reason} for a in self.attempts]  # fmt: skip
        if any(a.rank is not None for a in self.attempts):  # several processes: the rank that caused the restart
            for row, before in zip(rows[1:], self.attempts, strict=False):
                row["rank"] = before.rank if before.fault == row["reason"] else None
            rows[0]["rank"] = None
        return rows

    def best(self, metric: str, mode: str = "max") -> tuple[float, int] | None:
        """(value, epoch) of the best finite `metric` among evaluated epochs."""
        found = [
            (float(m[metric]), e)
            for e, m in self.metrics.items()
            if isinstance(m.get(metric), (int, float)) and not isinstance(m.get(metric), bool)
            and math.isfinite(m[metric])
        ]
        if not found:
            return None
        return max(found) if mode == "max" else min(found)


def to_int(value: Any) -> int:
    """An int from a ledger field; ValueError for anything else (bools, floats with a fraction, null)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _apply(view: RunView, by_id: dict[int, AttemptView], f: dict[str, Any]) -> None:
    """Fold one fact into the view; raises (KeyError, TypeError, ValueError) for a fact of the wrong shape,
    before changing anything."""
    kind = f.get("fact")
    if kind == ATTEMPT_STARTED:
        load_epoch = to_int(f["load_epoch"])
        load_step = None if f.get("load_step") is None else to_int(f["load_step"])
        a = AttemptView(
            attempt=to_int(f["attempt"]),
            seed=to_int(f["seed"]),
            load_epoch=load_epoch,
            start_epoch=to_int(f.get("start_epoch", load_epoch + 1)),
            reason=str(f.get("reason", NORMAL_START)),
            batch_divisor=to_int(f.get("batch_divisor", 1)),
            started_at=float(f.get("ts", 0.0)),
            host=str(f.get("host", "")),
            pid=f.get("pid") if isinstance(f.get("pid"), int) else None,
            load_step=load_step,
        )
        by_id[a.attempt] = a
        view.attempts.append(a)
        view.status = STATUS_RUNNING
    elif kind == ATTEMPT_ENDED:
        a = by_id[to_int(f["attempt"])]
        failed = f.get("failed_epoch")
        tail = f.get("tail", [])
        ended = dict(
            fault=f.get("fault") if isinstance(f.get("fault"), str) else None,
            exit=str(f.get("exit")) if f.get("exit") is not None else None,
            failed_epoch=None if failed is None else to_int(failed),
            steps=to_int(f.get("steps", 0)),
            progressed=bool(f.get("progressed", False)),
            tail=[str(x) for x in tail] if isinstance(tail, list) else [],
            ended_at=float(f.get("ts", 0.0)),
            detail=str(f.get("detail") or ""),
            rank=None if f.get("rank") is None else to_int(f["rank"]),
            node=None if f.get("node") is None else to_int(f["node"]),
        )
        a.ended = True
        for key, value in ended.items():
            setattr(a, key, value)
    elif kind == CHECKPOINT:
        step = None if f.get("step") is None else to_int(f["step"])
        rec = CheckpointRecord(to_int(f["epoch"]), str(f["path"]), to_int(f["size"]), str(f["sha256"]), step)
        if rec.epoch < 0 or rec.size < 0 or (step is not None and step < 1):
            raise ValueError(f"checkpoint of epoch {rec.epoch} step {step}, size {rec.size}")
        if step is None:
            view.checkpoints[rec.epoch] = rec
            view.high_water = max(view.high_water, rec.epoch)
        else:
            view.partials[(rec.epoch, step)] = rec
        view.removed = [r for r in view.removed if r != (rec.epoch, rec.sha256)]
        if isinstance(f.get("from_run"), str):  # [init]: the parent's checkpoint this run started from
            view.parent = {"run": f["from_run"], view.noun: rec.epoch, "sha256": rec.sha256}
    elif kind in (CHECKPOINT_REMOVED, CHECKPOINT_UNAVAILABLE):
        epoch = to_int(f["epoch"])
        step = None if f.get("step") is None else to_int(f["step"])
        held = view.checkpoints if step is None else view.partials
        key = epoch if step is None else (epoch, step)
        rec = held.get(key)
        if rec is not None and rec.sha256 == f.get("sha256", rec.sha256):
            del held[key]
            if kind == CHECKPOINT_REMOVED:
                view.removed.append((rec.epoch, rec.sha256))
    elif kind == SESSION_STARTED:
        if f.get("unit") in ("epochs", "steps"):
            view.unit = f["unit"]
        view.sessions.append(float(f.get("ts", 0.0)))
        for key in ("params", "record"):
            if isinstance(f.get(key), dict):
                setattr(view, key, dict(f[key]))
        view.init = dict(f["init"]) if isinstance(f.get("init"), dict) else None
    elif kind == NOTE:
        if f.get("by") == "user" and isinstance(f.get("note"), str):
            view.notes.append((float(f.get("ts", 0.0)), f["note"]))
    elif kind == EARLY_STOP:
        view.early_stop = {k: f.get(k) for k in ("rule", "metric", "value", "epoch")}
    elif kind == WORK_LOST:
        a = by_id[to_int(f["attempt"])]
        a.lost_steps, a.lost_s = to_int(f["steps"]), float(f["seconds"])
    elif kind == PLAN:
        view.plan = {k: v for k, v in f.items() if k not in ("fact", "ts")}
    elif kind == TRAIN:
        view.train[to_int(f["epoch"])] = {k: f[k] for k in ("loss", "lr", "steps") if f.get(k) is not None}
    elif kind == METRICS:
        metrics = f.get("metrics", {})
        if not isinstance(metrics, dict):
            raise ValueError("metrics is not a table")
        view.metrics[to_int(f["epoch"])] = dict(metrics)
    elif kind == RUN_ENDED:
        view.status = str(f["status"])
        view.ended_at = float(f.get("ts", 0.0))
        view.diagnosis = f.get("diagnosis") if isinstance(f.get("diagnosis"), str) else None
        if view.status == STATUS_GAVE_UP:
            view.budget_start = len(view.attempts)


def fold(facts: list[dict[str, Any]]) -> RunView:
    """The RunView of a list of facts (pure). A fact of the wrong shape is skipped and named in
    `view.skipped`; it never stops the fold."""
    view = RunView()
    by_id: dict[int, AttemptView] = {}
    for index, f in enumerate(facts):
        try:
            _apply(view, by_id, f)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            view.skipped.append(f"fact {index + 1} ({f.get('fact')!r}) has the wrong shape ({exc!r}); skipped")
    return view
