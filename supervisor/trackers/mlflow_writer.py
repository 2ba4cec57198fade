"""MLflow: one MLflow run per supervisor run, across attempts, sessions and machines.

Where: `mlflow_uri` when given, else a SQLite store in the run dir (`<run_dir>/mlflow/mlflow.db`): MLflow 3
refuses its file store unless told to, and SQLite is what it suggests. A SQLite store keeps its artifacts in
`artifacts/` beside the database (MLflow's default is ./mlruns in the current directory).
Which run: the one tagged `supervisor.run` = the run's name (and `supervisor.ledger` = the ledger's first
timestamp, so a new run that reuses the name starts a new MLflow run) in the experiment (default "supervisor"),
created once and found again by a restarted supervisor or another machine using the same tracking server.

Rewinds: MLflow keeps every value it is given, so a value is logged only once its position is final, i.e. a
verified checkpoint at or after it is on the current line of training (`train` facts come with checkpoints;
eval metrics wait for theirs). Values of positions an attempt trains again before they were verified are never
logged. A rollback (the policy resuming before a verified checkpoint) cannot take logged values back: the
positions already logged keep their first value (step = position, one value each, steps increasing) and the
ledger and report hold the new ones. What the server already holds (another machine, a write cut short) is
read back at open and not logged twice.

Restarts: a tag `supervisor.restart.NNN` per restart (position, load position, seed, reason, work lost), the
metrics `restarts`, `work_lost/steps`, `work_lost/seconds` (running totals, step = attempt number), and the
artifact `restarts.md` (the restart table). Status: completed and early stopped -> FINISHED, gave up -> FAILED,
paused -> KILLED (set back to RUNNING when an attempt starts again); the ledger's status and diagnosis as tags.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from supervisor.record import flatten
from supervisor.trackers.events import FinalCurves, FinalOp, Metrics, RestartOp, Status, ledger_id
from supervisor.trackers.sync import Tracker

RUN_TAG = "supervisor.run"
LEDGER_TAG = "supervisor.ledger"  # the ledger's first timestamp: a new run that reuses a name gets a new MLflow run
LOCAL_DIR = "mlflow"
STATUS = {"completed": "FINISHED", "early stopped": "FINISHED", "gave up": "FAILED", "paused": "KILLED"}
MAX_PARAM = 500  # the limit of older tracking servers (newer take 6000)
MAX_TAG = 5000
BATCH = 1000  # metrics per log_batch call (the REST limit)


def _ms(ts: float) -> int:
    return int(ts * 1000)


class MlflowTracker(Tracker):
    """Writes the run's final curves, restarts and status to one MLflow run (see the module doc)."""

    name = "mlflow"
    extra = "mlflow"
    module = "mlflow"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.curves = FinalCurves()
        self.client: Any = None
        self.run_id = ""
        self.held: dict[str, int] = {}  # per key: the highest step the server held at open

    @property
    def uri(self) -> str:
        if self.run.mlflow_uri:
            return self.run.mlflow_uri
        return f"sqlite:///{(self.run.run_dir / LOCAL_DIR / 'mlflow.db').resolve()}"

    def target(self) -> str:
        where = self.run.mlflow_uri or f"{LOCAL_DIR}/mlflow.db in the run dir"
        return f"{where} experiment {self.run.experiment}"

    def open(self, facts: list[dict[str, Any]], done: int) -> int:
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables": not the user's business
            logging.getLogger(noisy).setLevel(logging.WARNING)

        if not self.run.mlflow_uri:
            (self.run.run_dir / LOCAL_DIR).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment()
        ledger = ledger_id(facts)
        # run names are [A-Za-z0-9._-] and the ledger id a number: nothing to escape
        query = f"tags.`{RUN_TAG}` = '{self.run.name}' and tags.`{LEDGER_TAG}` = '{ledger}'"
        found = self.client.search_runs([experiment_id], filter_string=query, max_results=1,
                                        order_by=["attributes.start_time ASC"])  # fmt: skip
        if found:
            run = found[0]
            self.held = {key: max((m.step for m in self.client.get_metric_history(run.info.run_id, key)), default=-1)
                         for key in run.data.metrics}  # fmt: skip
        else:
            start = _ms(float(facts[0].get("ts", 0.0))) if facts else None
            run = self.client.create_run(experiment_id, start_time=start, run_name=self.run.name,
                                         tags={RUN_TAG: self.run.name, LEDGER_TAG: ledger,
                                               "supervisor.unit": self.run.unit})  # fmt: skip
            self.held, done = {}, 0
        self.run_id = run.info.run_id
        self._log_params(run.data.params)
        self.curves = FinalCurves()
        self.replay(self.curves, facts[:done])
        return done

    def _experiment(self) -> str:
        """The experiment's id, created when missing (a SQLite store keeps its artifacts beside the database)."""
        from mlflow.exceptions import MlflowException

        name = self.run.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None  # a tracking server keeps its own artifact store
        if self.uri.startswith("sqlite:///"):  # MLflow's default would be ./mlruns in whatever directory we are in
            location = (Path(self.uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it first
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, held: dict[str, str]) -> None:
        """The params the run does not hold yet (params are logged once: MLflow refuses to change one)."""
        from mlflow.entities import Param

        wanted = {k: v if isinstance(v, str) else json.dumps(v, default=str)
                  for k, v in flatten(self.run.params).items()}  # fmt: skip
        wanted = {k[:250]: v if len(v) <= MAX_PARAM else v[: MAX_PARAM - 3] + "..." for k, v in wanted.items()}
        changed = sorted(k for k, v in wanted.items() if k in held and held[k] != v)
        if changed:
            self.problems.warn(self.name, "params changed", f"params {', '.join(changed)} differ from those the "
                                                            "MLflow run holds; MLflow keeps the first values")
        params = [Param(k, v) for k, v in sorted(wanted.items()) if k not in held]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def write(self, facts: list[dict[str, Any]]) -> None:
        ops: list[FinalOp] = self.translate(self.curves, facts)
        points: list[tuple[str, int, float, float]] = []
        tags: dict[str, str] = {}
        statuses: list[Status] = []
        for op in ops:
            if isinstance(op, Metrics):
                points += op.points
            elif isinstance(op, RestartOp):
                r = op.restart
                tags[f"supervisor.restart.{r.attempt:03d}"] = r.line(op.noun)
                tags["supervisor.restarts"] = str(op.count)
                points += [("restarts", r.attempt, float(op.count), r.ts),
                           ("work_lost/steps", r.attempt, float(op.lost_steps), r.ts),
                           ("work_lost/seconds", r.attempt, op.lost_s, r.ts)]  # fmt: skip
            elif isinstance(op, Status):
                statuses.append(op)
        self._log(points, tags)
        if any(isinstance(op, (RestartOp, Status)) for op in ops):
            self.client.log_text(self.run_id, f"# {self.run.name}: restarts\n\n{self.curves.run.table()}",
                                 "restarts.md")  # fmt: skip
        for status in statuses:
            self._status(status)

    def _log(self, points: list[tuple[str, int, float, float]], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, _ms(ts), step) for key, step, value, ts in points
                   if step > self.held.get(key, -1)]  # fmt: skip
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])
        run_tags = _tags(tags)
        for i in range(0, len(run_tags), 100):
            self.client.log_batch(self.run_id, tags=run_tags[i : i + 100])

    def _status(self, op: Status) -> None:
        if op.status == "running":
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.client.log_batch(self.run_id, tags=_tags({"supervisor.status": op.status,
                                                       "supervisor.diagnosis": op.diagnosis}))  # fmt: skip
        self.client.set_terminated(self.run_id, status=STATUS.get(op.status, "FINISHED"), end_time=_ms(op.ts))


def _tags(values: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v[:MAX_TAG]) for k, v in values.items()]
