"""Weights & Biases: one W&B run per supervisor run, resumed by a fixed id on every session and machine.

The id is the run's name and its ledger's first timestamp (the same wherever the ledger is restored; a new run
of the same name gets a new one); files in `<run_dir>/wandb/`; project = the experiment ("supervisor");
WANDB_MODE / WANDB_API_KEY decide online or offline, as W&B always does.

W&B refuses a step below the last ("Step must only increase"), so its own step is left to count log calls and
the curves use the metric `position` as their x axis (define_metric): values go out as in MLflow, only once
their position is final (FinalCurves: each (key, position) once, steps increasing). Restarts: the metrics
`restarts`, `work_lost/steps`, `work_lost/seconds` against the metric `attempt`, the table `restarts` (logged at
each restart) and `supervisor/restart_NNN` lines in the summary. The summary's `supervisor/facts` and
`supervisor/ledger` are a cursor the W&B server keeps: a machine without the local cursor resumes after them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from supervisor.record import flatten
from supervisor.trackers.events import FinalCurves, FinalOp, Metrics, RestartOp, Status, ledger_id
from supervisor.trackers.sync import Tracker

EXIT_CODE = {"completed": 0, "early stopped": 0, "paused": 0}  # else (gave up) 1


def _offline() -> bool:
    """W&B writes only local files (WANDB_MODE offline or disabled): there is no server to ask."""
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")


def run_id(name: str, facts: list[dict[str, Any]]) -> str:
    """The W&B run id of a supervisor run: its name and the ledger's first timestamp."""
    digest = hashlib.sha256(f"{name}|{ledger_id(facts)}".encode()).hexdigest()[:12]
    return f"{name[:40]}-{digest}"


class WandbTracker(Tracker):
    """Writes the run's final curves, restarts and status to one W&B run (see the module doc)."""

    name = "wandb"
    extra = "wandb"
    module = "wandb"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.curves = FinalCurves()
        self.wb: Any = None
        self.id = ""
        self._ledger = ""
        self._done = 0

    def target(self) -> str:
        return f"wandb project {self.run.experiment}"

    def open(self, facts: list[dict[str, Any]], done: int) -> int:
        self.id = run_id(self.run.name, facts)
        self._ledger = ledger_id(facts)
        run = self._init()
        held = run.summary.get("supervisor/facts")
        if run.summary.get("supervisor/ledger") == self._ledger and isinstance(held, int) and 0 <= held <= len(facts):
            done = held  # the server's own cursor: it holds exactly these
        elif not run.resumed and not _offline():
            done = 0  # the server has no such run (any more): all of it
        self.curves = FinalCurves()
        self.replay(self.curves, facts[:done])
        self._done = done
        return done

    def _init(self) -> Any:
        import wandb

        if self.wb is None:
            # Without credentials wandb.init would ask for a key on the terminal, from the supervisor's thread.
            if not _offline() and not wandb.login(prompt=False, verify=False):
                raise RuntimeError("W&B has no API key: set WANDB_API_KEY (or `wandb login`), or WANDB_MODE=offline")
            config = flatten(self.run.params)
            self.wb = wandb.init(project=self.run.experiment, name=self.run.name, id=self.id, resume="allow",
                                 dir=str(self.run.run_dir), config=config, reinit="create_new",
                                 settings=wandb.Settings(silent=True, console="off"))  # fmt: skip
            self.wb.define_metric("position")
            self.wb.define_metric("attempt")
            for pattern in ("train/*", "eval/*"):
                self.wb.define_metric(pattern, step_metric="position")
            for key in ("restarts", "work_lost/*"):
                self.wb.define_metric(key, step_metric="attempt")
        return self.wb

    def write(self, facts: list[dict[str, Any]]) -> None:
        import wandb

        ops: list[FinalOp] = self.translate(self.curves, facts)
        for op in ops:
            run = self._init()
            if isinstance(op, Metrics):
                by_position: dict[int, dict[str, float]] = {}
                for key, step, value, _ in op.points:
                    by_position.setdefault(step, {})[key] = value
                for position in sorted(by_position):
                    run.log({"position": position, **by_position[position]})
            elif isinstance(op, RestartOp):
                r = op.restart
                run.summary[f"supervisor/restart_{r.attempt:03d}"] = r.line(op.noun)
                rows = [[a.start, a.load, a.seed, a.reason, a.lost_steps] for a in self.curves.run.attempts]
                table = wandb.Table(columns=[op.noun, f"load_{op.noun}", "seed", "reason", "lost_steps"], data=rows)
                run.log({"attempt": r.attempt, "restarts": op.count, "work_lost/steps": op.lost_steps,
                         "work_lost/seconds": op.lost_s, "restart_table": table})  # fmt: skip
            elif isinstance(op, Status):
                run.summary["supervisor/status"] = op.status
                run.summary["supervisor/diagnosis"] = op.diagnosis
        run = self._init()
        run.summary["supervisor/facts"] = self._done + len(facts)
        run.summary["supervisor/ledger"] = self._ledger
        self._done += len(facts)
        ended = next((op for op in reversed(ops) if isinstance(op, Status)), None)
        if ended is not None and ended.status != "running":
            self.wb, wb = None, self.wb
            wb.finish(exit_code=EXIT_CODE.get(ended.status, 1))

    def close(self) -> None:
        if self.wb is not None:
            wb, self.wb = self.wb, None
            wb.finish()
