"""The contract between the watchdog and a trainer attempt: env names, event kinds, checkpoint names.

Shared by both sides and free of torch, so a trainer can import it without pulling the watchdog in.
The fixed surface is documented in docs/protocol.md; change both together.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Environment of every attempt (fixed surface).
ENV_RUN_DIR = "SUPERVISOR_RUN_DIR"
ENV_CHECKPOINT_DIR = "SUPERVISOR_CHECKPOINT_DIR"
ENV_EVENTS = "SUPERVISOR_EVENTS"
ENV_SEED = "SUPERVISOR_SEED"
ENV_LOAD_EPOCH = "SUPERVISOR_LOAD_EPOCH"
ENV_START_EPOCH = "SUPERVISOR_START_EPOCH"
ENV_EPOCHS = "SUPERVISOR_EPOCHS"
ENV_ATTEMPT = "SUPERVISOR_ATTEMPT"
ENV_PARAMS = "SUPERVISOR_PARAMS"
ENV_BATCH_DIVISOR = "SUPERVISOR_BATCH_DIVISOR"
# Extensions: where the checkpoint to load lies and the sha256 it must have.
ENV_LOAD_PATH = "SUPERVISOR_LOAD_PATH"
ENV_LOAD_SHA256 = "SUPERVISOR_LOAD_SHA256"
# Mid-epoch resume (fixed surface): optimizer steps of SUPERVISOR_START_EPOCH already trained; 0 at a boundary.
ENV_START_STEP = "SUPERVISOR_START_STEP"
# Extension: the file the watchdog writes a checkpoint request into (see CheckpointRequest).
ENV_CHECKPOINT_REQUEST = "SUPERVISOR_CHECKPOINT_REQUEST"
# Runs counted in optimizer steps (`steps = N`): the unit ("epochs"/"steps"), the total, the checkpoint names.
ENV_UNIT = "SUPERVISOR_UNIT"
ENV_STEPS = "SUPERVISOR_STEPS"
ENV_CHECKPOINT_PATTERN = "SUPERVISOR_CHECKPOINT_PATTERN"
ENV_STEP_PATTERN = "SUPERVISOR_STEP_PATTERN"  # an epoch run's mid-epoch checkpoint names ([checkpoints] step_pattern)
UNIT_EPOCHS, UNIT_STEPS = "epochs", "steps"

# Event kinds (fixed surface).
EVENT_STEP = "step"
EVENT_EVAL = "eval"
EVENT_CHECKPOINT = "checkpoint"
EVENT_HEARTBEAT = "heartbeat"
EVENT_KINDS = frozenset({EVENT_STEP, EVENT_EVAL, EVENT_CHECKPOINT, EVENT_HEARTBEAT})

DEFAULT_CHECKPOINT_PATTERN = "epoch-{epoch:04d}.pt"
# Mid-epoch checkpoints: `step` optimizer steps of `epoch` trained.
DEFAULT_STEP_PATTERN = "epoch-{epoch:04d}-step-{step:08d}.pt"
# A run counted in steps: the checkpoint holding the state after `step` optimizer steps.
DEFAULT_STEP_RUN_PATTERN = "step-{step:08d}.pt"
# A trainer that honours checkpoint requests says so once, early, in a heartbeat:
#   {"event":"heartbeat","handles":["checkpoint_request"]}
HANDLES = "handles"
CAPABILITY_CHECKPOINT_REQUEST = "checkpoint_request"

_NONFINITE_STRINGS = {
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-inf": -math.inf,
    "-infinity": -math.inf,
}


# Several processes under torchrun (`[trainer] launcher = "torchrun"`): torchrun gives each its global RANK and
# WORLD_SIZE. Rank 0 writes the attempt's events file; every other rank writes its own (rank_events_path) with
# its step events (loss: NaN per rank) and heartbeats, so a failing or silent rank is named. Only rank 0's
# checkpoints count.
ENV_RANK = "RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"


def rank_events_path(events: str | os.PathLike[str], rank: int) -> Path:
    """The events file of global `rank`: the attempt's own for rank 0, `<name>.rank-R.events.jsonl` beside it
    for the others (`attempt-0003.events.jsonl` -> `attempt-0003.rank-1.events.jsonl`)."""
    path = Path(events)
    if rank == 0:
        return path
    name = path.name
    stem = name[: -len(".events.jsonl")] if name.endswith(".events.jsonl") else path.stem
    return path.with_name(f"{stem}.rank-{rank}.events.jsonl")


def checkpoint_name(epoch: int, pattern: str = DEFAULT_CHECKPOINT_PATTERN, step: int | None = None,
                    step_pattern: str = DEFAULT_STEP_PATTERN) -> str:  # fmt: skip
    """File name (or relative path) of the checkpoint of `epoch` (its end), or of `step` steps into it. In a run
    of steps the position `epoch` is the global step count, which its pattern names {step}."""
    if step is None:
        return pattern.format(epoch=epoch, step=epoch)
    return step_pattern.format(epoch=epoch, step=step)


@dataclass(frozen=True)
class CheckpointRequest:
    """What the watchdog asks of a trainer that handles requests, written atomically as JSON into
    $SUPERVISOR_CHECKPOINT_REQUEST: save a checkpoint at the next optimizer step and announce it with
    `"request": id`; with `stop`, exit (code 0) once it is announced. Ids grow within an attempt."""

    id: int
    reason: str
    stop: bool = False

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "reason": self.reason, "stop": self.stop}).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> CheckpointRequest | None:
        """The request in `data`, or None when it is not a whole, well-formed request."""
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        rid, reason, stop = obj.get("id"), obj.get("reason", ""), obj.get("stop", False)
        if isinstance(rid, bool) or not isinstance(rid, int) or not isinstance(reason, str):
            return None
        if not isinstance(stop, bool):
            return None
        return cls(rid, reason, stop)


def checkpoint_regex(pattern: str = DEFAULT_CHECKPOINT_PATTERN, field: str = "epoch") -> re.Pattern[str]:
    """A regex that matches paths produced by `pattern` and captures its `field` placeholder ("epoch", or
    "step" in a run counted in steps) as group 'epoch' (the run's position, whatever its unit)."""
    out, pos, seen = [], 0, False
    for m in re.finditer(r"\{" + field + r"(?::[^}]*)?\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(r"(?P=epoch)" if seen else r"(?P<epoch>\d+)")
        seen, pos = True, m.end()
    out.append(re.escape(pattern[pos:]))
    if not seen:
        raise ValueError(f"checkpoint pattern {pattern!r} has no {{{field}}} placeholder")
    return re.compile("".join(out) + r"\Z")


def to_number(value: Any) -> float | None:
    """A float from an event field: numbers, or the strings 'nan', 'inf', '-inf' (any case); None for
    anything else. An integer too large for a float is +-inf (as a float computation would give)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float64 (JSON allows 400 digits): it overflowed
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _NONFINITE_STRINGS:
            return _NONFINITE_STRINGS[s]
        try:
            return float(s)
        except (ValueError, OverflowError):
            return None
    return None


def is_finite(value: Any) -> bool:
    """True when `value` is a finite number; False for NaN/inf or anything non-numeric."""
    x = to_number(value)
    return x is not None and math.isfinite(x)


@dataclass(frozen=True)
class Event:
    """One parsed line of the events file. `data` keeps every field, unknown ones included."""

    kind: str
    data: dict[str, Any]

    @property
    def epoch(self) -> int | None:
        e = self.data.get("epoch")
        return e if isinstance(e, int) and not isinstance(e, bool) else None

    @property
    def loss(self) -> float | None:
        """The step's loss as a number (NaN/inf included); None when absent or not a number at all."""
        return to_number(self.data.get("loss"))


def parse_event(line: str) -> Event | None:
    """Parse one events.jsonl line; None for blank, malformed or unknown-kind lines.

    Python's json accepts the NaN/Infinity/-Infinity literals that the protocol allows.
    """
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("event")
    if kind not in EVENT_KINDS:
        return None
    return Event(kind=kind, data=obj)


def format_event(kind: str, **fields: Any) -> str:
    """One events.jsonl line (with newline). Non-finite floats are written as NaN/Infinity literals."""
    return json.dumps({"event": kind, **fields}, separators=(",", ":"), allow_nan=True) + "\n"
