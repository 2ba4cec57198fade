"""The experiment record of a run, in the structure of the log it replaces (docs/record.md): dates, purpose and
notes, the parent it started from, its parameters and what changed against the parent (or a chosen run), the
best value of each metric with deltas in points against the baselines, the early stop, work lost, restarts.

`extend(rep, view, runs)` adds these to a report (report.build); `to_markdown(rep)` writes them; `index(reps)`
is the table at the top of `report --all`. Other runs (parent, baselines) are read through lineage.Runs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from supervisor import ledger as L
from supervisor.lineage import Runs
from supervisor.store.base import StoreError

# Metrics that are fractions shown as percentages (the log's AP@.5 and VOCmAP); their deltas are in points.
PERCENT = ("AP50", "VOCmAP", "mAP", "AP", "acc", "accuracy")


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def param_changes(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every parameter that differs: {key: {"from": theirs, "to": ours}} (None for a key one side lacks)."""
    a, b = flatten(ours), flatten(theirs)
    return {k: {"from": b.get(k), "to": a.get(k)} for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def is_fraction(metric: str, *values: float) -> bool:
    """A metric shown in % and compared in points: a known fraction name with values in [0, 1]."""
    known = any(metric == p or metric.lower() == p.lower() for p in PERCENT)
    return known and all(0.0 <= v <= 1.0 for v in values)


def delta(metric: str, ours: float, theirs: float) -> dict[str, Any]:
    """Our best minus theirs: in points for fractions (0.5225 vs 0.5243: -0.18 points), else as is."""
    if is_fraction(metric, ours, theirs):
        return {"delta": round((ours - theirs) * 100, 4), "unit": "points"}
    return {"delta": ours - theirs, "unit": "value"}


def best_of(view: L.RunView, overrides: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The best value of each eval metric and where (max, or min for names with "loss", unless overridden)."""
    out: dict[str, dict[str, Any]] = {}
    for metric in sorted({k for m in view.metrics.values() for k in m}):
        mode = (overrides or {}).get(metric) or ("min" if "loss" in metric.lower() else "max")
        found = view.best(metric, mode)
        if found is not None:
            out[metric] = {"value": found[0], view.noun: found[1], "mode": mode}
    return out


def _other(runs: Runs | None, name: str) -> tuple[L.RunView | None, str | None]:
    """Another run's view, or why it cannot be read."""
    if runs is None:
        return None, "no store or runs folder to look in"
    try:
        facts = runs.facts(name)
    except StoreError as exc:
        return None, f"cannot read it: {exc}"
    if facts is None:
        return None, f"not found in {runs.describe()}"
    return L.fold(facts), None


def extend(rep: dict[str, Any], view: L.RunView, runs: Runs | None) -> dict[str, Any]:
    """Add the record's fields to report `rep` (fixed surface: parent, params, param_changes, baselines,
    early_stop; work_lost is the report's)."""
    record = view.record
    rep["dates"] = {"started": view.sessions[0] if view.sessions else None, "ended": view.ended_at}
    rep["purpose"] = record.get("purpose") or ""
    rep["notes"] = [*record.get("notes", []), *(text for _, text in view.notes)]
    rep["params"] = view.params
    rep["parent"] = view.parent
    rep["early_stop"] = view.early_stop
    others: dict[str, L.RunView | None] = {}
    compare = record.get("compare_to") or (view.parent or {}).get("run") or next(iter(record.get("baselines", [])),
                                                                                 None)  # fmt: skip
    rep["param_changes"] = None
    if compare is not None:
        other, why = _other(runs, compare)
        others[compare] = other
        rep["param_changes"] = {"against": compare, "changes": param_changes(view.params, other.params)} if (
            other is not None) else {"against": compare, "error": why}  # fmt: skip
    rep["baselines"] = []
    for name in record.get("baselines", []):
        other, why = (others[name], None) if others.get(name) is not None else _other(runs, name)
        if other is None:
            rep["baselines"].append({"run": name, "error": why})
            continue
        theirs = best_of(other, {m: b["mode"] for m, b in rep["best"].items()})
        deltas = {m: {**delta(m, b["value"], theirs[m]["value"]), "theirs": theirs[m]["value"],
                      other.noun: theirs[m][other.noun]}
                  for m, b in rep["best"].items() if m in theirs}  # fmt: skip
        rep["baselines"].append({"run": name, "best": theirs, "deltas": deltas})
    return rep


def _when(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _value(metric: str, value: float) -> str:
    return f"{value * 100:.2f}%" if is_fraction(metric, value) else f"{value:.4g}"


def _points(d: dict[str, Any]) -> str:
    sign = "+" if d["delta"] >= 0 else "-"
    return f"{sign} {abs(d['delta']):.2f}%" if d["unit"] == "points" else f"{sign} {abs(d['delta']):.4g}"


def header_lines(rep: dict[str, Any]) -> list[str]:
    """The record's first bullets: dates, purpose, the parent, the notes."""
    noun = "step" if rep.get("unit") == "steps" else "epoch"
    started, ended = (rep.get("dates") or {}).get("started"), (rep.get("dates") or {}).get("ended")
    out = [f"* date: {_when(started)}" + (f" to {_when(ended)}" if ended else "")]
    if rep.get("purpose"):
        out.append(f"* purpose: {rep['purpose']}")
    if rep.get("parent"):
        p = rep["parent"]
        out.append(f"* from: `{p['run']}` @ {noun} {p.get(noun)}")
    for note in rep.get("notes") or []:
        out.append(f"* note: {note}")
    return out


def result_lines(rep: dict[str, Any]) -> list[str]:
    """What the run reached: the early stop, best metrics against the baselines, the parameters and changes."""
    noun = "step" if rep.get("unit") == "steps" else "epoch"
    out = []
    if rep.get("early_stop"):
        e = rep["early_stop"]
        out.append(f"* early stop: {e['rule']} ({e['metric']} {_value(e['metric'], e['value'])} at {noun} "
                   f"{e['epoch']})")  # fmt: skip
    for metric, b in (rep.get("best") or {}).items():
        line = f"* {b['mode']} {metric}: {_value(metric, b['value'])} @ {noun} {b[noun]}"
        for base in rep.get("baselines") or []:
            d = (base.get("deltas") or {}).get(metric)
            if d is not None:
                line += f", {_points(d)} [{base['run']}]"
        out.append(line)
    for base in rep.get("baselines") or []:
        if base.get("error"):
            out.append(f"* baseline `{base['run']}`: {base['error']}")
    changes = rep.get("param_changes")
    if changes and changes.get("error"):
        out.append(f"* parameter changes against `{changes['against']}`: {changes['error']}")
    elif changes:
        shown = [f"  {k} = {json.dumps(v['to'])}  # was {json.dumps(v['from'])}" for k, v in changes["changes"].items()]
        out += [f"* significant parameter changes against `{changes['against']}`:" + (" none" if not shown else ""),
                *(["  ```python", *shown, "  ```"] if shown else [])]  # fmt: skip
    if rep.get("params"):
        body = [f"  {k} = {json.dumps(v)}" for k, v in flatten(rep["params"]).items()]
        out += ["* <details>", "  <summary>parameters</summary>", "", "  ```toml", *body, "  ```", "  </details>"]
    return out


def index(reps: list[dict[str, Any]]) -> str:
    """The table at the top of the whole log: run, date, best metrics, length, restarts, status."""
    metrics: list[str] = []
    for rep in reps:
        for m in rep.get("best") or {}:
            if m not in metrics:
                metrics.append(m)
    metrics.sort(key=lambda m: (m not in ("AP50", "VOCmAP"), m))
    metrics = metrics[:4]
    head = ["run", "date", *(f"best {m}" for m in metrics), "length", "restarts", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + " :---: |" * len(head)]
    for rep in reps:
        noun = "step" if rep.get("unit") == "steps" else "epoch"
        cells = [f"[{rep['name']}](#{rep['name'].lower()})", _when((rep.get("dates") or {}).get("started"))[:10]]
        for m in metrics:
            b = (rep.get("best") or {}).get(m)
            cells.append("-" if b is None else f"{_value(m, b['value'])} @ {b[noun]}")
        done = rep.get("checkpoints") or []
        cells += [f"{max(done) + (0 if noun == 'step' else 1)} {noun}s" if done else "-",
                  str(max(0, len(rep.get("restarts") or []) - 1)), rep.get("status", "-")]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
