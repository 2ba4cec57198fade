"""Experiment trackers written by the supervisor from the ledger: TensorBoard, MLflow, W&B.

One tracker run per supervisor run across attempts and machines, steps rewound to the resume point so curves
never zigzag, each restart recorded with its reason, seed and work lost. The trainer logs nothing itself:
`open_trackers(...)` returns a TrackerSync; `start()`, `notify(ledger_path)` after each fact, `close()` at the end.
Nothing here imports torch, and a tracker's own package is imported only on the sync thread.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from supervisor.trackers.mlflow_writer import MlflowTracker
from supervisor.trackers.sync import Problems, RunInfo, Tracker, TrackerSync
from supervisor.trackers.tensorboard_writer import TensorBoardTracker
from supervisor.trackers.wandb_writer import WandbTracker

__all__ = ["TRACKERS", "TrackerSync", "missing_packages", "open_trackers"]

TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, MlflowTracker, WandbTracker)}


def _missing(tracker: type[Tracker], mlflow_uri: str | None) -> list[str]:
    """The modules a tracker needs that are not installed."""
    modules = [tracker.module]
    if tracker is MlflowTracker and not mlflow_uri:
        modules += ["sqlalchemy", "alembic"]  # the SQLite store in the run dir
    return [m for m in modules if importlib.util.find_spec(m) is None]


def missing_packages(names: list[str], mlflow_uri: str | None = None) -> list[str]:
    """One line per named tracker whose package is not installed, with the extra that brings it."""
    out = []
    for name in names:
        kind = TRACKERS.get(name)
        if kind is not None and (missing := _missing(kind, mlflow_uri)):
            out.append(f"tracker '{name}' needs {', '.join(missing)}, not installed: "
                       f"pip install 'train-supervisor[{kind.extra}]'")  # fmt: skip
    return out


def open_trackers(names: list[str], run_name: str, run_dir: Path, params: dict[str, Any], unit: str,
                  mlflow_uri: str | None = None, experiment: str = "supervisor") -> TrackerSync | None:  # fmt: skip
    """A TrackerSync writing the run's ledger to the trackers named (not started); None for no names.
    ValueError (one line) for an unknown name or a tracker whose package is not installed."""
    if not names:
        return None
    problems = Problems()
    trackers = []
    for name in names:
        kind = TRACKERS.get(name)
        if kind is None:
            raise ValueError(f"unknown tracker '{name}': choose from {', '.join(TRACKERS)}")
        if problem := missing_packages([name], mlflow_uri):
            raise ValueError(problem[0])
        run = RunInfo(run_name, Path(run_dir), dict(params), unit, mlflow_uri, experiment)
        trackers.append(kind(run, problems))
    return TrackerSync(trackers, Path(run_dir))
