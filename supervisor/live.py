"""The live view of a run (`supervisor status RUN --watch`): progress, pace, ETA, best metrics, restarts,
session time and pending uploads, from the ledger, the current attempt's events and the watchdog's live.json.

Everything here only reads: it may run in any process, next to a running supervisor or after it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from supervisor import ledger as L
from supervisor import report
from supervisor.layout import RunLayout
from supervisor.protocol import EVENT_STEP, Event, parse_event
from supervisor.store.progress import human_bytes

STALE_AFTER_S = 10.0  # live.json is rewritten every 2 s: older than this with no holder, its writer is gone
LABEL_W = 12  # a rendered line: the label right-aligned in 10 columns, two spaces, the text
TAIL_BYTES = 1 << 18  # the events file's end, read each refresh: a long attempt's file is many MB


def _read_live(path: Path) -> dict[str, Any] | None:
    """live.json's fields, or None when absent or unreadable (it is replaced atomically, so rarely torn)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail_events(path: Path) -> tuple[list[Event], float | None]:
    """(events, mtime) of the end of an events file, read back far enough to hold a step event if it has one;
    ([], None) when it does not exist. A partial last line (still being written) is left out."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size, mtime = st.st_size, st.st_mtime
            want = TAIL_BYTES
            while True:
                start = max(0, size - want)
                f.seek(start)
                lines = f.read(size - start).split(b"\n")
                lines.pop()  # b"" after the last newline, or a line still being written
                if start > 0 and lines:
                    lines.pop(0)  # cut in the middle
                events = [e for e in (parse_event(x.decode("utf-8", errors="replace")) for x in lines) if e]
                if start == 0 or any(e.kind == EVENT_STEP for e in events):
                    return events, mtime
                want *= 4
    except FileNotFoundError:
        return [], None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _epoch_seconds(facts: list[dict[str, Any]], attempt: int | None) -> float | None:
    """Median wall time of an epoch (training, evaluation and save): between consecutive end-of-epoch checkpoints
    recorded by the same attempt, `attempt`'s own when it has two (this machine's pace); None until a pair exists."""
    ends: dict[int, tuple[Any, float]] = {}
    for f in facts:
        if f.get("fact") == L.CHECKPOINT and f.get("step") is None and isinstance(f.get("epoch"), int):
            ts = _number(f.get("ts"))
            if ts is not None:
                ends[f["epoch"]] = (f.get("attempt"), ts)
    gaps = [(ends[e][0], ends[e][1] - ends[e - 1][1]) for e in sorted(ends)
            if e - 1 in ends and ends[e][0] == ends[e - 1][0] and ends[e][1] > ends[e - 1][1]]  # fmt: skip
    own = [g for a, g in gaps if a == attempt] or [g for _, g in gaps]
    return statistics.median(own[-5:]) if own else None


def _status_keys(out: dict[str, Any], view: L.RunView, layout: RunLayout, now: float) -> list[Event]:
    """Fill in report.status's attempt keys (same names and meaning), reading only the end of the events file;
    returns the events read."""
    last = view.last
    if last is None:
        return []
    out.update(attempt=last.attempt, seed=last.seed, epoch=last.start_epoch, reason=last.reason)
    events, mtime = _tail_events(layout.attempt_events(last.attempt))
    if events and mtime is not None:
        out["last_heartbeat_age_s"] = round(now - mtime, 1)
        step_ev = _last_step(events)
        if step_ev is not None:
            out["epoch"] = step_ev.epoch if step_ev.epoch is not None else out["epoch"]
            out["last_loss"] = step_ev.data.get("loss")
            out["step"] = step_ev.data.get("step")
    if view.unit == "steps":  # positions are steps: the step reached, not an epoch
        out["step"] = out.pop("epoch") if out.get("step") is None else out["step"]
        out.pop("epoch", None)
    return events


def _last_step(events: list[Event]) -> Event | None:
    return next((e for e in reversed(events) if e.kind == EVENT_STEP), None)


def _steps_per_epoch(view: L.RunView, events: list[Event]) -> int | None:
    """The most steps an epoch took (ledger `train` facts, and epochs this attempt finished); None if none yet."""
    counts = [int(t["steps"]) for t in view.train.values() if isinstance(t.get("steps"), int)]
    step_ev = _last_step(events)
    cur = step_ev.epoch if step_ev is not None else None
    counts += [e.data["step"] + 1 for e in events if e.kind == EVENT_STEP and e.epoch is not None
               and cur is not None and e.epoch < cur and isinstance(e.data.get("step"), int)]  # fmt: skip
    return max(counts, default=None)


def _done(
    view: L.RunView, status: str, total: int | None, events: list[Event], steps_per_epoch: int | None,
    live_position: Any,
) -> float:  # fmt: skip
    """Positions done (epochs, fractional within one; or steps): all when completed, else what is verified or, while
    running, what the last step event reached, or live.json's position where the trainer writes no events."""
    steps_run = view.unit == "steps"
    high = max(view.checkpoints, default=-1)  # the newest whole position verified (mid-epoch ones are not)
    done = float(max(0, high if steps_run else high + 1))
    if status == L.STATUS_COMPLETED:
        return float(total) if total is not None else done
    if status != L.STATUS_RUNNING:
        return done
    last = view.last
    if last is not None:  # where this attempt began
        done = max(done, float(last.start_epoch - 1 if steps_run else last.start_epoch))
    if isinstance(live_position, int) and not isinstance(live_position, bool):  # the position in progress
        done = max(done, float(live_position - 1 if steps_run else live_position))
    step_ev = _last_step(events)
    s = None if step_ev is None else step_ev.data.get("step")
    if steps_run and isinstance(s, int):
        return max(done, float(s))
    if step_ev is not None and isinstance(s, int) and step_ev.epoch is not None:
        frac = min(1.0, (s + 1) / steps_per_epoch) if steps_per_epoch else 0.0
        return max(done, step_ev.epoch + frac)
    return done


def gather(
    run_dir: Path, name: str, holder: dict | None, *, span: int | None = None, best_metric: str | None = None,
    mode: str = "max", now: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The live state as one JSON-able dict: report.status's keys plus span, progress, pace, ETA, best, restarts,
    session time and uploads. `span` (the config's) is used when no live.json says it; `now` is for tests."""
    now = time.time() if now is None else now
    layout = RunLayout(run_dir)
    facts = L.read_facts(layout.ledger)
    view = L.fold(facts)
    steps_run = view.unit == "steps"
    noun = "step" if steps_run else "epoch"
    running = bool(holder)
    out: dict[str, Any] = {
        "name": name,
        "run_dir": str(run_dir),
        "status": L.STATUS_RUNNING if running else (view.status if view.attempts else "not started"),
    }
    if not running and out["status"] == L.STATUS_RUNNING:
        out["status"] = L.STATUS_PAUSED  # the supervisor vanished mid-run; the next start continues it
    if holder:
        out["supervisor"] = {"pid": holder.get("pid"), "host": holder.get("host")}
    events = _status_keys(out, view, layout, now)
    out["unit"] = view.unit
    out["verified_checkpoints"] = view.verified_epochs()
    out["restarts"] = max(0, len(view.attempts) - 1)
    out["diagnosis"] = view.diagnosis

    live = _read_live(layout.live)
    live_age = None if live is None else now - (_number(live.get("t")) or 0.0)
    out["live_age_s"] = None if live_age is None else round(live_age, 1)
    out["stale"] = bool(live is not None and not running and live_age is not None and live_age > STALE_AFTER_S)
    # Pace, ETA and uploads belong to the attempt running now, as its watchdog measured them.
    current = live if running and live is not None and live.get("attempt") == out.get("attempt") else None

    if live is not None and isinstance(live.get("span"), int):
        span = live["span"]
    if span is None and out["status"] == L.STATUS_COMPLETED and view.checkpoints:
        span = max(view.checkpoints) + 1  # complete: the last position (span - 1) is verified
    out["span"] = span
    step_ev = _last_step(events)
    out["last_lr"] = _number(step_ev.data.get("lr")) if step_ev is not None else None
    steps_per_epoch = None if steps_run else _steps_per_epoch(view, events)
    out["steps_per_epoch"] = steps_per_epoch
    total = None if span is None else (span - 1 if steps_run else span)
    done = _done(view, out["status"], total, events, steps_per_epoch, (current or {}).get("position"))
    out["done"] = round(done, 3)
    out["progress"] = round(min(1.0, done / total), 4) if total else None

    pace = _number(current.get("steps_per_s")) if current is not None else None
    batch = _number(step_ev.data.get("batch_size")) if step_ev is not None else None
    out["steps_per_s"] = pace
    out["images_per_s"] = round(pace * batch, 1) if pace and batch else None
    eta = None
    if current is not None and total:
        left = max(0.0, total - done)
        epoch_s = None if steps_run else _epoch_seconds(facts, out.get("attempt"))
        if epoch_s is not None:
            eta = left * epoch_s
        elif pace and (steps_run or steps_per_epoch):
            eta = left * (1 if steps_run else steps_per_epoch) / pace
    out["eta_s"] = None if eta is None else round(eta, 1)

    rep = report.build(run_dir, name, running, best_metric, mode)
    out["best"] = {m: {"value": b["value"], "position": b[noun], "mode": b["mode"]} for m, b in rep["best"].items()}
    rows = view.restart_rows()
    out["last_restart"] = ({"reason": rows[-1]["reason"], "seed": rows[-1]["seed"], "position": rows[-1][noun]}
                           if len(rows) > 1 else None)  # fmt: skip
    out.update(_session_and_uploads(live, current, now))
    return out


def _session_and_uploads(live: dict[str, Any] | None, current: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """The platform session's time left (any live.json: it is the machine's), and the running attempt's
    state, pause deadline and upload backlog."""
    live = live or {}
    end = _number(live.get("session_end"))
    deadline = _number(current.get("deadline")) if current is not None else None
    backlog = live.get("backlog_bytes") if isinstance(live.get("backlog_bytes"), int) else None
    bps = _number(current.get("upload_bps")) if current is not None else None
    upload_eta = None
    if current is not None and backlog is not None:
        upload_eta = 0.0 if backlog == 0 else round(backlog / bps, 1) if bps else None
    return {
        "session_left_s": None if end is None else round(max(0.0, end - now), 1),
        "deadline_left_s": None if deadline is None else round(max(0.0, deadline - now), 1),
        "platform": live.get("platform"),
        "state": current.get("state") if current is not None else None,
        "fault": current.get("fault") if current is not None else None,
        "backlog_bytes": backlog,
        "upload_bps": bps,
        "upload_eta_s": upload_eta,
    }


def human_seconds(s: float) -> str:
    """45s, 3m20s, 2h13m, 1d04h."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _bar(fraction: float, width: int) -> str:
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def render(info: dict[str, Any], width: int = 80) -> str:
    """gather()'s dict as a short block of labelled lines, none longer than `width`, ending in a newline."""
    noun = "step" if info.get("unit") == "steps" else "epoch"
    status = info.get("status", "?")
    lines: list[tuple[str, str]] = []
    head = [status]
    if info.get("state") and info["state"] != "running":
        head.append(info["state"] + (f" ({info['fault']})" if info.get("fault") else ""))
    if info.get("attempt") is not None:
        head.append(f"attempt {info['attempt']} (seed {info.get('seed')})")
    sup = info.get("supervisor")
    if sup:
        head.append(f"supervisor pid {sup.get('pid')} on {sup.get('host')}")
    lines.append(("run", f"{info.get('name', '?')}: " + ", ".join(head)))
    if info.get("stale"):
        lines.append(("warning", f"live.json is {human_seconds(info.get('live_age_s') or 0)} old and no supervisor "
                                 "holds the run: its watchdog died without cleaning up"))  # fmt: skip
    if status in (L.STATUS_COMPLETED, L.STATUS_GAVE_UP) and info.get("diagnosis"):
        lines.append(("note", info["diagnosis"]))
    if status == "not started":
        lines.append(("progress", "nothing trained yet: `supervisor start` with its run.toml begins it"))
        return _lines(lines, width)

    span, progress = info.get("span"), info.get("progress")
    total = None if span is None else (span - 1 if noun == "step" else span)
    running = status == L.STATUS_RUNNING
    of = "" if total is None else f"/{total}"
    done = int(info.get("done") or 0)
    if running and noun == "step":
        where = f"step {done}{of}"
    elif running and info.get("step") is not None:  # the epoch in progress counts from 0, as the ledger: = done
        spe = info.get("steps_per_epoch")
        where = f"epoch {info.get('epoch', done)}{of} step {info['step'] + 1}" + (f"/{spe}" if spe else "")
    elif running:
        where = f"epoch {done}{of}"
    else:  # what a resume starts from: the positions verified
        where = f"{done}{of} {noun}s verified"
    if progress is None:
        lines.append(("progress", where + ("" if total else " (the run's length is unknown: pass its run.toml)")))
    else:
        bar_w = max(10, min(40, width - LABEL_W - len(" 100%  ") - len(where) - 2))
        lines.append(("progress", f"{_bar(progress, bar_w)} {progress * 100:3.0f}%  {where}"))

    train = []
    if info.get("last_loss") is not None:
        train.append(f"last loss {_fmt(info['last_loss'])}")
    if info.get("last_lr") is not None:
        train.append(f"lr {info['last_lr']:.3g}")
    if info.get("steps_per_s"):
        train.append(f"{info['steps_per_s']:.3g} steps/s")
    if info.get("images_per_s"):
        train.append(f"{info['images_per_s']:.4g} img/s")
    if info.get("eta_s") is not None:
        train.append(f"ETA {human_seconds(info['eta_s'])}")
    if running and info.get("last_heartbeat_age_s") is not None:
        train.append(f"last event {human_seconds(info['last_heartbeat_age_s'])} ago")
    if train:
        lines.append(("training", ", ".join(train)))
    best = [f"{'min' if b.get('mode') == 'min' else 'max'} {m} {_fmt(b['value'])} @ {noun} {b['position']}"
            for m, b in (info.get("best") or {}).items()]  # fmt: skip
    lines.append(("best", ", ".join(best) if best else "no metrics yet"))
    restarts = f"{info.get('restarts', 0)}"
    last = info.get("last_restart")
    if last:
        restarts += f", last: {last['reason']} (seed {last['seed']}, from {noun} {last['position']})"
    lines.append(("restarts", restarts))
    if info.get("session_left_s") is not None:
        lines.append(("session", f"{human_seconds(info['session_left_s'])} left ({info.get('platform')})"))
    if info.get("deadline_left_s") is not None:
        lines.append(("deadline", f"{human_seconds(info['deadline_left_s'])} left to save and stop"))
    backlog = info.get("backlog_bytes")
    if backlog:
        eta = info.get("upload_eta_s")
        lines.append(("uploads", f"{human_bytes(backlog)} pending" + (f", ETA {human_seconds(eta)}" if eta else "")))
    elif backlog == 0 and running:
        lines.append(("uploads", "none pending"))
    return _lines(lines, width)


def _lines(rows: list[tuple[str, str]], width: int) -> str:
    """Labelled lines; a text too long for `width` wraps under itself (the terminal's wrapping would break a redraw)."""
    out = []
    for label, text in rows:
        parts = textwrap.wrap(text, max(20, width - LABEL_W)) or [""]
        out.append(f"{label[: LABEL_W - 2]:>{LABEL_W - 2}}  {parts[0]}")
        out += [" " * LABEL_W + part for part in parts[1:]]
    return "".join(line[:width].rstrip() + "\n" for line in out)


def watch(
    run_dir: Path, name: str, holder_fn: Callable[[], dict | None], stream: TextIO, interval_s: float = 2.0,
    count: int | None = None, *, as_json: bool = False, span: int | None = None, best_metric: str | None = None,
    mode: str = "max",
) -> int:  # fmt: skip
    """Render the run every `interval_s` to `stream` (a tty: redrawn in place; otherwise blocks separated by a
    blank line; `as_json`: one JSON object a line) until `count` refreshes, Ctrl-C, or the block after the run
    stopped running. Returns the exit code, 0."""
    tty = not as_json and getattr(stream, "isatty", lambda: False)()
    shown = 0
    try:
        while True:
            info = gather(run_dir, name, holder_fn(), span=span, best_metric=best_metric, mode=mode)
            if as_json:
                stream.write(json.dumps(info, default=str) + "\n")
            elif tty:
                width = shutil.get_terminal_size().columns
                stream.write("\x1b[H\x1b[J" + render(info, width))  # home, clear to the end: redraw in place
            else:
                stream.write(("\n" if shown else "") + render(info))
            stream.flush()
            shown += 1
            if info["status"] != L.STATUS_RUNNING or (count is not None and shown >= count):
                return 0
            time.sleep(interval_s)
    except KeyboardInterrupt:
        if tty:
            stream.write("\n")
        return 0
