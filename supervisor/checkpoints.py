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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import protocol as P
from supervisor.durable import is_temp_name, sha256_file
from supervisor.faults import Fault

log = logging.getLogger("supervisor")

# A checkpoint announced by a protocol trainer is hashed only once it has not changed for this long:
# a file still being written in place (against the protocol) is not taken for a complete one.
ANNOUNCED_SETTLE_S = 0.5


def resolve_pattern(pattern: str, checkpoint_dir: Path, run_dir: Path) -> str:
    """The pattern as an absolute path pattern: `{checkpoint_dir}`/`{run_dir}` filled in; a relative
    pattern lies in the checkpoint dir."""
    filled = pattern.replace("{checkpoint_dir}", str(checkpoint_dir)).replace("{run_dir}", str(run_dir))
    return filled if os.path.isabs(filled) else str(checkpoint_dir / filled)


def expected_path(pattern: str, epoch: int, checkpoint_dir: Path, run_dir: Path) -> Path:
    """The run's checkpoint path for `epoch`."""
    return Path(P.checkpoint_name(epoch, resolve_pattern(pattern, checkpoint_dir, run_dir)))


def refusal(epoch: int, path: Path, start_epoch: int, epochs: int, expected: Path) -> str | None:
    """Why an announced checkpoint cannot count, or None when it may be hashed."""
    if not start_epoch <= epoch < epochs:
        return f"epoch {epoch} is outside this attempt's epochs {start_epoch}..{epochs - 1}"
    if os.path.normpath(path) != os.path.normpath(expected):
        return f"{path} is not the run's checkpoint path for epoch {epoch} ({expected})"
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
    """A checkpoint the trainer said is complete (the watchdog hashes and records it)."""

    epoch: int
    path: Path
    data: dict[str, Any]


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


class EventRules:
    """Interprets the protocol events of one attempt (pure apart from `resolve`).

    `epoch` is the furthest epoch the attempt reached (for `failed_epoch`), `steps` counts step events.
    Events with an epoch outside start_epoch .. epochs-1 move nothing; a step whose loss is absent or
    not a number counts as a step but says nothing about NaN.
    """

    def __init__(self, start_epoch: int, epochs: int, expected: Callable[[int], Path],
                 resolve: Callable[[str], Path]) -> None:  # fmt: skip
        self.start_epoch = start_epoch
        self.epochs = epochs
        self.expected = expected
        self.resolve = resolve
        self.epoch = start_epoch
        self.steps = 0
        self.no_loss = 0  # step events without a numeric loss
        self.announced: set[int] = set()

    def in_range(self, epoch: int | None) -> bool:
        return epoch is not None and self.start_epoch <= epoch < self.epochs

    def feed(self, ev: P.Event, accepting: bool) -> Observed:
        """One event; `accepting` is False once a trainer-caused fault was named (nothing after counts)."""
        out = Observed()
        if not accepting:
            return out
        d = ev.data
        if ev.kind in (P.EVENT_STEP, P.EVENT_EVAL) and self.in_range(ev.epoch):
            self.epoch = max(self.epoch, ev.epoch)
        if ev.kind == P.EVENT_STEP:
            self.steps += 1
            loss = ev.loss
            if loss is None:
                self.no_loss += 1
            elif not math.isfinite(loss):
                shown = str(d.get("loss"))
                shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"
                out.fault = (Fault.NAN, f"training loss {shown} at epoch {ev.epoch} step {d.get('step')}")
        elif ev.kind == P.EVENT_EVAL:
            metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
            numbers = {k: P.to_number(v) for k, v in metrics.items()}
            bad = {k: metrics[k] for k, v in numbers.items() if v is not None and not math.isfinite(v)}
            if bad:
                out.fault = (Fault.TEST_NAN, f"eval of epoch {ev.epoch}: {bad}")
            elif self.in_range(ev.epoch):
                out.metrics.append((ev.epoch, numbers))
        elif ev.kind == P.EVENT_CHECKPOINT:
            out.extend(self._checkpoint(ev))
        return out

    def _checkpoint(self, ev: P.Event) -> Observed:
        out = Observed()
        raw = ev.data.get("path")
        if ev.epoch is None or not isinstance(raw, str) or not raw or "\0" in raw:
            out.refused.append(f"checkpoint event without an integer epoch and a path: {str(ev.data)[:200]}")
            return out
        path = self.resolve(raw)
        why = refusal(ev.epoch, path, self.start_epoch, self.epochs, self.expected(ev.epoch))
        if why is not None:
            out.refused.append(f"checkpoint of epoch {ev.epoch} not counted: {why}")
            return out
        if ev.epoch not in self.announced:
            self.announced.add(ev.epoch)
            self.epoch = max(self.epoch, ev.epoch + 1)
            out.checkpoints.append(Announced(ev.epoch, path, ev.data))
        return out
