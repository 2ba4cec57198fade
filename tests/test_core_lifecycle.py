"""The run's life through the real CLI: kill -9, the lock, stop/pause/resume, give-up, rollback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import cli, ledger, pid_alive, report, start_bg, wait_for, write_run
from metadata_server import FakeMetadata


def trainer_pids(run_dir: Path) -> list[int]:
    path = run_dir / "pids.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def reached_epoch(run_dir: Path, attempt: int, epoch: int) -> bool:
    events = run_dir / "attempts" / f"attempt-{attempt:04d}.events.jsonl"
    if not events.exists():
        return False
    return any(json.loads(x).get("epoch", -1) >= epoch for x in events.read_text().splitlines() if x.strip())


def test_kill9_watchdog_leaves_nothing_and_next_start_finishes(tmp_path):
    toml = write_run(tmp_path, epochs=3, params={"step_s": 0.2, "faults": [{"kind": "spawn_children", "attempt": 0}]})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: reached_epoch(run_dir, 0, 1), timeout=30, what="epoch 1 of attempt 0")
    watchdog = psutil.Process(proc.pid)
    tree = [p.pid for p in watchdog.children(recursive=True)]
    pids = trainer_pids(run_dir)
    assert len(pids) == 2 and all(p in tree or pid_alive(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    victims = set(tree) | set(pids)
    # The grandchild left the trainer's session (setsid), yet the shim's sweep takes it too.
    wait_for(lambda: not any(pid_alive(p) for p in victims), timeout=5, what="the trainer tree to die")

    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rep = report(toml)
    assert rep["status"] == "completed"
    lost = rep["restarts"][1]
    assert lost["reason"] == "session lost" and lost["load_epoch"] == lost["epoch"] - 1
    assert [r["seed"] for r in rep["restarts"]] == [29, 28]
    for pid in trainer_pids(run_dir):
        assert not pid_alive(pid)


def test_second_supervisor_is_refused_naming_the_holder(tmp_path):
    toml = write_run(tmp_path, epochs=50, params={"step_s": 0.05})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    try:
        wait_for(lambda: reached_epoch(run_dir, 0, 0), timeout=30, what="the first supervisor to run")
        out = cli("start", str(toml))
        assert out.returncode == 2
        assert f"pid {proc.pid}" in out.stderr and "in use" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75


def test_stop_pauses_then_start_resumes_with_stopped_row(tmp_path):
    # 30 epochs of 0.3 s: the status and stop CLIs (a second or more each on a busy machine) come well before the end
    toml = write_run(tmp_path, epochs=30, params={"step_s": 0.1})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: reached_epoch(run_dir, 0, 2), timeout=30, what="epoch 2")
    status = cli("status", str(toml), "--json")
    info = json.loads(status.stdout)
    assert info["status"] == "running" and info["attempt"] == 0 and info["epoch"] >= 2
    assert isinstance(info["last_loss"], float) and info["last_heartbeat_age_s"] < 30
    out = cli("stop", str(toml), "--wait", "60")
    assert out.returncode == 0, out.stderr
    assert proc.wait(timeout=30) == 75
    assert report(toml)["status"] == "paused"
    assert json.loads(cli("status", str(run_dir), "--json").stdout)["status"] == "paused"
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rep = report(toml)
    assert rep["status"] == "completed"
    assert rep["restarts"][1]["reason"] == "stopped"
    assert rep["restarts"][1]["load_epoch"] == rep["restarts"][1]["epoch"] - 1


def test_sigterm_grace_then_sigkill_for_a_trainer_that_ignores_it(tmp_path):
    toml = write_run(tmp_path, epochs=50, params={"step_s": 0.05, "faults": [{"kind": "ignore_sigterm"}]},
                     watch={"stop_grace_s": 1.0})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: reached_epoch(run_dir, 0, 1), timeout=30, what="epoch 1")
    pids = trainer_pids(run_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 75
    assert not any(pid_alive(p) for p in pids)
    ended = [f for f in ledger(run_dir) if f["fact"] == "attempt_ended"][-1]
    assert ended["fault"] == "stopped" and ended["exit"] == "signal SIGKILL"


def test_crash_loop_gives_up_with_a_diagnosis(tmp_path):
    faults = [{"kind": "crash", "attempt": a, "epoch": 1, "step": 1} for a in range(10)]
    toml = write_run(tmp_path, epochs=3, params={"faults": faults}, restart={"no_progress_limit": 3})
    out = cli("start", str(toml))
    assert out.returncode == 1, out.stderr
    rep = report(toml)
    assert rep["status"] == "gave up"
    assert "no progress across 3 attempts" in rep["diagnosis"]
    # Attempt 0 verified epoch 0 (progress); attempts 1-3 each died in epoch 1 without any.
    assert len(rep["restarts"]) == 4
    assert len({r["seed"] for r in rep["restarts"]}) == 4


def test_failure_before_first_step_gives_up_fast(tmp_path):
    toml = write_run(tmp_path, epochs=3, params={"faults": [{"kind": "import_error"}]})
    out = cli("start", str(toml))
    assert out.returncode == 1
    rep = report(toml)
    assert len(rep["restarts"]) == 3
    assert "before its first step" in rep["diagnosis"] and "missing_dependency" in rep["diagnosis"]


def test_same_epoch_failing_twice_rolls_back_one_more_checkpoint(tmp_path):
    faults = [{"kind": "nan", "attempt": a, "epoch": 2, "step": 0} for a in (0, 1)]
    toml = write_run(tmp_path, epochs=4, params={"faults": faults}, restart={"rollback_after": 2})
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rows = report(toml)["restarts"]
    assert [(r["epoch"], r["load_epoch"], r["reason"]) for r in rows] == [
        (0, -1, "normal start"), (2, 1, "nan"), (1, 0, "nan"),
    ]  # fmt: skip


def test_corrupt_checkpoint_falls_back_to_previous_verified(tmp_path):
    # The trainer stalls in epoch 2, so epoch 1 is the newest checkpoint announced when the machine dies
    # (a later announced one would be recorded by the next start, and resumed from).
    toml = write_run(tmp_path, epochs=4, params={"step_s": 0.2,
                                                 "faults": [{"kind": "hang", "attempt": 0, "epoch": 2, "step": 0}]})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: any(f["fact"] == "checkpoint" and f["epoch"] == 1 for f in ledger(run_dir)),
             timeout=30, what="epoch 1 verified")  # fmt: skip
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    (run_dir / "checkpoints" / "epoch-0001.pt").write_text("bit rot")
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rows = report(toml)["restarts"]
    assert rows[1]["load_epoch"] == 0 and rows[1]["reason"] == "session lost"
    assert any(f["fact"] == "checkpoint_unavailable" and f["epoch"] == 1 for f in ledger(run_dir))


def test_unactivated_venv_python_runs_our_interpreter(tmp_path):
    script = tmp_path / "which.py"
    script.write_text("import sys\nprint('EXE=' + sys.executable)\nsys.exit(1)\n")
    toml = write_run(tmp_path, epochs=1, command=["python", str(script)], restart={"early_failure_limit": 1})
    env = {"PATH": "/usr/bin:/bin"}  # no venv on PATH: `python` there would be another interpreter or none
    subprocess.run([sys.executable, "-m", "supervisor.cli", "start", str(toml)], env={**os.environ, **env},
                   capture_output=True, timeout=60)  # fmt: skip
    log = (tmp_path / "runs" / "run" / "attempts" / "attempt-0000.log").read_text()
    assert f"EXE={os.path.normpath(sys.executable)}" in log


def test_watchdog_never_imports_torch():
    code = (
        "import sys, supervisor.cli, supervisor.watchdog, supervisor.attempt, supervisor.client, "
        "supervisor.report, supervisor.shim, supervisor.store;"
        "import supervisor.store.local;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_session_time_limit_pauses_and_the_next_session_resumes(tmp_path):
    # nothing measured yet: the plan pauses deadline.RESERVE_S (5 s) before the end, after ~3 s here
    toml = write_run(tmp_path, epochs=20, params={"step_s": 0.15},
                     platform={"session_limit_s": 8.0, "stop_margin_s": 0.0, "detect": "generic"})  # fmt: skip
    out = cli("start", str(toml))
    assert out.returncode == 75, out.stderr
    assert "session limit" in out.stderr
    rep = report(toml)
    assert rep["status"] == "paused" and rep["attempts"][0]["ended_by"] == "time limit"
    toml.write_text(toml.read_text().replace("session_limit_s = 8.0", "session_limit_s = 600.0"))
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    row = report(toml)["restarts"][1]
    assert row["reason"] == "time limit" and row["load_epoch"] == row["epoch"] - 1
    assert row["seed"] == report(toml)["restarts"][0]["seed"]  # a pause resumes exactly: the same seed


def test_spot_interruption_notice_pauses_as_preempted(tmp_path):
    imds = FakeMetadata()
    try:
        toml = write_run(tmp_path, epochs=40, params={"step_s": 0.05},
                         platform={"spot": "aws", "metadata_url": imds.url, "notice_poll_s": 0.2})  # fmt: skip
        run_dir = tmp_path / "runs" / "run"
        proc = start_bg(toml)
        wait_for(lambda: reached_epoch(run_dir, 0, 1), timeout=30, what="epoch 1")
        imds.interrupt()  # a stale time: the AWS window applies
        assert proc.wait(timeout=30) == 75
        assert "AWS spot interruption: terminate" in proc.stderr.read()
        assert report(toml)["attempts"][0]["ended_by"] == "preempted"
        toml.write_text(toml.read_text().replace('spot = "aws"', 'spot = "off"'))
        out = cli("start", str(toml))
        assert out.returncode == 0, out.stderr
        assert report(toml)["restarts"][1]["reason"] == "preempted"
    finally:
        imds.close()
