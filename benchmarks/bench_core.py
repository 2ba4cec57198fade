"""Measures the watchdog with the fake trainer: detection latency per fault, restart overhead,
watchdog start-up time and RSS, and supervised-vs-bare wall time of the same short job.

    python benchmarks/bench_core.py [--repeats 5]

Prints figures (medians over --repeats runs); asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_trainer.py"
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_run  # noqa: E402

FAULTS = [
    ("nan", "nan", {}),
    ("test_nan", "test nan", {}),
    ("cuda_error", "cuda error", {}),
    ("cuda_hang", "cuda error", {"watch": {"cuda_error_grace_s": 0.0}}),
    ("gpu_oom", "gpu oom", {}),
    ("enospc", "disk full", {}),
    ("crash", "crash", {}),
    ("hang", "hang", {"watch": {"heartbeat_timeout_s": 1.0}}),
]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def supervise(toml: Path, sample_rss: bool = False) -> tuple[float, int]:
    """Run `supervisor start`; return (wall seconds, peak watchdog RSS in bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", "-q", str(toml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    peak = 0
    if sample_rss:
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)
    proc.wait()
    return time.perf_counter() - t0, peak


def fault_run(kind: str, extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        faults = [{"kind": kind, "attempt": 0, "epoch": 1, "step": -1 if kind == "test_nan" else 1}]
        toml = write_run(tmp, epochs=3, params={"faults": faults, "step_s": 0.05}, **json.loads(json.dumps(extra)))
        supervise(toml)
        run_dir = tmp / "runs" / "run"
        ledger = jsonl(run_dir / "ledger.jsonl")
        ended = next(f for f in ledger if f["fact"] == "attempt_ended" and f["attempt"] == 0)
        if kind == "hang":
            steps = [e for e in jsonl(run_dir / "attempts" / "attempt-0000.events.jsonl") if e.get("event") == "step"]
            evidence = steps[-1]["t"] + extra["watch"]["heartbeat_timeout_s"]
        else:
            evidence = next(e["t"] for e in jsonl(run_dir / "evidence.jsonl") if e["attempt"] == 0)
        first_step = next(e["t"] for e in jsonl(run_dir / "attempts" / "attempt-0001.events.jsonl")
                          if e.get("event") == "step")  # fmt: skip
        return {"fault": ended["fault"], "detect_s": ended["detected_at"] - evidence,
                "restart_s": first_step - ended["detected_at"]}  # fmt: skip


def bare_run(tmp: Path, epochs: int, params: dict) -> float:
    run_dir = tmp / "bare"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "params.json").write_text(json.dumps(params))
    env = {**os.environ, "SUPERVISOR_RUN_DIR": str(run_dir), "SUPERVISOR_EVENTS": str(run_dir / "events.jsonl"),
           "SUPERVISOR_CHECKPOINT_DIR": str(run_dir / "ck"), "SUPERVISOR_EPOCHS": str(epochs),
           "SUPERVISOR_PARAMS": str(run_dir / "params.json"), "SUPERVISOR_SEED": "29"}  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(FAKE)], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.repeats
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; medians over {n} runs\n")

    print("detection latency (evidence -> fault named) and restart overhead (fault named -> first step of the")
    print("next attempt), fake trainer:")
    print(f"  {'fault':<12} {'reason':<11} {'detect ms':>10} {'max':>7} {'restart ms':>11}")
    for kind, reason, extra in FAULTS:
        runs = [fault_run(kind, extra) for _ in range(n)]
        assert all(r["fault"] == reason for r in runs), (kind, runs)
        det = [r["detect_s"] * 1000 for r in runs]
        rst = [r["restart_s"] * 1000 for r in runs]
        med_det, med_rst = statistics.median(det), statistics.median(rst)
        print(f"  {kind:<12} {reason:<11} {med_det:10.0f} {max(det):7.0f} {med_rst:11.0f}")

    starts = []
    for _ in range(max(n, 10)):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "supervisor.cli", "--version"], check=True, stdout=subprocess.DEVNULL)
        starts.append(time.perf_counter() - t0)
    print(f"\nwatchdog start-up (`supervisor --version`, process start to exit): "
          f"median {statistics.median(starts) * 1000:.0f} ms")  # fmt: skip

    params = {"steps_per_epoch": 20, "step_s": 0.02, "eval": True}
    epochs = 10
    bare, sup, rss = [], [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(n):
            bare.append(bare_run(tmp, epochs, params))
            run_tmp = tmp / f"s{i}"
            run_tmp.mkdir()
            toml = write_run(run_tmp, epochs=epochs, params=params)
            wall, peak = supervise(toml, sample_rss=True)
            sup.append(wall)
            rss.append(peak)
    b, s = statistics.median(bare), statistics.median(sup)
    print(f"watchdog peak RSS during a run: median {statistics.median(rss) / 2**20:.1f} MiB")
    print(f"same job ({epochs} epochs x {params['steps_per_epoch']} steps x {params['step_s']}s): bare {b:.2f}s, "
          f"supervised {s:.2f}s, ratio {s / b:.3f} (+{(s - b) * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
