"""Work lost per pause kind, before and after checkpoint requests: steps and training seconds the next
attempt trains again, as the ledger's `work_lost` facts record them.

    python benchmarks/bench_work_lost.py [--runs 3] [--steps 100] [--step-s 0.03]

The fake trainer (tests/fake_trainer.py) under the real `supervisor start`, epochs of STEPS steps of
STEP_S seconds; each pause lands 70 % into epoch 1. "before": a trainer that does not handle checkpoint
requests and no every_s (how every pause worked before); "after": one that does, with every_s = 1 s
for the loss that gives no notice. Kinds:
  stop         SIGTERM to the watchdog (what `supervisor stop`, `docker stop` and Ctrl-C do)
  time limit   [platform] session_limit_s ends mid-epoch (Kaggle/Colab's 12 h, scaled down)
  spot notice  a local HTTP server playing AWS IMDSv2 announces a termination
  session lost SIGKILL of the watchdog (the notebook vanished); the next start records the loss
Prints the median over --runs of each figure; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_run  # noqa: E402  (the run.toml writer the tests use)
from metadata_server import FakeMetadata  # noqa: E402  (AWS IMDSv2 on 127.0.0.1)

KINDS = ("stop", "time limit", "spot notice", "session lost")


def steps_seen(run_dir: Path) -> int:
    path = run_dir / "attempts" / "attempt-0000.events.jsonl"
    if not path.exists():
        return 0
    return path.read_text().count('"event":"step"')


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def lost(run_dir: Path) -> dict:
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        fact = json.loads(line)
        if fact["fact"] == "work_lost" and fact["attempt"] == 0:
            return fact
    raise RuntimeError("no work_lost fact for attempt 0")


def supervisor(toml: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", "-q", str(toml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def startup_s(home: Path, steps: int, step_s: float) -> float:
    """Seconds from `supervisor start` to the first step event (the time limit counts from the start)."""
    toml = write_run(home, epochs=4, params={"steps_per_epoch": steps, "step_s": step_s}, platform={"spot": "off"})
    t0 = time.monotonic()
    proc = supervisor(toml)
    wait_for(lambda: steps_seen(home / "runs" / "run") >= 1, 120, "the first step")
    took = time.monotonic() - t0
    proc.kill()
    proc.wait()
    return took


def one(kind: str, after: bool, steps: int, step_s: float, home: Path, startup: float = 1.0) -> dict:
    pause_at = steps + int(0.7 * steps)  # 70 % into epoch 1
    params = {"steps_per_epoch": steps, "step_s": step_s, "handles_requests": after}
    sections: dict = {"watch": {"stop_grace_s": 10.0}, "platform": {"spot": "off"}}
    if kind == "session lost" and after:
        sections["checkpoints"] = {"every_s": 1.0}
    imds = None
    if kind == "time limit":  # generic platform: the session starts with the supervisor
        seconds = startup + pause_at * step_s + 5.0  # the plan pauses RESERVE_S (5 s) before the end
        sections["platform"] = {"detect": "generic", "session_limit_s": round(seconds, 2), "stop_margin_s": 0.0,
                                "spot": "off"}  # fmt: skip
    if kind == "spot notice":
        imds = FakeMetadata()
        sections["platform"] = {"spot": "aws", "metadata_url": imds.url, "notice_poll_s": 0.1}
    toml = write_run(home, epochs=4, params=params, **sections)
    run_dir = home / "runs" / "run"
    proc = supervisor(toml)
    try:
        if kind != "time limit":
            wait_for(lambda: steps_seen(run_dir) >= pause_at, 120, f"step {pause_at}")
        if kind == "stop":
            proc.send_signal(signal.SIGTERM)
        elif kind == "spot notice":
            imds.interrupt()  # a stale time: the AWS window applies
        elif kind == "session lost":
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
        if kind == "session lost":  # the next start closes the lost attempt and records what it lost
            nxt = supervisor(toml)
            wait_for(lambda: "work_lost" in (run_dir / "ledger.jsonl").read_text(), 60, "work_lost")
            nxt.send_signal(signal.SIGTERM)
            nxt.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if imds is not None:
            imds.close()
    fact = lost(run_dir)
    return {"steps": fact["steps"], "seconds": fact["seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100, help="steps per epoch")
    ap.add_argument("--step-s", type=float, default=0.03, help="seconds per step")
    args = ap.parse_args()
    print(f"fake trainer, {args.steps} steps/epoch x {args.step_s}s, pause 70% into epoch 1; median of "
          f"{args.runs} runs; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'pause kind':<14}{'before: steps':>15}{'before: s':>11}{'after: steps':>14}{'after: s':>10}")
    with tempfile.TemporaryDirectory(prefix="bench-work-lost-") as tmp:
        calibration = Path(tmp) / "calibration"
        calibration.mkdir()
        startup = statistics.median(startup_s(calibration / str(i), args.steps, args.step_s)
                                    for i in range(3) if (calibration / str(i)).mkdir() is None)  # fmt: skip
        for kind in KINDS:
            cells = []
            for after in (False, True):
                results = []
                for i in range(args.runs):
                    home = Path(tmp) / f"{kind.replace(' ', '_')}-{after}-{i}"
                    home.mkdir()
                    results.append(one(kind, after, args.steps, args.step_s, home, startup))
                cells += [statistics.median(r["steps"] for r in results),
                          statistics.median(r["seconds"] for r in results)]  # fmt: skip
            print(f"{kind:<14}{cells[0]:>15g}{cells[1]:>11.2f}{cells[2]:>14g}{cells[3]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
