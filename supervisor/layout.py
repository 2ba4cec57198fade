"""The run dir's layout, named in one place (every module asks here for a path).

    <run_dir>/
      ledger.jsonl                 the append-only record (ledger.py)
      ledger.torn-<unix ms>.jsonl  a torn tail set aside before the ledger was repaired
      params.json                  [trainer.params] for SUPERVISOR_PARAMS
      supervisor.lock              held by the supervisor driving the run (filelock)
      supervisor.json              who holds the lock: pid, host, start time
      STOP                         `supervisor stop` asks for a pause by creating it
      checkpoints/                 the trainer's checkpoint files (SUPERVISOR_CHECKPOINT_DIR)
      attempts/attempt-NNNN.log            the attempt's stdout and stderr
      attempts/attempt-NNNN.events.jsonl   the attempt's events (SUPERVISOR_EVENTS)
      attempts/attempt-NNNN.request.json   the watchdog's checkpoint request (SUPERVISOR_CHECKPOINT_REQUEST)
      live.json                    what the running watchdog does now (supervisor status), every 2 s
      inbox/note-*.json            notes for the ledger from `supervisor note` while the run runs
      trackers/<name>.json         how far each tracker has written the ledger ([record] trackers)
      tensorboard/, mlflow/, wandb/  the trackers' own files (TensorBoard events, the MLflow SQLite store)
      set-aside/                   a zero-code script's file an earlier attempt left, moved before a fresh start
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_NAME = "ledger.jsonl"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run dir."""

    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_NAME

    def torn_ledger(self, stamp_ms: int) -> Path:
        return self.root / f"ledger.torn-{stamp_ms}.jsonl"

    @property
    def params(self) -> Path:
        return self.root / "params.json"

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def holder(self) -> Path:
        return self.root / "supervisor.json"

    @property
    def stop_request(self) -> Path:
        return self.root / "STOP"

    @property
    def inbox(self) -> Path:
        """Notes for the ledger from other processes (`supervisor note` while the run is running)."""
        return self.root / "inbox"

    @property
    def live(self) -> Path:
        """What the watchdog is doing now (rewritten every few seconds while it runs): `supervisor status`."""
        return self.root / "live.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts"

    def attempt_log(self, attempt: int) -> Path:
        return self.attempts / f"attempt-{attempt:04d}.log"

    def attempt_events(self, attempt: int) -> Path:
        return self.attempts / f"attempt-{attempt:04d}.events.jsonl"

    def attempt_ranks(self, attempt: int) -> Path:
        """torchrun's per-rank logs of an attempt (`--log-dir`): <run id>/attempt_0/<local rank>/stdout.log."""
        return self.attempts / f"attempt-{attempt:04d}.ranks"

    def attempt_request(self, attempt: int) -> Path:
        return self.attempts / f"attempt-{attempt:04d}.request.json"


def holder_info(run_dir: Path) -> dict[str, Any]:
    """What supervisor.json says about the supervisor holding the run dir ({} when unknown)."""
    try:
        info = json.loads(RunLayout(run_dir).holder.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(run_dir: Path) -> str:
    """The holder in words, for a refusal message."""
    h = holder_info(run_dir)
    if not h:
        return "another supervisor"
    try:
        age = f" (running for {time.time() - float(h.get('started', time.time())):.0f}s)"
    except (TypeError, ValueError):
        age = ""
    return f"pid {h.get('pid')} on host {h.get('host')}{age}"
