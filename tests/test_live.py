"""The live view (`supervisor status RUN --watch`): gather and render on hand-built run dirs, watch's loop, and
one run through the real CLI watched while it trains."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

from conftest import start_bg, wait_for, write_run

from supervisor import live, report
from supervisor.cli import _holder

HOLDER = {"pid": 4321, "host": "vm"}
NOW = 1_800_000_000.0
T0 = NOW - 500  # the session began here


def fact(kind: str, ts: float, **fields) -> dict:
    return {"fact": kind, "ts": ts, **fields}


def attempt_started(n: int, seed: int, load: int, reason: str, ts: float) -> dict:
    return fact("attempt_started", ts, attempt=n, seed=seed, load_epoch=load, load_step=None, start_epoch=load + 1,
                start_step=0, reason=reason, batch_divisor=1, pid=100 + n, host="vm", command=["t"])  # fmt: skip


def checkpoint(epoch: int, attempt: int, ts: float) -> dict:
    return fact("checkpoint", ts, epoch=epoch, path=f"checkpoints/epoch-{epoch:04d}.pt", size=53, sha256="ab" * 32,
                attempt=attempt)  # fmt: skip


def crash_end(n: int, ts: float, failed: int) -> dict:
    return fact("attempt_ended", ts, attempt=n, fault="crash", exit="exit 1", failed_epoch=failed, steps=12,
                progressed=True, detail="exit 1; last output: RuntimeError", tail=[], detected_at=ts)  # fmt: skip


def write_dir(run_dir: Path, facts: list[dict], events: dict[int, list[dict]] | None = None,
              live_json: dict | None = None) -> Path:  # fmt: skip
    """A run dir as `supervisor start` leaves it: ledger.jsonl, attempts/*.events.jsonl, live.json."""
    (run_dir / "attempts").mkdir(parents=True, exist_ok=True)
    (run_dir / "ledger.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    for n, evs in (events or {}).items():
        path = run_dir / "attempts" / f"attempt-{n:04d}.events.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    if live_json is not None:
        (run_dir / "live.json").write_text(json.dumps(live_json))
    return run_dir


def live_json(**over) -> dict:
    base = {"t": NOW - 1, "pid": 4321, "attempt": 1, "seed": 28, "unit": "epochs", "span": 6, "position": 3,
            "steps": 25, "started": T0 + 101, "steps_per_s": 10.0, "session_end": NOW + 3600, "platform": "kaggle",
            "deadline": None, "backlog_bytes": 2_000_000, "upload_bps": 1_000_000.0, "state": "running",
            "fault": None}  # fmt: skip
    return {**base, **over}


def epoch_run(run_dir: Path, live_over: dict | None = None, with_live: bool = True) -> Path:
    """Attempt 0 crashed in epoch 1; attempt 1 (seed 28) verified epochs 1 and 2, 20 s apart, and is 5 steps
    (of 10) into epoch 3."""
    facts = [
        fact("session_started", T0, pid=4321, host="vm", version="0.1.0", store="local run dir", platform="kaggle",
             unit="epochs"),
        attempt_started(0, 29, -1, "normal start", T0 + 1),
        fact("metrics", T0 + 50, epoch=0, metrics={"AP50": 0.5, "val_loss": 0.9}),
        checkpoint(0, 0, T0 + 51),
        fact("train", T0 + 51, epoch=0, loss=0.7, steps=10),
        crash_end(0, T0 + 60, 1),
        attempt_started(1, 28, 0, "crash", T0 + 100),
        fact("metrics", T0 + 140, epoch=1, metrics={"AP50": 0.6, "val_loss": 0.8}),
        checkpoint(1, 1, T0 + 140),
        fact("train", T0 + 140, epoch=1, loss=0.5, steps=10),
        fact("metrics", T0 + 160, epoch=2, metrics={"AP50": 0.55, "val_loss": 0.7}),
        checkpoint(2, 1, T0 + 160),
        fact("train", T0 + 160, epoch=2, loss=0.4, steps=10),
    ]  # fmt: skip
    steps = [{"event": "step", "epoch": 3, "step": s, "loss": 0.3 - s / 100, "lr": 0.001, "batch_size": 32,
              "t": T0 + 161 + s} for s in range(5)]  # fmt: skip
    return write_dir(run_dir, facts, {1: steps}, live_json(**(live_over or {})) if with_live else None)


def test_epoch_run_running_has_progress_pace_eta_best_restarts_session_and_uploads(tmp_path):
    run_dir = epoch_run(tmp_path / "run")
    info = live.gather(run_dir, "run", HOLDER, now=NOW)
    assert info["status"] == "running" and info["supervisor"] == HOLDER
    assert (info["attempt"], info["seed"], info["epoch"], info["step"], info["reason"]) == (1, 28, 3, 4, "crash")
    assert info["span"] == 6 and info["steps_per_epoch"] == 10
    assert info["progress"] == round(3.5 / 6, 4)
    assert info["steps_per_s"] == 10.0 and info["images_per_s"] == 320.0
    assert info["eta_s"] == 50.0  # 2.5 epochs left at 20 s an epoch (evaluation and save included)
    assert info["best"]["AP50"] == {"value": 0.6, "position": 1, "mode": "max"}
    assert info["best"]["val_loss"] == {"value": 0.7, "position": 2, "mode": "min"}
    assert info["restarts"] == 1 and info["last_restart"] == {"reason": "crash", "seed": 28, "position": 1}
    assert info["session_left_s"] == 3600.0 and info["platform"] == "kaggle"
    assert info["backlog_bytes"] == 2_000_000 and info["upload_eta_s"] == 2.0
    assert info["stale"] is False and info["last_loss"] == 0.26 and info["last_lr"] == 0.001
    json.dumps(info, allow_nan=False)
    block = live.render(info)
    assert "[" in block and " 58%  epoch 3/6 step 5/10" in block
    for part in ("attempt 1 (seed 28)", "10 steps/s", "320 img/s", "ETA 50s", "max AP50 0.6 @ epoch 1",
                 "min val_loss 0.7 @ epoch 2", "1, last: crash (seed 28, from epoch 1)", "1h00m left (kaggle)",
                 "1.9 MiB pending, ETA 2s"):  # fmt: skip
        assert part in block, (part, block)
    assert 6 <= len(block.splitlines()) <= 10
    assert all(len(line) <= 80 for line in block.splitlines())
    assert all(len(line) <= 50 for line in live.render(info, 50).splitlines())


def test_gather_keeps_every_key_of_status_with_the_same_values(tmp_path):
    run_dir = epoch_run(tmp_path / "run")
    for holder in (HOLDER, None):
        old = report.status(run_dir, "run", holder)
        new = live.gather(run_dir, "run", holder)
        old.pop("last_heartbeat_age_s"), new.pop("last_heartbeat_age_s")  # the clock moved between the calls
        assert {k: new[k] for k in old} == old


def test_without_a_step_count_per_epoch_or_epoch_time_eta_is_unknown(tmp_path):
    run_dir = tmp_path / "run"
    facts = [attempt_started(0, 29, -1, "normal start", T0)]
    steps = [{"event": "step", "epoch": 0, "step": s, "loss": 1.0, "t": T0 + s} for s in range(3)]
    write_dir(run_dir, facts, {0: steps}, live_json(attempt=0, seed=29, position=0, backlog_bytes=0))
    info = live.gather(run_dir, "run", HOLDER, now=NOW)
    assert info["progress"] == 0.0 and info["eta_s"] is None and info["images_per_s"] is None
    assert info["restarts"] == 0 and info["last_restart"] is None and info["upload_eta_s"] == 0.0
    block = live.render(info)
    assert "epoch 0/6 step 3" in block and "ETA" not in block and "no metrics yet" in block
    assert "uploads  none pending" in block


def test_step_run_counts_steps(tmp_path):
    run_dir = tmp_path / "run"
    facts = [
        fact("session_started", T0, pid=1, host="vm", unit="steps"),
        attempt_started(0, 7, -1, "normal start", T0 + 1),
        checkpoint(50, 0, T0 + 20),
        fact("metrics", T0 + 20, epoch=50, metrics={"val_loss": 0.25}),
    ]
    steps = [{"event": "step", "step": s, "loss": 1 / s, "t": T0 + s} for s in range(1, 76)]
    live_over = {"attempt": 0, "seed": 7, "unit": "steps", "span": 101, "position": 76, "steps_per_s": 5.0,
                 "session_end": None}  # fmt: skip
    write_dir(run_dir, facts, {0: steps}, live_json(**live_over))
    info = live.gather(run_dir, "run", HOLDER, now=NOW)
    assert info["unit"] == "steps" and info["step"] == 75 and "epoch" not in info
    assert info["progress"] == 0.75 and info["eta_s"] == 5.0 and info["steps_per_epoch"] is None
    assert info["best"]["val_loss"] == {"value": 0.25, "position": 50, "mode": "min"}
    assert info["session_left_s"] is None
    old = report.status(run_dir, "run", HOLDER)
    assert {k: info[k] for k in old if k != "last_heartbeat_age_s"} == {k: v for k, v in old.items()
                                                                         if k != "last_heartbeat_age_s"}  # fmt: skip
    block = live.render(info)
    assert " 75%  step 75/100" in block and "min val_loss 0.25 @ step 50" in block and "session" not in block


def test_a_trainer_without_events_is_placed_by_live_json(tmp_path):
    # zero-code mode: the watchdog reads the trainer's output; no events file, live.json has the position
    facts = [fact("session_started", T0, pid=1, host="vm", unit="steps"), attempt_started(0, 7, -1, "normal start", T0)]
    run_dir = write_dir(tmp_path / "steps", facts, None, live_json(attempt=0, unit="steps", span=61, position=23))
    info = live.gather(run_dir, "steps", HOLDER, now=NOW)
    assert info["done"] == 22 and info["progress"] == round(22 / 60, 4) and "last_loss" not in info
    assert "step 22/60" in live.render(info)
    facts = [attempt_started(0, 7, -1, "normal start", T0)]
    run_dir = write_dir(tmp_path / "epochs", facts, None, live_json(attempt=0, span=6, position=2))
    info = live.gather(run_dir, "epochs", HOLDER, now=NOW)
    assert info["progress"] == round(2 / 6, 4) and "epoch 2/6" in live.render(info)


def test_a_pause_in_progress_shows_its_reason_and_deadline(tmp_path):
    run_dir = epoch_run(tmp_path / "run", {"state": "stopping", "fault": "preempted", "deadline": NOW + 90})
    info = live.gather(run_dir, "run", HOLDER, now=NOW)
    assert (info["state"], info["fault"], info["deadline_left_s"]) == ("stopping", "preempted", 90.0)
    block = live.render(info)
    assert "running, stopping (preempted)" in block and "1m30s left to save and stop" in block


def test_a_dead_watchdogs_live_json_is_stale_and_its_pace_not_shown(tmp_path):
    run_dir = epoch_run(tmp_path / "run", {"t": NOW - 300})
    info = live.gather(run_dir, "run", None, now=NOW)
    assert info["status"] == "paused" and info["stale"] is True and info["live_age_s"] == 300.0
    assert info["steps_per_s"] is None and info["eta_s"] is None and info["upload_eta_s"] is None
    assert info["progress"] == 0.5  # epochs 0-2 verified of 6: what a resume starts from
    block = live.render(info)
    assert "paused" in block and "5m00s old" in block and "3/6 epochs verified" in block
    # A supervisor that holds the run between attempts: an old live.json is not stale then.
    assert live.gather(run_dir, "run", HOLDER, now=NOW)["stale"] is False


def test_paused_run_without_its_length_says_so(tmp_path):
    run_dir = epoch_run(tmp_path / "run", with_live=False)
    info = live.gather(run_dir, "run", None, now=NOW)
    assert info["status"] == "paused" and info["span"] is None and info["progress"] is None
    assert "3 epochs verified (the run's length is unknown" in live.render(info)
    assert live.gather(run_dir, "run", None, span=6, now=NOW)["progress"] == 0.5


def test_finished_runs(tmp_path):
    run_dir = epoch_run(tmp_path / "done", with_live=False)
    with open(run_dir / "ledger.jsonl", "a") as f:
        f.write(json.dumps(fact("run_ended", NOW, status="completed", diagnosis="all epochs verified")) + "\n")
    info = live.gather(run_dir, "done", None, now=NOW)
    assert info["status"] == "completed" and info["span"] == 3 and info["progress"] == 1.0
    block = live.render(info)
    assert "completed" in block and "100%" in block and "max AP50 0.6 @ epoch 1" in block and "1, last: crash" in block

    run_dir = epoch_run(tmp_path / "gave-up", with_live=False)
    with open(run_dir / "ledger.jsonl", "a") as f:
        f.write(json.dumps(fact("run_ended", NOW, status="gave up", diagnosis="crash 3 times at epoch 3")) + "\n")
    block = live.render(live.gather(run_dir, "gave-up", None, span=6, now=NOW))
    assert "gave up" in block and "crash 3 times at epoch 3" in block and " 50%" in block


def test_not_started(tmp_path):
    info = live.gather(tmp_path, "fresh", None)
    assert info["status"] == "not started" and info["progress"] is None and info["restarts"] == 0
    assert "nothing trained yet" in live.render(info)


def test_the_end_of_a_long_events_file_is_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "TAIL_BYTES", 256)
    run_dir = tmp_path / "run"
    steps = [{"event": "step", "epoch": 0, "step": s, "loss": 1.0 + s} for s in range(200)]
    beats = [{"event": "heartbeat", "t": T0 + i} for i in range(100)]  # more than the first read holds
    write_dir(run_dir, [attempt_started(0, 1, -1, "normal start", T0)], {0: steps + beats})
    with open(run_dir / "attempts" / "attempt-0000.events.jsonl", "a") as f:
        f.write('{"event":"step","epoch":0,"st')  # being written
    info = live.gather(run_dir, "run", HOLDER)
    assert info["step"] == 199 and info["last_loss"] == 200.0


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_prints_blocks_or_json_and_stops(tmp_path):
    run_dir = epoch_run(tmp_path / "run")
    out = io.StringIO()
    assert live.watch(run_dir, "run", lambda: HOLDER, out, interval_s=0.01, count=3) == 0
    blocks = out.getvalue().split("\n\n")
    assert len(blocks) == 3 and all("running" in b for b in blocks)

    tty = Tty()
    assert live.watch(run_dir, "run", lambda: HOLDER, tty, interval_s=0.01, count=2) == 0
    assert tty.getvalue().count("\x1b[H\x1b[J") == 2

    out = io.StringIO()
    assert live.watch(run_dir, "run", lambda: HOLDER, out, interval_s=0.01, count=2, as_json=True) == 0
    assert [json.loads(line)["attempt"] for line in out.getvalue().splitlines()] == [1, 1]

    out = io.StringIO()  # not running: one block, then done, whatever the count
    assert live.watch(run_dir, "run", lambda: None, out, interval_s=0.01) == 0
    assert out.getvalue().count("paused") == 1 and "\n\n" not in out.getvalue()


def test_watch_ends_quietly_on_ctrl_c(tmp_path):
    run_dir = epoch_run(tmp_path / "run")
    calls = []

    def holder():
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return HOLDER

    out = io.StringIO()
    assert live.watch(run_dir, "run", holder, out, interval_s=0.01) == 0
    assert "running" in out.getvalue()


def test_human_units():
    assert [live.human_seconds(s) for s in (45, 200, 7980, 100_000)] == ["45s", "3m20s", "2h13m", "1d03h"]


def test_watching_a_real_run_through_the_cli(tmp_path):
    toml = write_run(tmp_path, epochs=16, params={"steps_per_epoch": 10, "step_s": 0.05},
                     platform={"detect": "generic", "session_limit_s": 7200, "stop_margin_s": 60})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    try:

        def paced() -> dict | None:
            assert proc.poll() is None, f"the run ended early ({proc.returncode}): {proc.stderr.read()}"
            info = live.gather(run_dir, "run", _holder(run_dir))
            return info if info["steps_per_s"] else None

        info = wait_for(paced, timeout=60, what="live.json with a pace")
        assert info["status"] == "running" and info["attempt"] == 0 and info["span"] == 16
        assert 0 <= info["epoch"] < 16 and 0 <= info["progress"] < 1
        assert info["steps_per_s"] > 0 and info["images_per_s"] is None  # the fake trainer reports no batch size
        assert 0 < info["session_left_s"] <= 7200 and info["backlog_bytes"] == 0
        block = live.render(info)
        assert "running" in block and "%  epoch " in block and "steps/s" in block
        watched = io.StringIO()
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(
            live.watch(run_dir, "run", lambda: _holder(run_dir), watched, interval_s=0.2)), daemon=True)  # fmt: skip
        thread.start()
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
        wait_for(lambda: not thread.is_alive(), timeout=30, what="watch to end after the run")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    assert codes == [0]
    blocks = watched.getvalue().split("\n\n")
    assert "running" in blocks[0] and "completed" in blocks[-1] and "max AP50 0.65 @ epoch 15" in blocks[-1]
    info = live.gather(run_dir, "run", _holder(run_dir), span=16)
    assert info["status"] == "completed" and info["progress"] == 1.0 and info["best"]["AP50"]["position"] == 15
    assert not (run_dir / "live.json").exists() and info["stale"] is False
