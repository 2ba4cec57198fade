"""The experiment record of a run, derived from its ledger: restart table, checkpoints, best metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor import ledger as L
from supervisor import record
from supervisor.layout import RunLayout
from supervisor.lineage import Runs
from supervisor.monitors.events import EventTail
from supervisor.protocol import EVENT_STEP
from supervisor.store.base import StoreError
from supervisor.store.settings import StorageSettings


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def build(run_dir: Path, name: str, running: bool, best_metric: str | None = None, mode: str = "max",
          runs: Runs | None = None) -> dict:  # fmt: skip
    """The report of the run in `run_dir` (see from_facts)."""
    return from_facts(L.read_facts(run_dir / L.LEDGER_NAME), name, running, best_metric, mode, runs)


def from_facts(facts: list[dict], name: str, running: bool, best_metric: str | None = None, mode: str = "max",
               runs: Runs | None = None) -> dict:  # fmt: skip
    """The report as one JSON-able object (fixed surface: name, status, restarts, checkpoints, best, and the
    record's parent, params, param_changes, baselines, early_stop, work_lost). A run of steps (`unit` "steps")
    names positions `step` where a run of epochs names them `epoch`. `runs`: where the parent and baselines are."""
    view = L.fold(facts)
    noun = view.noun
    status = L.STATUS_RUNNING if running else view.status
    if not running and status == L.STATUS_RUNNING and view.attempts:
        status = L.STATUS_PAUSED  # the supervisor vanished mid-run; the next start continues it
    best = record.best_of(view, {best_metric: mode} if best_metric else None)
    attempts = []
    for a in view.attempts:
        if noun == "step":
            attempts.append({
                "attempt": a.attempt, "step": max(1, a.start_epoch), "load_step": a.load_epoch, "seed": a.seed,
                "reason": a.reason, "ended_by": a.fault, "exit": a.exit, "failed_step": a.failed_epoch,
                "steps": a.steps, "batch_divisor": a.batch_divisor, "host": a.host,
                "duration_s": round(a.ended_at - a.started_at, 1) if a.ended_at else None,
                "lost_steps": a.lost_steps, "lost_s": a.lost_s, "detail": a.detail, "rank": a.rank, "node": a.node,
            })  # fmt: skip
            continue
        attempts.append({
            "attempt": a.attempt, "epoch": a.start_epoch, "load_epoch": a.load_epoch, "seed": a.seed,
            "reason": a.reason, "ended_by": a.fault, "exit": a.exit, "failed_epoch": a.failed_epoch,
            "load_step": a.load_step, "steps": a.steps, "batch_divisor": a.batch_divisor, "host": a.host,
            "duration_s": round(a.ended_at - a.started_at, 1) if a.ended_at else None,
            "lost_steps": a.lost_steps, "lost_s": a.lost_s, "detail": a.detail, "rank": a.rank, "node": a.node,
        })  # fmt: skip
    lost: dict[str, dict[str, Any]] = {}
    for a in view.attempts:
        if a.lost_steps is not None and a.fault:
            row = lost.setdefault(a.fault, {"attempts": 0, "steps": 0, "seconds": 0.0})
            row["attempts"] += 1
            row["steps"] += a.lost_steps
            row["seconds"] = round(row["seconds"] + (a.lost_s or 0.0), 3)
    plan = view.plan
    return record.extend({
        "name": name,
        "unit": view.unit,
        "status": status,
        "diagnosis": view.diagnosis,
        "restarts": view.restart_rows(),
        "checkpoints": view.verified_epochs(),
        "checkpoint_files": {e: {"path": r.path, "size": r.size, "sha256": r.sha256}
                             for e, r in sorted(view.checkpoints.items())},  # fmt: skip
        "mid_epoch_checkpoints": [{"epoch": r.epoch, "step": r.step, "path": r.path, "size": r.size, "sha256": r.sha256}
                                  for _, r in sorted(view.partials.items())],  # fmt: skip
        "work_lost": lost,
        "checkpointing": {"every_s": plan.get("every_s"), "why": plan.get("why"),
                          "costs": {k: plan.get(k) for k in ("step_s", "save_s", "stall_s", "size", "upload_bps")}},
        "best": best,
        "metrics": {e: {k: _finite(v) for k, v in m.items()} for e, m in sorted(view.metrics.items())},
        "train": {e: {k: _finite(v) for k, v in t.items()} for e, t in sorted(view.train.items())},
        "attempts": attempts,
    }, view, runs)


def to_markdown(rep: dict) -> str:
    """The report as the markdown table the experiment log used to be kept in, by hand."""
    noun = "step" if rep.get("unit") == "steps" else "epoch"
    out = [f"# {rep['name']}", "", *record.header_lines(rep), f"* status: {rep['status']}"]
    if rep.get("diagnosis"):
        out.append(f"* why it ended: {rep['diagnosis']}")
    out += record.result_lines(rep)
    ck = rep["checkpoints"]
    out.append(f"* verified checkpoints: {', '.join(map(str, ck)) if ck else 'none'}")
    for m in rep.get("mid_epoch_checkpoints", []):
        out.append(f"* mid-epoch checkpoint: epoch {m['epoch']} step {m['step']}")
    every = rep.get("checkpointing", {}).get("every_s")
    if every is not None:
        why = rep["checkpointing"].get("why")
        out.append(f"* checkpoints every {every:g}s of training" + (f" ({why})" if why else ""))
    for reason, w in rep.get("work_lost", {}).items():
        out.append(f"* work lost to '{reason}': {w['steps']} steps, {w['seconds']:.1f}s of training over "
                   f"{w['attempts']} attempt(s)")
    ranks = any("rank" in r for r in rep["restarts"])  # several processes: which rank caused each restart
    out += ["", f"| {noun} | load_{noun} | seed | reason |" + (" rank |" if ranks else ""),
            "| :---: | :---: | :---: | :---: |" + (" :---: |" if ranks else "")]  # fmt: skip
    for r in rep["restarts"]:
        rank = (" - |" if r.get("rank") is None else f" {r['rank']} |") if ranks else ""
        if noun == "step":
            out.append(f"| {r['step']} | {r['load_step']} | {r['seed']} | {r['reason']} |{rank}")
            continue
        load = r["load_epoch"] if r.get("load_step") is None else f"{r['load_epoch']} @ step {r['load_step']}"
        out.append(f"| {r['epoch']} | {load} | {r['seed']} | {r['reason']} |{rank}")
    return "\n".join(out) + "\n"


def is_store_url(target: str) -> bool:
    return target.startswith(("s3://", "file://"))


def store_settings(url: str, endpoint: str | None) -> StorageSettings:
    """Settings for a store url given on the command line (the endpoint from the flag or $AWS_ENDPOINT_URL)."""
    return StorageSettings(url=url, endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL") or None,
                           addressing_style="path" if endpoint or os.environ.get("AWS_ENDPOINT_URL") else "auto")


def load(target: str, endpoint: str | None = None, holder: Callable[[Path], Any] | None = None) -> dict | str:
    """The report of one run (a run.toml, a run dir, or a store url of a run): the dict, or why there is none.
    A run.toml whose run dir is gone is read from its store."""
    from supervisor.config import load_config

    cfg, metric, mode, running = None, None, "max", False
    if is_store_url(target):
        prefix, _, name = target.rstrip("/").rpartition("/")
        runs = Runs(store_settings(prefix, endpoint))
        facts = runs.facts(name)
        where = f"{prefix}/{name}"
    elif Path(target).is_dir():
        run_dir = Path(target).resolve()
        name, runs = run_dir.name, Runs(folder=run_dir.parent)
        facts, where = L.read_facts(run_dir / L.LEDGER_NAME) if (run_dir / L.LEDGER_NAME).exists() else None, run_dir
    else:
        cfg = load_config(Path(target))  # ConfigError: the caller's
        run_dir, name, runs = cfg.resolved_run_dir(), cfg.name, Runs.beside(cfg)
        metric, mode = cfg.checkpoints.best_metric, cfg.checkpoints.best_mode
        running = holder is not None and holder(run_dir) is not None
        try:
            facts = L.read_facts(run_dir / L.LEDGER_NAME) if (run_dir / L.LEDGER_NAME).exists() else runs.facts(name)
        except StoreError as exc:
            return f"run '{name}': no ledger in {run_dir}, and its store cannot be read: {exc}"
        where = f"{run_dir} or {runs.describe()}" if cfg.storage else run_dir
    if not facts:
        return f"{where} holds no run (no ledger.jsonl); pass a run.toml, a run dir or a store url of a run"
    return from_facts(facts, name, running, metric, mode, runs)


def show(target: str, plot: bool = True) -> dict | str:
    """In a notebook: the record of a run (a run.toml, run dir or store url) as markdown, and its plot inline when
    matplotlib is there; elsewhere printed. Returns the report (or why there is none)."""
    rep = load(target)
    if isinstance(rep, str):
        print(rep)
        return rep
    from supervisor import plots

    if plots.in_kernel():
        from IPython.display import Markdown, display

        display(Markdown(to_markdown(rep)))
    else:
        print(to_markdown(rep))
    if plot:
        import tempfile

        with contextlib.suppress(RuntimeError), tempfile.TemporaryDirectory() as tmp:  # no matplotlib: no plot
            plots.display_inline(plots.plot_run(rep, Path(tmp) / f"{rep['name']}.png"))  # the PNG is read here
    return rep


def render(rep: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rep, indent=2, allow_nan=False, default=str) + "\n"
    return to_markdown(rep)


def status(run_dir: Path, name: str, holder: dict | None) -> dict:
    """Live state: status, attempt, epoch, last loss, age of the last sign of life."""
    view = L.fold(L.read_facts(run_dir / L.LEDGER_NAME))
    running = bool(holder)
    out: dict[str, Any] = {"name": name, "run_dir": str(run_dir),
                           "status": L.STATUS_RUNNING if running else (view.status if view.attempts else "not started")}
    if not running and out["status"] == L.STATUS_RUNNING:
        out["status"] = L.STATUS_PAUSED
    last = view.last
    if holder:
        out["supervisor"] = {"pid": holder.get("pid"), "host": holder.get("host")}
    if last is not None:
        out.update(attempt=last.attempt, seed=last.seed, epoch=last.start_epoch, reason=last.reason)
        if view.unit == "steps":
            out["unit"] = "steps"
        events = RunLayout(run_dir).attempt_events(last.attempt)
        evs = EventTail(events).poll()
        if evs:
            age = time.time() - events.stat().st_mtime
            out["last_heartbeat_age_s"] = round(age, 1)
            steps = [e for e in evs if e.kind == EVENT_STEP]
            if steps:
                out["epoch"] = steps[-1].epoch if steps[-1].epoch is not None else out["epoch"]
                out["last_loss"] = steps[-1].data.get("loss")
                out["step"] = steps[-1].data.get("step")
    if view.unit == "steps" and "epoch" in out:  # positions are steps: the step reached, not an epoch
        out["step"] = out.pop("epoch") if out.get("step") is None else out["step"]
        out.pop("epoch", None)
    out["verified_checkpoints"] = view.verified_epochs()
    out["restarts"] = max(0, len(view.attempts) - 1)
    return out
