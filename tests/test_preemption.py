"""Pauses lose seconds, not epochs: checkpoint requests, step-exact resume, every_s, work lost, deadlines.

Everything runs through the real CLI with the fake trainer (tests/fake_trainer.py), whose checkpoint
"state" chains every (seed, epoch, step) it trained: a paused and resumed run ends with the state of an
uninterrupted one only if it resumed at exactly the right step with the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import cli, ledger, pid_alive, report, start_bg, wait_for, write_run

STEPS = 20
REQUESTS = {"steps_per_epoch": STEPS, "step_s": 0.03, "handles_requests": True}


def events(run_dir: Path, attempt: int) -> list[dict]:
    path = run_dir / "attempts" / f"attempt-{attempt:04d}.events.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def steps_seen(run_dir: Path, attempt: int) -> int:
    return sum(1 for e in events(run_dir, attempt) if e.get("event") == "step")


def final_state(run_dir: Path, epochs: int) -> str:
    return json.loads((run_dir / "checkpoints" / f"epoch-{epochs - 1:04d}.pt").read_text())["state"]


def facts(run_dir: Path, kind: str) -> list[dict]:
    return [f for f in ledger(run_dir) if f["fact"] == kind]


def stopped_in_epoch_1(tmp_path: Path, params: dict) -> tuple[Path, Path, dict]:
    """A 3-epoch run stopped (SIGTERM) a few steps into epoch 1: its run.toml, run dir, mid-epoch checkpoint."""
    toml = write_run(tmp_path, epochs=3, params=params, watch={"stop_grace_s": 10.0})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: steps_seen(run_dir, 0) >= STEPS + 4, timeout=60, what="epoch 1 step 4")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    return toml, run_dir, next(f for f in facts(run_dir, "checkpoint") if f.get("step") is not None)


def uninterrupted(tmp_path: Path, epochs: int, seed: int, **params) -> str:
    """The final state of the same run trained straight through with `seed`."""
    base = tmp_path / "straight"
    base.mkdir()
    toml = write_run(base, epochs=epochs, params={**REQUESTS, "step_s": 0.0, **params}, seeds={"pool": [seed]})
    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr
    return final_state(base / "runs" / "run", epochs)


def test_sigterm_mid_epoch_saves_at_the_next_step_and_resumes_exactly(tmp_path):
    epochs = 3
    toml = write_run(tmp_path, epochs=epochs, params=REQUESTS, watch={"stop_grace_s": 10.0})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: steps_seen(run_dir, 0) >= STEPS + 5, timeout=60, what="epoch 1 step 5")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    log = proc.stderr.read()
    assert "asked the trainer for a checkpoint (stopped, then to exit)" in log

    mid = [f for f in facts(run_dir, "checkpoint") if f.get("step") is not None]
    assert len(mid) == 1 and mid[0]["epoch"] == 1, mid
    saved = mid[0]
    ev = [e for e in events(run_dir, 0) if e.get("event") == "checkpoint" and "step" in e]
    assert ev and ev[0]["step"] == saved["step"] and ev[0]["request"] == 1
    # S is the number of steps of epoch 1 already trained: the last step event before it is S - 1
    before = [e for e in events(run_dir, 0) if e.get("event") == "step" and e["epoch"] == 1]
    assert before[-1]["step"] == saved["step"] - 1
    assert (run_dir / saved["path"]).exists()
    assert report(toml)["attempts"][0]["ended_by"] == "stopped"

    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr
    rep = report(toml)
    row = rep["restarts"][1]
    assert row == {"epoch": 1, "load_epoch": 1, "load_step": saved["step"], "seed": rep["restarts"][0]["seed"],
                   "reason": "stopped"}  # fmt: skip
    assert rep["restarts"][0]["load_step"] is None
    first = next(e for e in events(run_dir, 1) if e.get("event") == "step")
    assert (first["epoch"], first["step"]) == (1, saved["step"])  # nothing trained twice, nothing skipped
    assert final_state(run_dir, epochs) == uninterrupted(tmp_path, epochs, rep["restarts"][0]["seed"])
    # the mid-epoch checkpoint went once epoch 1's end was verified
    removed = [f for f in facts(run_dir, "checkpoint_removed") if f.get("step") == saved["step"]]
    assert removed and removed[0]["why"] == "superseded"
    assert not (run_dir / saved["path"]).exists()
    lost = {f["attempt"]: f for f in facts(run_dir, "work_lost")}
    assert lost[0]["steps"] == 0 and lost[0]["resume_step"] == saved["step"]


def test_a_trainer_that_does_not_handle_requests_is_stopped_as_before(tmp_path):
    toml = write_run(tmp_path, epochs=40, params={"step_s": 0.03, "steps_per_epoch": 5}, watch={"stop_grace_s": 10.0})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: steps_seen(run_dir, 0) >= 7, timeout=60, what="a few steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert not (run_dir / "attempts" / "attempt-0000.request.json").exists()
    assert not [f for f in facts(run_dir, "checkpoint") if f.get("step") is not None]
    lost = facts(run_dir, "work_lost")[0]
    newest = max(f["epoch"] for f in facts(run_dir, "checkpoint"))
    assert lost["resume_epoch"] == newest and lost["resume_step"] is None
    assert lost["steps"] == steps_seen(run_dir, 0) - 5 * (newest + 1)  # the partial epoch is what is lost
    toml.write_text(toml.read_text().replace("epochs = 40", "epochs = 3"))
    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr
    rows = report(toml)["restarts"]
    assert rows[1]["seed"] == rows[0]["seed"] and rows[1]["load_step"] is None  # a pause keeps the seed


def test_a_trainer_that_declares_requests_but_never_answers_is_stopped_after_the_budget(tmp_path):
    params = {"steps_per_epoch": STEPS, "step_s": 0.03, "ignore_requests": True}
    toml = write_run(tmp_path, epochs=40, params=params, watch={"stop_grace_s": 1.0})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: steps_seen(run_dir, 0) >= 5, timeout=60, what="a few steps")
    pids = [int(x) for x in (run_dir / "pids.txt").read_text().split()]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert (run_dir / "attempts" / "attempt-0000.request.json").exists()
    assert not any(pid_alive(p) for p in pids)
    assert report(toml)["attempts"][0]["ended_by"] == "stopped"


def test_session_lost_with_every_s_resumes_from_the_last_periodic_checkpoint(tmp_path):
    epochs = 3
    params = {**REQUESTS, "step_s": 0.05, "steps_per_epoch": 60}  # 3 s epochs: about 2 periodic saves in each
    toml = write_run(tmp_path, epochs=epochs, params=params, checkpoints={"every_s": 1.0})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)

    def periodic_in_epoch_1() -> bool:
        saves = [e for e in events(run_dir, 0) if e.get("event") == "checkpoint"]
        return bool(saves) and saves[-1]["epoch"] == 1 and "step" in saves[-1]

    wait_for(periodic_in_epoch_1, timeout=90, what="a periodic save in epoch 1")
    wait_for(lambda: steps_seen(run_dir, 0) >= 60 + 25, timeout=90, what="a few steps after it")
    os.kill(proc.pid, signal.SIGKILL)  # the session vanishes: the shim takes the trainer with it
    proc.wait(timeout=30)

    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr
    evs = events(run_dir, 0)
    last_ckpt = max(i for i, e in enumerate(evs) if e.get("event") == "checkpoint")
    newest = evs[last_ckpt]
    after = sum(1 for e in evs[last_ckpt:] if e.get("event") == "step")
    rep = report(toml)
    row = rep["restarts"][1]
    assert row["reason"] == "session lost" and row["seed"] == rep["restarts"][0]["seed"]
    if "step" in newest:
        assert (row["epoch"], row["load_epoch"], row["load_step"]) == (newest["epoch"], newest["epoch"], newest["step"])
    else:  # the kill came right after an epoch end: that is the newest checkpoint
        assert row["load_epoch"] == newest["epoch"] and row["load_step"] is None
    lost = {f["attempt"]: f for f in facts(run_dir, "work_lost")}
    assert lost[0]["steps"] == after  # only the steps after the last periodic checkpoint are trained again
    if "step" in newest:  # the same seed from an exact point: the run ends as if never stopped
        assert final_state(run_dir, epochs) == uninterrupted(tmp_path, epochs, row["seed"], steps_per_epoch=60)


def test_a_fault_after_a_mid_epoch_resume_rolls_back_to_an_epoch_end_with_a_new_seed(tmp_path):
    faults = [{"kind": "nan", "attempt": 1, "epoch": 1, "step": STEPS - 2}]
    toml, run_dir, saved = stopped_in_epoch_1(tmp_path, {**REQUESTS, "faults": faults})
    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr
    rows = report(toml)["restarts"]
    assert [r["reason"] for r in rows] == ["normal start", "stopped", "nan"]
    assert (rows[1]["load_epoch"], rows[1]["load_step"]) == (1, saved["step"])
    assert (rows[2]["epoch"], rows[2]["load_epoch"], rows[2]["load_step"]) == (1, 0, None)  # the log's rule
    assert rows[2]["seed"] not in (rows[0]["seed"], rows[1]["seed"])


def test_time_limit_asks_for_the_final_checkpoint_and_resumes_at_its_step(tmp_path):
    toml = write_run(tmp_path, epochs=20, params=REQUESTS,
                     platform={"session_limit_s": 12.0, "stop_margin_s": 1.0, "detect": "generic"})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    out = cli("start", str(toml), timeout=60)
    assert out.returncode == 75, out.stderr
    assert "session limit is near" in out.stderr
    mid = [f for f in facts(run_dir, "checkpoint") if f.get("step") is not None]
    assert mid, "no final mid-epoch checkpoint"
    toml.write_text(toml.read_text().replace("session_limit_s = 12.0", "session_limit_s = 600.0"))
    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr
    row = report(toml)["restarts"][1]
    assert row["reason"] == "time limit" and (row["load_epoch"], row["load_step"]) == (mid[-1]["epoch"],
                                                                                        mid[-1]["step"])  # fmt: skip


@pytest.mark.parametrize("every", ["auto"])
def test_every_s_auto_records_the_interval_it_chose(tmp_path, every):
    # one 12 s epoch: the probe checkpoint after 10 s measures a 0.5 s stall -> 0.5 / 3.5% = 14 s
    toml = write_run(tmp_path, epochs=1, params={**REQUESTS, "step_s": 0.04, "steps_per_epoch": 300, "save_s": 0.5},
                     checkpoints={"every_s": every})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    out = cli("start", str(toml), timeout=120)
    assert out.returncode == 0, out.stderr
    plans = [f for f in facts(run_dir, "plan") if f.get("every_s") is not None]
    assert plans[0]["every_s"] == 10.0 and "nothing measured yet" in plans[0]["why"]
    measured = [p for p in plans if p.get("stall_s")]
    assert measured, plans  # after the probe, the interval comes from the measured stall
    assert measured[0]["why"].startswith(("cost", "stall"))
    assert measured[0]["every_s"] >= measured[0]["stall_s"] / 0.035 * 0.99
    assert "checkpoints every" in out.stderr
    rep = report(toml)
    assert rep["checkpointing"]["every_s"] == measured[-1]["every_s"]


def test_a_mid_epoch_checkpoint_that_vanished_falls_back_to_the_epoch_end(tmp_path):
    toml, run_dir, saved = stopped_in_epoch_1(tmp_path, REQUESTS)
    (run_dir / saved["path"]).unlink()
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    assert f"checkpoint of epoch 1 step {saved['step']} cannot be had" in out.stderr
    row = report(toml)["restarts"][1]
    assert (row["epoch"], row["load_epoch"], row["load_step"]) == (1, 0, None)


def test_a_kaggle_session_limit_pauses_mid_epoch_and_a_restart_in_the_same_session_keeps_its_clock(tmp_path):
    import psutil

    # Kaggle's session began with its container (PID 1): a limit that ends ~12 s from now.
    elapsed = time.time() - psutil.Process(1).create_time()
    limit = round(elapsed + 12.0, 1)
    toml = write_run(tmp_path, epochs=40, params=REQUESTS,
                     platform={"detect": "kaggle", "session_limit_s": limit, "stop_margin_s": 1.0})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    out = cli("start", str(toml), timeout=60)
    assert out.returncode == 75, out.stderr
    assert "kaggle session limit is near" in out.stderr
    mid = [f for f in facts(run_dir, "checkpoint") if f.get("step") is not None]
    assert mid and facts(run_dir, "attempt_ended")[0]["fault"] == "time limit"
    # The supervisor restarted inside the same session: the clock did not start again, so it pauses at once.
    again = cli("start", str(toml), timeout=60)
    assert again.returncode == 75, again.stderr
    assert len(facts(run_dir, "attempt_started")) == 1
