"""The edges of a run, through the real CLI: checkpoints saved for a pause, checkpoints taken on trust,
garbage events, a torn or misshapen ledger, the watchdog's death mid-hash, zero-code leftovers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import cli, ledger, report, start_bg, wait_for, write_run

from supervisor.durable import sha256_file


def events(run_dir: Path, attempt: int) -> list[dict]:
    path = run_dir / "attempts" / f"attempt-{attempt:04d}.events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def facts(run_dir: Path, kind: str) -> list[dict]:
    return [f for f in ledger(run_dir) if f["fact"] == kind]


def assert_verified_files_match(run_dir: Path) -> None:
    """Every checkpoint the ledger still lists is on disk with the recorded size and sha256."""
    live: dict[int, dict] = {}
    for f in ledger(run_dir):
        if f["fact"] == "checkpoint":
            live[f["epoch"]] = f
        elif f["fact"] in ("checkpoint_removed", "checkpoint_unavailable") and live.get(f["epoch"], {}).get(
            "sha256"
        ) == f.get("sha256"):
            del live[f["epoch"]]
    for epoch, f in live.items():
        path = run_dir / f["path"]
        assert path.name == f"epoch-{epoch:04d}.pt", f
        assert path.stat().st_size == f["size"] and sha256_file(path) == f["sha256"], f


def test_checkpoint_saved_in_the_pause_grace_period_counts(tmp_path):
    toml = write_run(tmp_path, epochs=30, params={"steps_per_epoch": 10, "step_s": 0.1,
                                                  "faults": [{"kind": "save_on_sigterm"}]},
                     watch={"stop_grace_s": 20.0})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: any(e.get("event") == "step" and e["epoch"] == 2 and e["step"] == 3 for e in events(run_dir, 0)),
             timeout=60, what="the middle of epoch 2")  # fmt: skip
    out = cli("stop", str(toml), "--wait", "60")
    assert out.returncode == 0, out.stderr
    assert proc.wait(timeout=30) == 75
    # The last checkpoint event is the one saved on SIGTERM, of the epoch in progress (2, or later when the stop
    # took long on a busy machine).
    saved = [e["epoch"] for e in events(run_dir, 0) if e.get("event") == "checkpoint"][-1]
    assert saved >= 2
    assert saved in [f["epoch"] for f in facts(run_dir, "checkpoint")], "the checkpoint saved for the stop was dropped"
    assert_verified_files_match(run_dir)
    toml.write_text(toml.read_text().replace("epochs = 30", f"epochs = {saved + 2}"))
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    row = report(toml)["restarts"][1]
    assert (row["reason"], row["load_epoch"]) == ("stopped", saved)


def test_checkpoint_events_are_not_taken_on_trust(tmp_path):
    extra = [
        {"after_epoch": 0, "event": {"event": "checkpoint", "epoch": 99, "path": "{checkpoint_dir}/epoch-0000.pt"}},
        {"after_epoch": 1, "event": {"event": "checkpoint", "epoch": 2, "path": "{checkpoint_dir}/epoch-0001.pt"}},
        {"after_epoch": 1, "event": {"event": "checkpoint", "epoch": "3", "path": 7}},
    ]
    toml = write_run(tmp_path, epochs=4, params={"extra_events": extra}, checkpoints={"keep_last": 1, "keep_best": 0})
    run_dir = tmp_path / "runs" / "run"
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    recorded = [(f["epoch"], f["path"]) for f in facts(run_dir, "checkpoint")]
    assert recorded == [(e, f"checkpoints/epoch-{e:04d}.pt") for e in range(4)], recorded
    notes = " ".join(f["note"] for f in facts(run_dir, "note"))
    assert "epoch 99 is outside this attempt's epochs 0..3" in notes
    assert "is not the run's checkpoint path for epoch 2" in notes
    assert report(toml)["checkpoints"] == [3]
    assert_verified_files_match(run_dir)
    assert "Traceback" not in out.stderr


def test_a_checkpoint_still_being_written_in_place_is_not_verified_partial(tmp_path):
    toml = write_run(tmp_path, epochs=2, params={"ckpt_bytes": 200_000,
                                                 "faults": [{"kind": "in_place", "epoch": 0, "step": -1}]})  # fmt: skip
    run_dir = tmp_path / "runs" / "run"
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    first = facts(run_dir, "checkpoint")[0]
    assert first["epoch"] == 0 and first["size"] == 200_000, first
    assert_verified_files_match(run_dir)


def test_garbage_step_events_neither_crash_the_watchdog_nor_kill_a_healthy_attempt(tmp_path):
    raw = [
        '{"event":"step","epoch":0,"step":0,"loss":' + "9" * 400 + "}",  # a finite integer beyond float64
        '{"event":"step","epoch":0,"step":1}',
        '{"event":"step","epoch":0,"step":2,"loss":"abc"}',
        '{"event":"step","epoch":12345678901234567890123,"step":2,"loss":1.0}',
        '{"event":"eval","epoch":0,"metrics":{"AP50":"high"}}',
        '{"event":"step","epoch":0,"step":3,"loss":[1]}',
        "not json at all",
        "[1, 2, 3]",
    ]
    toml = write_run(tmp_path, epochs=2, params={"raw_lines": raw[1:]})
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert len(report(toml)["restarts"]) == 1
    assert "without a numeric loss" in out.stderr

    # The overflowing integer is an overflowed loss: named `nan` (not a crash of the watchdog), restarted.
    other = tmp_path / "overflow"
    other.mkdir()
    toml = write_run(other, epochs=2, params={"raw_lines": [raw[0]]})
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rows = report(toml)["restarts"]
    assert [r["reason"] for r in rows] == ["normal start", "nan"]


def test_torn_ledger_tail_is_set_aside_and_the_next_fact_survives(tmp_path):
    toml = write_run(tmp_path, epochs=6, params={"step_s": 0.1})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: len(facts(run_dir, "checkpoint")) >= 2, timeout=60, what="two checkpoints")
    os.kill(proc.pid, signal.SIGKILL)  # power loss: the last line was being written
    proc.wait(timeout=10)
    torn = b'{"fact":"checkpoint","epoch":7,"path":"checkpoints/ep'
    with open(run_dir / "ledger.jsonl", "ab") as f:
        f.write(torn)
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    assert "torn" in out.stderr
    side = list(run_dir.glob("ledger.torn-*.jsonl"))
    assert len(side) == 1 and side[0].read_bytes() == torn
    lines = (run_dir / "ledger.jsonl").read_text().splitlines()
    assert all(json.loads(x)["fact"] for x in lines)  # every line whole: nothing glued onto the torn one
    assert [f["fact"] for f in ledger(run_dir)].count("session_started") == 2
    assert report(toml)["status"] == "completed"


def test_a_ledger_line_of_the_wrong_shape_is_skipped_with_a_warning(tmp_path):
    toml = write_run(tmp_path, epochs=3, params={"step_s": 0.05})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: len(facts(run_dir, "checkpoint")) >= 1, timeout=60, what="a checkpoint")
    out = cli("stop", str(toml), "--wait", "60")
    proc.wait(timeout=30)
    with open(run_dir / "ledger.jsonl", "a") as f:
        f.write('{"fact":"checkpoint","epoch":null,"path":"x","size":1,"sha256":"y"}\n')
        f.write('{"fact":"attempt_started","attempt":"zero","seed":1,"load_epoch":-1}\n')
        f.write('"just a string"\n')
    for verb in (["report", str(toml)], ["report", str(toml), "--format", "json"], ["status", str(run_dir)]):
        out = cli(*verb)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (verb, out.stderr)
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    assert "wrong shape" in out.stderr and "Traceback" not in out.stderr
    assert report(toml)["status"] == "completed"


def test_watchdog_killed_before_hashing_an_announced_checkpoint_the_next_start_records_it(tmp_path):
    faults = [{"kind": "future_mtime", "attempt": 0, "epoch": 1, "step": -1}]
    toml = write_run(tmp_path, epochs=4, params={"faults": faults})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: any(e.get("event") == "checkpoint" and e["epoch"] == 1 for e in events(run_dir, 0)),
             timeout=60, what="the announcement of epoch 1")  # fmt: skip
    assert 1 not in [f["epoch"] for f in facts(run_dir, "checkpoint")]  # its mtime ahead holds the hash back
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rows = report(toml)["restarts"]
    assert (rows[1]["reason"], rows[1]["load_epoch"]) == ("session lost", 1), rows
    first = facts(run_dir, "checkpoint")[1]
    assert (first["epoch"], first["attempt"]) == (1, 0)


def test_stale_temp_files_of_dead_attempts_are_removed_at_launch(tmp_path):
    toml = write_run(tmp_path, epochs=1)
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = ckpts / ".epoch-0003.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    keep = ckpts / "notes.txt"
    keep.write_text("mine")
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    assert not stale.exists() and keep.exists()


ZERO_CODE = """
import json, math, os, sys
seed, start, epochs, ckdir, attempt = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                       int(sys.argv[5]))
for epoch in range(start, epochs):
    print(f"epoch {epoch}", flush=True)
    nan = attempt == 0 and epoch == 2
    path = os.path.join(ckdir, f"model_{epoch}.bin")
    with open(path, "w") as f:
        json.dump({"epoch": epoch, "attempt": attempt, "poisoned": nan}, f)
    print(f"loss = {'nan' if nan else 1.0 / (epoch + 1)}", flush=True)
    if nan:
        sys.exit(3)
"""


def test_zero_code_ignores_files_a_failed_attempt_left_and_records_each_file_once(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(ZERO_CODE)
    toml = write_run(tmp_path, epochs=4,
                     command=["python", str(script), "{seed}", "{start_epoch}", "{epochs}", "{checkpoint_dir}",
                              "{attempt}"],
                     trainer={"mode": "zero-code"}, checkpoints={"pattern": "model_{epoch}.bin", "settle_s": 0.2})
    run_dir = tmp_path / "runs" / "run"
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    recorded = facts(run_dir, "checkpoint")
    assert [(f["epoch"], f["attempt"]) for f in recorded] == [(0, 0), (1, 0), (2, 1), (3, 1)], recorded
    assert all(f["path"] == f"checkpoints/model_{f['epoch']}.bin" for f in recorded)  # relative: the checkpoint dir
    rows = report(toml)["restarts"]
    assert (rows[1]["reason"], rows[1]["load_epoch"]) == ("nan", 1)
