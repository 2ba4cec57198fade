"""The examples of examples/ under the real CLI, each with three faults in one run: a NaN loss, a hang, and a
kill -9 of the training process. Each run must complete (exit 0), resume after every fault from the newest
verified checkpoint before it (not from scratch) and end with the checkpoint of its last step.

`pytest -s tests/test_examples.py` prints each run's restart table (`supervisor report`).

The faults come from the examples' test hook (EXAMPLE_FAULTS, see `injected_faults` in the scripts): NaN at
step 90, a silent hang at step 160, a stall (alive, printing, no progress) at step 240 during which this test
kills the trainer with SIGKILL once the checkpoint of step 200 is verified. Checkpoints are saved every 50
steps (examples/plain) or at evals every 50 iterations when the val loss improved (examples/nanogpt), so the
resume points are 50, 150 and 200.

What the test changes in its copy of a run.toml, and why:
- `[watch] heartbeat_timeout_s = 4`: the hang is found in seconds instead of ten minutes (it must still cover
  the silent stretch between a script's first line and its first step: nanoGPT's config lines come before
  loading the checkpoint and the first eval); `startup_timeout_s = 120`: importing torch on two busy cores,
  silent, takes longer;
- `[restart]` backoff 0.1 s instead of 1 s, doubling.
EXAMPLE_STEP_S=0.005 makes each step 5 ms longer (a bigger model), OMP_NUM_THREADS=1 keeps torch on one core.
`test_plain_examples_as_is_and_an_exact_pause` runs examples/plain/run-zero-code.toml as a user would, without
faults or slower steps (each save must be recorded under the step it holds), and pauses run.toml (protocol mode)
mid-run: resumed, it must end with the weights of the uninterrupted zero-code run (same seed, same computation).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import clean_env, cli, ledger, report, wait_for

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAULTS = "nan@90 hang@160 stall@240"
KILL_AFTER = 200  # the checkpoint verified before the kill
STEPS = 300
OVERRIDES = {
    "watch": {"heartbeat_timeout_s": 4, "startup_timeout_s": 120},
    "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.2, "backoff_jitter": 0.0},
}


def set_keys(text: str, table: str, values: dict) -> str:
    """`text` (a run.toml) with `values` set in `[table]`: replaced where the key is, else added after the header
    (the table is appended when missing)."""
    lines = text.splitlines()
    try:
        start = lines.index(f"[{table}]")
    except ValueError:
        lines += ["", f"[{table}]"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for key, value in values.items():
        line = f"{key} = {json.dumps(value)}"
        found = [i for i in range(start + 1, end) if re.match(rf"{re.escape(key)}\s*=", lines[i])]
        if found:
            lines[found[0]] = line
        else:
            lines.insert(start + 1, line)
            end += 1
    return "\n".join(lines) + "\n"


def copy_example(tmp_path: Path, folder: str, toml: str) -> Path:
    """The example folder copied into tmp_path (its runs/ and out/ left behind), its run.toml adjusted."""
    dest = tmp_path / folder
    shutil.copytree(EXAMPLES / folder, dest, ignore=shutil.ignore_patterns("runs", "out", "__pycache__"))
    path = dest / toml
    text = path.read_text()
    for table, values in OVERRIDES.items():
        text = set_keys(text, table, values)
    path.write_text(text)
    return path


def facts(run_dir: Path, kind: str) -> list[dict]:
    return [f for f in ledger(run_dir) if f.get("fact") == kind]


def position(fact: dict) -> int:
    """The step of a checkpoint fact (the ledger keeps a run's position under "epoch", in a run of steps too)."""
    return fact["epoch"] if "epoch" in fact else fact["step"]


def verified_steps(run_dir: Path) -> set[int]:
    return {position(f) for f in facts(run_dir, "checkpoint")}


def attempt_log(run_dir: Path, attempt: int) -> str:
    path = run_dir / "attempts" / f"attempt-{attempt:04d}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def kill_trainer_when_stalled(proc: subprocess.Popen, run_dir: Path) -> dict:
    """Wait for the stall (and the checkpoint before it to be verified), then SIGKILL the training process: the
    child of the shim whose pid the attempt's `attempt_started` fact holds."""

    stall_seen: list[float] = []

    def stalled():
        if proc.poll() is not None:
            raise AssertionError(f"the supervisor exited {proc.returncode} before the stall")
        started = facts(run_dir, "attempt_started")
        if not (started and "stalled at" in attempt_log(run_dir, started[-1]["attempt"])):
            return None
        stall_seen[:] = stall_seen or [time.monotonic()]
        # nanoGPT saves only when the val loss improved: if it did not at step 200, kill after a while anyway
        # (the resume point is then checked against what the ledger holds).
        return started[-1] if KILL_AFTER in verified_steps(run_dir) or time.monotonic() > stall_seen[0] + 10 else None

    started = wait_for(stalled, timeout=150, interval=0.1, what="the stall and the checkpoint before it")
    trainer = psutil.Process(started["pid"]).children()[0]
    trainer.send_signal(signal.SIGKILL)
    return {"attempt": started["attempt"], "pid": trainer.pid}


def run_example(tmp_path: Path, folder: str, toml: str) -> tuple[Path, Path, dict, float]:
    """Run the example with the three faults; the trainer is killed from here during the stall."""
    path = copy_example(tmp_path, folder, toml)
    name = re.search(r'^name = "([^"]+)"', path.read_text(), re.MULTILINE).group(1)
    run_dir = path.parent / "runs" / name
    env = clean_env(EXAMPLE_FAULTS=FAULTS, EXAMPLE_STEP_S="0.005", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    with open(tmp_path / "supervisor.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            killed = kill_trainer_when_stalled(proc, run_dir)
            proc.wait(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - t0
    output = (tmp_path / "supervisor.out").read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    table = cli("report", str(path), env=clean_env()).stdout
    print(f"\n{folder}/{toml}: {elapsed:.1f}s, killed the trainer (pid {killed['pid']}) of attempt "
          f"{killed['attempt']}\n{table}")  # fmt: skip
    return path, run_dir, killed, elapsed


def check_restarts(path: Path, run_dir: Path, killed: dict) -> tuple[dict, list[dict]]:
    """The restart rows name the three faults in order, and each resume is from the newest checkpoint verified
    before the fault, at a step after the start: never from scratch."""
    rep = report(path)
    rows = rep["restarts"]
    assert [r["reason"] for r in rows] == ["normal start", "nan", "hang", "crash"], rows
    assert rows[0]["load_step"] == -1
    ended = {f["attempt"]: f for f in facts(run_dir, "attempt_ended")}
    assert killed["attempt"] == 2 and "SIGKILL" in str(ended[2]["exit"]), ended[2]
    checkpoints = facts(run_dir, "checkpoint")
    for attempt, (row, fault_step) in enumerate(zip(rows[1:], (90, 160, 240), strict=True), start=1):
        before = [position(c) for c in checkpoints if c["attempt"] < attempt and position(c) <= fault_step]
        assert before, f"attempt {attempt}: no checkpoint was verified before the fault at step {fault_step}"
        assert row["load_step"] == max(before) > 0, (attempt, row, before)
    assert rep["checkpoints"][-1] == max(verified_steps(run_dir)), rep["checkpoints"]
    assert rep["status"] == "completed", rep
    check_checkpoint_contents(run_dir)
    return rep, rows


def check_checkpoint_contents(run_dir: Path, only_evals: bool = True) -> None:
    """Each file still in the checkpoint dir holds the state of the step it is named by (`step`, nanoGPT's
    `iter_num`), and (`only_evals`: no checkpoint requests) every checkpoint the run recorded is at a step where the
    script saves by itself: its evals, every 50 steps."""
    import torch

    recorded = sorted(verified_steps(run_dir))
    if only_evals:
        assert all(step % 50 == 0 for step in recorded), f"checkpoints recorded at steps never saved: {recorded}"
    for f in facts(run_dir, "checkpoint"):
        path = run_dir / f["path"]
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            held = state.get("step", state.get("iter_num"))
            assert held == position(f), f"{path.name} (step {position(f)}) holds the state of step {held}"


@pytest.mark.timeout(240)
def test_plain_zero_code_example(tmp_path):
    """examples/plain/train.py unchanged: one ckpt.pt overwritten, --resume, the loss read from its output."""
    path, run_dir, killed, _ = run_example(tmp_path, "plain", "run-zero-code.toml")
    rep, rows = check_restarts(path, run_dir, killed)
    assert [r["load_step"] for r in rows[1:]] == [50, 150, 200], rows
    assert rep["checkpoints"][-1] == STEPS
    for attempt, row in enumerate(rows[1:], start=1):  # the script found the checkpoint put back in out/ckpt.pt
        log = attempt_log(run_dir, attempt)
        assert f"resumed at step {row['load_step']}" in log, log[:2000]
        started = facts(run_dir, "attempt_started")[attempt]
        assert "--resume" in started["command"], started["command"]
    assert "--resume" not in facts(run_dir, "attempt_started")[0]["command"]
    assert rep["best"]["val_loss"]["mode"] == "min" and set(rep["metrics"]) >= {"50", "300"}, rep["metrics"]


@pytest.mark.timeout(240)
def test_plain_protocol_example(tmp_path):
    """examples/plain/train_supervised.py: the same loop with the client's events and background saves."""
    path, run_dir, killed, _ = run_example(tmp_path, "plain", "run.toml")
    rep, rows = check_restarts(path, run_dir, killed)
    assert [r["load_step"] for r in rows[1:]] == [50, 150, 200], rows
    assert rep["checkpoints"][-1] == STEPS
    for attempt, row in enumerate(rows[1:], start=1):  # the first step event of a resumed attempt follows it
        events = run_dir / "attempts" / f"attempt-{attempt:04d}.events.jsonl"
        steps = [json.loads(x)["step"] for x in events.read_text().splitlines() if '"event":"step"' in x]
        assert steps and steps[0] == row["load_step"] + 1, (attempt, row, steps[:3])
        assert f"resumed at step {row['load_step']}" in attempt_log(run_dir, attempt)


@pytest.mark.timeout(240)
def test_nanogpt_example(tmp_path):
    """examples/nanogpt/train.py unchanged: --init_from=scratch|resume, saves only when the val loss improved."""
    path, run_dir, killed, _ = run_example(tmp_path, "nanogpt", "run.toml")
    rep, rows = check_restarts(path, run_dir, killed)
    started = facts(run_dir, "attempt_started")
    assert started[0]["command"][-1] == "--init_from=scratch"
    for attempt, row in enumerate(rows[1:], start=1):
        assert started[attempt]["command"][-1] == "--init_from=resume"
        log = attempt_log(run_dir, attempt)
        assert "Resuming training from out" in log
        first_eval = re.search(r"^step (\d+): train loss", log, re.MULTILINE)
        assert first_eval and int(first_eval.group(1)) == row["load_step"], (attempt, row, log[:1500])
    # The final checkpoint is the last save of the last attempt (nanoGPT saves only on improvement).
    last = attempt_log(run_dir, len(rows) - 1)
    saves = re.findall(r"^step (\d+): train loss.*\n(?:.*\n)??saving checkpoint", last, re.MULTILINE)
    assert saves and rep["checkpoints"][-1] == int(saves[-1]), (saves, rep["checkpoints"])


@pytest.mark.timeout(180)
def test_plain_examples_as_is_and_an_exact_pause(tmp_path):
    """examples/plain/run-zero-code.toml as a user runs it (no faults, the script's own speed: milliseconds a step, so
    the line of the next step follows each save closely): every save is recorded under the step it holds. Then
    run.toml (protocol mode), paused by `supervisor stop` mid-run and started again: it resumes at the step the
    checkpoint request was served with the same seed, and ends with the very weights of the uninterrupted run."""
    import torch

    env = clean_env(OMP_NUM_THREADS="1")
    zero = copy_example(tmp_path / "a", "plain", "run-zero-code.toml")
    out = cli("start", "-q", str(zero), env=env, timeout=100)
    assert out.returncode == 0, out.stderr[-4000:]
    zero_dir = zero.parent / "runs" / "plain-zero-code"
    print(f"\nplain/run-zero-code.toml as is: checkpoints recorded at {sorted(verified_steps(zero_dir))}")

    proto = copy_example(tmp_path / "b", "plain", "run.toml")
    proto_dir = proto.parent / "runs" / "plain-protocol"
    slow = clean_env(OMP_NUM_THREADS="1", EXAMPLE_STEP_S="0.01")  # time to stop it mid-run; the same computation
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", "-q", str(proto)], env=slow,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        events = proto_dir / "attempts" / "attempt-0000.events.jsonl"
        wait_for(lambda: events.exists() and '"step":120' in events.read_text(), timeout=100, what="step 120")
        stop = cli("stop", str(proto), "--wait", "60", env=env)
        assert proc.wait(timeout=90) == 75, stop.stdout + stop.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = cli("start", "-q", str(proto), env=slow, timeout=100)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = report(proto)["restarts"]
    print(f"plain/run.toml stopped and started again:\n{cli('report', str(proto), env=env).stdout}")
    assert [(r["reason"], r["seed"]) for r in rows] == [("normal start", 29), ("stopped", 29)], rows
    assert rows[1]["load_step"] > 120, rows

    rep = report(zero)
    assert [r["reason"] for r in rep["restarts"]] == ["normal start"] and rep["checkpoints"][-1] == STEPS
    a = torch.load(zero_dir / "checkpoints" / "step-00000300.pt", weights_only=True)["model"]
    b = torch.load(proto_dir / "checkpoints" / "step-00000300.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the paused run ended with other weights"
    check_checkpoint_contents(proto_dir, only_evals=False)  # the stop's checkpoint is at the step it was served
    check_checkpoint_contents(zero_dir)
