"""Runs counted in steps, and zero-code scripts that keep one checkpoint file, through the real CLI.

The scripts here are written the way users write theirs: a protocol trainer that counts global steps, and
an unmodified iteration-based script (nanoGPT's conventions) that overwrites `out/ckpt.json` in place and
resumes with `--resume`. Faults are real: a NaN loss, an exit 1, a SIGKILL of the trainer, an exit 0 before
the last save.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import cli, ledger, report, start_bg, toml_value, wait_for

pytestmark = pytest.mark.slow

STEP_TRAINER = textwrap.dedent('''
    import json, os, sys, time
    from supervisor.durable import atomic_write

    env = os.environ
    assert env["SUPERVISOR_UNIT"] == "steps" and "SUPERVISOR_EPOCHS" not in env
    total, start = int(env["SUPERVISOR_STEPS"]), int(env["SUPERVISOR_START_STEP"])
    load = env.get("SUPERVISOR_LOAD_PATH")
    state = json.loads(open(load).read()) if load else {"step": 0, "seeds": []}
    assert state["step"] == start, (state, start)
    state["seeds"].append(int(env["SUPERVISOR_SEED"]))
    nan_at, every = int(env.get("NAN_AT", "-1")), int(env.get("EVERY", "5"))
    first = env["SUPERVISOR_ATTEMPT"] == "0"

    def emit(**kw):
        with open(env["SUPERVISOR_EVENTS"], "a") as f:
            f.write(json.dumps(kw) + "\\n")

    for s in range(start + 1, total + 1):
        time.sleep(float(env.get("STEP_S", "0.02")))
        loss = float("nan") if first and s == nan_at else 1.0 / s
        emit(event="step", step=s, loss=loss, epoch=s // 7)  # an epoch field is informational here
        if loss != loss:
            time.sleep(60)  # the watchdog ends it
        state["step"] = s
        if s % every == 0 or s == total:
            path = os.path.join(env["SUPERVISOR_CHECKPOINT_DIR"], env["SUPERVISOR_CHECKPOINT_PATTERN"].format(step=s))
            data = json.dumps(state).encode()
            atomic_write(path, lambda f: f.write(data))
            emit(event="eval", step=s, metrics={"val_loss": 1.0 / s})
            emit(event="checkpoint", step=s, path=path)
''')

# nanoGPT's conventions: `step N: ... val loss X` at an eval, then the checkpoint file is overwritten IN PLACE;
# `iter N: loss X` per iteration; `--resume` continues from out/ckpt.json. Faults come from marker files the
# script removes when they fire (it knows nothing of attempts).
FILE_SCRIPT = textwrap.dedent('''
    import argparse, json, os, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--max-iters", type=int, required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--stop-early-at", type=int, default=-1)
    a = p.parse_args()
    ckpt = os.path.join("out", "ckpt.json")
    os.makedirs("out", exist_ok=True)
    state = json.loads(open(ckpt).read()) if a.resume else {"iter": 0, "seeds": []}
    state["seeds"].append(a.seed)
    with open("attempts.log", "a") as f:
        f.write(json.dumps({"resume": a.resume, "iter": state["iter"], "seed": a.seed}) + "\\n")

    def fire(name):
        if os.path.exists(name):
            os.remove(name)
            return True
        return False

    it = state["iter"]
    while True:
        if it % a.eval_interval == 0 and (it > state["iter"] or it == a.max_iters):
            print(f"step {it}: train loss {1 / (it + 1):.4f}, val loss {1 / (it + 2):.4f}", flush=True)
            state["iter"] = it
            time.sleep(0.01)  # serializing a model takes at least this long (the file's mtime is coarse)
            with open(ckpt, "w") as f:  # in place, as torch.save(path) does
                f.write(json.dumps(state))
        if it >= a.max_iters or it == a.stop_early_at:
            break
        time.sleep(float(os.environ.get("STEP_S", "0.08")))
        loss = "nan" if it == 13 and fire("nan.marker") else f"{1 / (it + 1):.4f}"
        print(f"iter {it}: loss {loss}, time 80.00ms", flush=True)
        if it == 17 and fire("crash.marker"):
            sys.exit(1)
        it += 1
''')


def write_toml(path: Path, lines: list[str], **tables: dict) -> Path:
    for table, values in tables.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def step_run(tmp_path: Path, steps: int = 20, env: dict | None = None, **tables: dict) -> Path:
    (tmp_path / "trainer.py").write_text(STEP_TRAINER)
    trainer = {"command": ["python", "trainer.py"], "env": env or {}, **tables.pop("trainer", {})}
    restart = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **tables.pop("restart", {})}
    return write_toml(tmp_path / "run.toml", ['name = "steps"', f"steps = {steps}"], trainer=trainer,
                      restart=restart, **tables)  # fmt: skip


def file_run(tmp_path: Path, steps: int = 25, **tables: dict) -> Path:
    (tmp_path / "train.py").write_text(FILE_SCRIPT)
    trainer = {"command": ["python", "train.py", "--seed={seed}", "--max-iters={steps}"], "mode": "zero-code",
               "resume_args": ["--resume"], **tables.pop("trainer", {})}
    watch = {"loss_regex": r"\biter \d+: loss (?P<loss>\S+),", "metric_regex": [r"val loss (?P<val_loss>[\d.]+)"],
             **tables.pop("watch", {})}
    checkpoints = {"file": "out/ckpt.json", "settle_s": 0.2, "best_metric": "val_loss", "best_mode": "min",
                   **tables.pop("checkpoints", {})}
    restart = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **tables.pop("restart", {})}
    return write_toml(tmp_path / "run.toml", ['name = "file"', f"steps = {steps}"], trainer=trainer, watch=watch,
                      checkpoints=checkpoints, restart=restart, **tables)  # fmt: skip


def show(rep: dict) -> None:
    print(f"\n{rep['name']}: {rep['status']} ({rep['unit']})")
    for row in rep["restarts"]:
        print("  ", row)


def test_a_run_of_steps_restarts_from_the_last_step_checkpoint_before_a_nan(tmp_path):
    toml = step_run(tmp_path, env={"NAN_AT": "12"})
    out = cli("start", "-q", str(toml), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = report(toml)
    show(rep)
    assert rep["unit"] == "steps" and rep["status"] == "completed"
    rows = rep["restarts"]
    assert [(r["step"], r["load_step"], r["reason"]) for r in rows] == [(1, -1, "normal start"), (11, 10, "nan")]
    assert rows[0]["seed"] != rows[1]["seed"]
    assert rep["checkpoints"][-1] == 20 and set(rep["checkpoints"]) <= {5, 10, 15, 20}
    assert rep["best"]["val_loss"]["step"] == 20 and "epoch" not in rep["best"]["val_loss"]
    final = json.loads((tmp_path / "runs" / "steps" / "checkpoints" / "step-00000020.pt").read_text())
    assert final["step"] == 20 and final["seeds"] == [rows[0]["seed"], rows[1]["seed"]]
    md = cli("report", str(toml)).stdout
    assert "| step | load_step | seed | reason |" in md and f"| 11 | 10 | {rows[1]['seed']} | nan |" in md


def test_a_run_of_steps_refuses_a_checkpoint_at_the_wrong_path_and_explains(tmp_path):
    toml = step_run(tmp_path, steps=6, checkpoints={"pattern": "s{step}.bin"}, env={"EVERY": "3"},
                    restart={"max_restarts": 0})  # fmt: skip
    # The trainer names its files from SUPERVISOR_CHECKPOINT_PATTERN, so any pattern works.
    out = cli("start", "-q", str(toml), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "steps" / "checkpoints" / "s6.bin").exists()
    bad = tmp_path / "bad.py"
    bad.write_text(STEP_TRAINER.replace('env["SUPERVISOR_CHECKPOINT_PATTERN"].format(step=s)', '"elsewhere.json"'))
    (tmp_path / "b").mkdir()
    toml = step_run(tmp_path / "b", steps=3, trainer={"command": ["python", str(bad)]}, restart={"max_restarts": 0})
    out = cli("start", str(toml), timeout=120)
    assert out.returncode == 1
    notes = [f["note"] for f in ledger(tmp_path / "b" / "runs" / "steps") if f["fact"] == "note"]
    assert any("checkpoint of step 3 not counted" in n and "not the run's checkpoint path for step 3" in n
               for n in notes), notes  # fmt: skip


def test_zero_code_snapshots_one_overwritten_file_and_puts_it_back_for_the_resume(tmp_path):
    toml = file_run(tmp_path)
    (tmp_path / "crash.marker").touch()  # exit 1 at iter 17 of the first attempt
    out = cli("start", "-q", str(toml), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = report(toml)
    show(rep)
    rows = rep["restarts"]
    assert [(r["reason"], r["load_step"]) for r in rows] == [("normal start", -1), ("crash", 15)]
    attempts = [json.loads(x) for x in (tmp_path / "attempts.log").read_text().splitlines()]
    assert attempts[0] == {"resume": False, "iter": 0, "seed": rows[0]["seed"]}
    assert attempts[1] == {"resume": True, "iter": 15, "seed": rows[1]["seed"]}  # our snapshot was put back
    assert rep["checkpoints"][-1] == 25
    ckdir = tmp_path / "runs" / "file" / "checkpoints"
    final = json.loads((ckdir / "step-00000025.pt").read_text())
    assert final["iter"] == 25 and final["seeds"] == [rows[0]["seed"], rows[1]["seed"]]
    for step in rep["checkpoints"]:  # each snapshot holds the state of the step it is named by
        assert json.loads((ckdir / f"step-{step:08d}.pt").read_text())["iter"] == step
    assert rep["metrics"]["25"]["val_loss"] == pytest.approx(1 / 27, abs=1e-4)


def test_zero_code_nan_read_from_output_rolls_back_with_a_new_seed(tmp_path):
    toml = file_run(tmp_path, steps=20)
    (tmp_path / "nan.marker").touch()  # `iter 13: loss nan`
    out = cli("start", "-q", str(toml), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = report(toml)["restarts"]
    assert [(r["reason"], r["load_step"]) for r in rows] == [("normal start", -1), ("nan", 10)]
    assert rows[0]["seed"] != rows[1]["seed"]


def test_zero_code_sigkill_of_the_script_resumes_from_its_last_snapshot(tmp_path):
    toml = file_run(tmp_path, steps=30, checkpoints={"keep_last": 10})
    run_dir = tmp_path / "runs" / "file"
    proc = start_bg(toml)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-00000010.pt").exists(), timeout=90, what="step 10")
        shim = next(f["pid"] for f in ledger(run_dir) if f["fact"] == "attempt_started")
        victim = psutil.Process(shim).children()[0]
        os.kill(victim.pid, signal.SIGKILL)
        assert proc.wait(timeout=150) == 0, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
    rows = report(toml)["restarts"]
    assert rows[1]["reason"] == "crash" and rows[1]["load_step"] >= 10
    resumed = json.loads((tmp_path / "attempts.log").read_text().splitlines()[1])
    assert resumed["resume"] and resumed["iter"] == rows[1]["load_step"]


def test_exit_0_before_the_last_checkpoint_continues_after_progress_and_is_diagnosed_without(tmp_path):
    toml = file_run(tmp_path, trainer={"fresh_args": ["--stop-early-at=12"],
                                       "resume_args": ["--resume", "--stop-early-at=12"]})  # fmt: skip
    out = cli("start", str(toml), timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    rep = report(toml)
    show(rep)
    # Attempt 0 saved steps 5 and 10, then exited 0: it continues from 10. Attempt 1 saved nothing new before
    # exiting 0 again: a third would do the same, so the run gives up at once, saying why and what to change.
    assert [(r["reason"], r["load_step"]) for r in rep["restarts"]] == [("normal start", -1), ("incomplete", 10)]
    assert [a["ended_by"] for a in rep["attempts"]] == ["incomplete", "incomplete"]
    assert "exited 0 at step" in rep["diagnosis"] and "require_last = false" in rep["diagnosis"]
    assert "require_last = false" in out.stderr


def test_exit_0_completes_the_run_when_the_last_save_is_optional(tmp_path):
    toml = file_run(tmp_path, trainer={"fresh_args": ["--stop-early-at=12"]}, checkpoints={"require_last": False})
    out = cli("start", "-q", str(toml), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = report(toml)
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 10
    again = cli("start", "-q", str(toml), timeout=60)  # a completed run stays completed
    assert again.returncode == 0 and len(report(toml)["restarts"]) == 1


def test_a_run_keeps_its_unit(tmp_path):
    toml = step_run(tmp_path, steps=5)
    assert cli("start", "-q", str(toml), timeout=60).returncode == 0
    text = toml.read_text().replace("steps = 5", "epochs = 5")
    toml.write_text(text)
    out = cli("start", str(toml), timeout=60)
    assert out.returncode == 2 and "a run keeps its unit" in out.stderr
