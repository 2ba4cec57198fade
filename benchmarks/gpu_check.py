"""GPU check: the reference trainer on CUDA under the supervisor, with real GPU faults.

One supervised run of `python -m trainer` (416 px, AMP, channels_last) in which
  attempt 0 hits a real device-side assert        -> restart row `cuda error`
  attempt 1 allocates twice the card's memory     -> restart row `gpu oom` (the next attempt halves its batch)
  attempt 2 gets infinite gradients under AMP     -> the GradScaler skips steps -> restart row `nan`
and attempt 3 finishes the run. Prints the restart table, how long each fault took from injection
to the supervisor's verdict, and exits 1 when the table is not the expected one.

    python benchmarks/gpu_check.py [--work /tmp/gpu-check] [--epochs 5] [--images 1280] [--size 416]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import toml_value  # noqa: E402  (the run.toml writer the tests and bench_core use)

FAULTS = [
    {"kind": "cuda_error", "epoch": 1, "step": 2, "attempt": 0},
    {"kind": "gpu_oom", "epoch": 2, "step": 2, "attempt": 1},
    {"kind": "amp_overflow", "epoch": 3, "step": 1, "attempt": 2},
]
EXPECTED = [("normal start", 0, -1), ("cuda error", 1, 0), ("gpu oom", 2, 1), ("nan", 3, 2)]


def write_run_toml(work: Path, epochs: int, images: int, size: int, device: str) -> Path:
    params = {
        "data_root": str(work / "data"), "synthetic_images": images, "synthetic_size": size,
        "output_scale_S": size // 32, "num_epoch": epochs, "device": device, "mix_precision": True,
        "batch_size_train": 32, "batch_size_test": 64, "num_workers": min(6, os.cpu_count() or 1), "pretrained": False,
        "multi_scale_epoch": 2, "lr_linear_max": 0.01, "lr_warmup_epoch": 1, "lr_cosine_max_1": 0.01,
        "lr_T_half_1": epochs, "test_pr_after_epoch": 0, "inject_fault": FAULTS,
    }  # fmt: skip
    lines = [
        'name = "gpu-check"', f"epochs = {epochs}", f"run_dir = {toml_value(str(work / 'run'))}",
        "[trainer]", 'command = ["python", "-m", "trainer"]', "[trainer.params]",
        *(f"{k} = {toml_value(v)}" for k, v in params.items()),
        "[seeds]", "pool = [29, 28, 31, 30, 37]", "[restart]", "halve_batch_on_gpu_oom = true",
        "[watch]", "heartbeat_timeout_s = 180",
    ]  # fmt: skip
    path = work / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def log_time(line: str) -> float | None:
    """The epoch seconds of a trainer log line ("2026-11-25 22:13:56,103 trainer ...")."""
    try:
        stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--images", type=int, default=1280,
                    help="keep >= ~1000: the scale falls from up to 65536 below 1 within epoch 3 only with ~20+ steps")
    ap.add_argument("--size", type=int, default=416, help="input side, a multiple of 32")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script itself (faults are then simulated)")
    args = ap.parse_args()
    shutil.rmtree(args.work / "run", ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    toml = write_run_toml(args.work, args.epochs, args.images, args.size, args.device)
    log_path = Path(os.environ.get("OUT", args.work)) / "gpu_check_supervisor.log"
    sup = [sys.executable, "-m", "supervisor"]
    with log_path.open("w") as log:
        rc = subprocess.run([*sup, "start", str(toml)], stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"supervisor start exited {rc} (full output in {log_path})")
    out = subprocess.run([*sup, "report", str(toml), "--format", "json"], capture_output=True, text=True)
    report = json.loads(out.stdout)
    print(subprocess.run([*sup, "report", str(toml)], capture_output=True, text=True).stdout)

    print("fault injected -> verdict (from the trainer's log line to the watchdog's detection;")
    print("  for nan this includes the amp_skip_limit optimizer steps the GradScaler skips first):")
    for rec in map(json.loads, (args.work / "run" / "ledger.jsonl").read_text().splitlines()):
        if rec.get("fact") != "attempt_ended" or not rec.get("fault"):
            continue
        injected = [t for x in rec.get("tail", []) if "FAULT INJECTION" in x and (t := log_time(x))]
        if injected and rec.get("detected_at"):
            ms = (rec["detected_at"] - injected[-1]) * 1000
            print(f"  attempt {rec['attempt']}: {rec['fault']:<10} exit {rec.get('exit')}, {ms:.0f} ms")
    batches = [ln for ln in log_path.read_text().splitlines() if "SUPERVISOR_BATCH_DIVISOR" in ln]
    print("batch halving:", batches[-1].split("trainer INFO ")[-1] if batches else "NOT SEEN")

    rows = [(r["reason"], r["epoch"], r["load_epoch"]) for r in report["restarts"]]
    ok = rc == 0 and report["status"] == "completed" and rows == EXPECTED and bool(batches)
    print("best:", report.get("best"))
    print("GPU CHECK", "PASSED" if ok else f"FAILED: rows {rows}, expected {EXPECTED}, status {report['status']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
