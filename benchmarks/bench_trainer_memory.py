"""Host memory of a training attempt and its DataLoader workers, per epoch. Prints figures only.

Runs `python -m trainer` on a synthetic set with workers and samples RSS / USS / PSS of the trainer
and its children (psutil memory_full_info) at every checkpoint event; flat numbers over epochs
mean no creep (the log's CPU OOM rows came from creep).

    python benchmarks/bench_trainer_memory.py [--epochs 6] [--workers 2] [--images 600] [--size 96]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def tree_memory(pid: int) -> dict[str, float]:
    """RSS/USS/PSS in MiB of the process and of all its descendants (summed), and the worker count."""
    try:
        main = psutil.Process(pid)
        procs = [main, *main.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {"main_rss": 0.0, "main_uss": 0.0, "workers_rss": 0.0, "workers_uss": 0.0, "workers_pss": 0.0,
           "total_uss": 0.0, "total_pss": 0.0, "workers": float(len(procs) - 1)}  # fmt: skip
    for p in procs:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        key = "main" if p.pid == pid else "workers"
        out[f"{key}_rss"] += m.rss / MIB
        out[f"{key}_uss"] += m.uss / MIB
        if key == "workers":
            out["workers_pss"] += m.pss / MIB
        out["total_uss"] += m.uss / MIB
        out["total_pss"] += m.pss / MIB
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    params = {
        "data_root": str(work / "data"), "synthetic_images": args.images, "synthetic_size": args.size,
        "output_scale_S": args.size // 32, "num_epoch": args.epochs, "num_workers": args.workers,
        "batch_size_train": 16, "batch_size_test": 32, "multi_scale_epoch": args.epochs // 2,
        "neck_channels": 64, "pretrained": False, "mix_precision": False, "lr_linear_max": 0.01,
        "lr_warmup_epoch": 1, "test_pr_after_epoch": 0, "random_ratio": 0.5,
    }  # fmt: skip
    (work / "params.json").write_text(json.dumps(params))
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "trainer", "--params", str(work / "params.json"),
           "--checkpoint-dir", str(work / "ckpt"), "--events", str(events)]  # fmt: skip
    log = open(work / "trainer.log", "w")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"# {args.workers} workers, {args.images} images of {args.size} px, MiB; log {work / 'trainer.log'}")
    print("epoch  main_rss  main_uss  workers  workers_rss  workers_uss  workers_pss  total_uss  total_pss  peak")
    seen, peak = 0, 0.0
    while proc.poll() is None:
        mem = tree_memory(proc.pid)
        if mem:
            peak = max(peak, mem["main_rss"] + mem["workers_uss"])
        lines = events.read_text().splitlines() if events.exists() else []
        for line in lines[seen:]:
            ev = json.loads(line)
            if ev["event"] == "checkpoint" and mem:
                print(f"{ev['epoch']:5d}  {mem['main_rss']:8.1f}  {mem['main_uss']:8.1f}  {int(mem['workers']):7d}  "
                      f"{mem['workers_rss']:11.1f}  {mem['workers_uss']:11.1f}  {mem['workers_pss']:11.1f}  "
                      f"{mem['total_uss']:9.1f}  {mem['total_pss']:9.1f}  {peak:6.1f}", flush=True)  # fmt: skip
        seen = len(lines)
        time.sleep(0.5)
    print(f"# exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
