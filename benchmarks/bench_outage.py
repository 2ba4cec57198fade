"""NaN detection latency and stop latency of the watchdog with the S3 server up vs down, side by side.

    python benchmarks/bench_outage.py [--repeats 5]

One run per repeat and mode: the fake trainer under `supervisor start` with [storage] on a SeaweedFS of
our own (lease_ttl_s 3, drain_timeout_s 5), epochs of ~1 s. "down": the server is SIGKILLed once the
run holds its lease and has committed the checkpoint of epoch 0; "up": the same run, the server left
alone. Attempt 0 writes a NaN loss at epoch NAN_EPOCH (over a lease ttl after the outage began); when
attempt 1 reports a step of its second epoch, the watchdog gets SIGTERM (the moment a `supervisor stop`
during training would come). Prints medians over --repeats runs and the ratio down/up; asserts nothing
about timings.
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
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_run  # noqa: E402  (the run.toml writer the tests use)
from crash_harness import S3Server, read_facts  # noqa: E402  (SeaweedFS with kill/start)

NAN_EPOCH = 4
STEPS, STEP_S = 5, 0.2
LEASE_TTL_S = 3.0
DRAIN_TIMEOUT_S = 5.0
FIGURES = [  # (key, name, definition)
    ("nan_s", "NaN detection", "fake trainer writes the NaN step (evidence.jsonl t) -> attempt_ended.detected_at"),
    ("noticed_s", "stop noticed", "SIGTERM to the watchdog -> detected_at of the stopped attempt (loop saw it)"),
    ("gone_s", "stop: tree gone", "SIGTERM -> the shim and the trainer are both gone (polled every 5 ms)"),
    ("ended_s", "stop: ledger", "SIGTERM -> ts of the stopped attempt's attempt_ended fact in the ledger"),
    ("exit_s", "stop: exit", f"SIGTERM -> `supervisor start` exits (includes drain, up to {DRAIN_TIMEOUT_S:.0f}s)"),
]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def ended(run_dir: Path, attempt: int) -> dict | None:
    return next((f for f in read_facts(run_dir / "ledger.jsonl")
                 if f["fact"] == "attempt_ended" and f["attempt"] == attempt), None)  # fmt: skip


def in_second_epoch(run_dir: Path, attempt: int) -> bool:
    """The attempt reported a step of the epoch after its first one (its events file, not the ledger)."""
    path = run_dir / "attempts" / f"attempt-{attempt:04d}.events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    epochs = [e["epoch"] for e in map(json.loads, lines[:-1]) if e.get("event") == "step"]  # last may be partial
    return bool(epochs) and max(epochs) > epochs[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def one_run(server: S3Server, work: Path, down: bool) -> dict:
    d = work / f"{'down' if down else 'up'}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    w = server.weed
    storage = {"url": f"s3://{w.bucket}/{prefix}", "endpoint_url": w.endpoint, "region": "us-east-1",
               "addressing_style": "path", "lease_ttl_s": LEASE_TTL_S, "drain_timeout_s": DRAIN_TIMEOUT_S}  # fmt: skip
    faults = [{"kind": "nan", "attempt": 0, "epoch": NAN_EPOCH, "step": 2}]
    toml = write_run(d, epochs=200, params={"steps_per_epoch": STEPS, "step_s": STEP_S, "faults": faults},
                     watch={"stop_grace_s": 5.0}, platform={"spot": "off", "detect": "generic"},
                     storage=storage)  # fmt: skip
    run_dir = d / "runs" / "run"
    server.ensure_up()
    with open(d / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", "-q", str(toml)],
                                stdout=subprocess.DEVNULL, stderr=err, env=server.env())  # fmt: skip
    try:
        wait_for(lambda: server.list_keys(f"{prefix}/run/manifest/epoch-0000.json"), 60, "epoch 0 committed")
        if down:
            server.kill()
        first = wait_for(lambda: ended(run_dir, 0), 120, "attempt 0 to end")
        nan_t = next(json.loads(x)["t"] for x in (run_dir / "evidence.jsonl").read_text().splitlines()
                     if json.loads(x)["kind"] == "nan")  # fmt: skip
        wait_for(lambda: in_second_epoch(run_dir, 1), 120, "attempt 1 to reach its second epoch")
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        t_term = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        wait_for(lambda: all(gone(p) for p in tree), 120, "the trainer tree to go", interval=0.005)
        t_gone = time.time()
        proc.wait(timeout=180)
        t_exit = time.time()
        stopped = ended(run_dir, 1) or {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.ensure_up()
    if first.get("fault") != "nan" or stopped.get("fault") != "stopped" or proc.returncode != 75:
        tail = (d / "stderr.txt").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"unexpected run: attempt 0 {first.get('fault')}, attempt 1 {stopped.get('fault')}, "
                           f"exit {proc.returncode}\n{tail}")  # fmt: skip
    return {"nan_s": first["detected_at"] - nan_t, "noticed_s": (stopped.get("detected_at") or t_exit) - t_term,
            "gone_s": t_gone - t_term, "ended_s": stopped["ts"] - t_term, "exit_s": t_exit - t_term}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.repeats
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; medians over {n} runs per mode")
    print(f'"down": SeaweedFS SIGKILLed after the lease is taken and epoch 0 committed; lease_ttl_s {LEASE_TTL_S:g}, '
          f"NaN at epoch {NAN_EPOCH} (~{(NAN_EPOCH + 0.5) * STEPS * STEP_S:.1f}s into the attempt)\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = S3Server(work)
        runs: dict[bool, list[dict]] = {False: [], True: []}
        try:
            for _ in range(n):
                for down in (False, True):  # interleaved, so a busy moment of the machine hits both
                    runs[down].append(one_run(server, work, down))
        finally:
            server.close()
    print(f"  {'figure':<16} {'up ms':>8} {'down ms':>9} {'ratio':>7}  {'down max ms':>11}   definition")
    for key, name, definition in FIGURES:
        up = statistics.median(r[key] for r in runs[False]) * 1000
        dn = statistics.median(r[key] for r in runs[True]) * 1000
        worst = max(r[key] for r in runs[True]) * 1000
        print(f"  {name:<16} {up:8.0f} {dn:9.0f} {dn / max(up, 1e-3):7.1f}  {worst:11.0f}   {definition}")


if __name__ == "__main__":
    main()
