"""Does the detector learn? Trains `python -m trainer` on a synthetic VOC set on this machine and
prints AP50 / VOCmAP per epoch with the minutes elapsed. Prints figures; asserts nothing.

    python benchmarks/bench_trainer_learning.py [--images 1500] [--size 128] [--epochs 14]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]

# The learning configuration (also the basis of the demo's [trainer.params]).
PARAMS: dict[str, object] = {
    "batch_size_train": 16,
    "batch_size_test": 32,
    "accum_batch_num": 1,
    "multi_scale_epoch": 0,
    "output_scale_S": 4,
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "mix_precision": False,
    "clip_max_norm": 20.0,
    "lambda_scale_1": 1.0,
    "lambda_scale_2": 1.0,
    "lambda_scale_4": 1.0,
    "lambda_coord": 10.0,
    "lambda_noobj": 1.0,
    "lambda_obj": 10.0,
    "lambda_class": 10.0,
    "lambda_prior": 0.1,
    "epoch_prior": 1,
    "IoU_thres": 0.7,
    "scale_coord": True,
    "eps": 1e-6,
    "no_obj_v3": True,
    "lr_linear_max": 0.01,
    "lr_warmup_epoch": 1,
    "conf_thres": 0.01,
    "conf_ratio_thres": 0.05,
    "test_pr_after_epoch": 0,
    "test_pr_batch_ratio": 1.0,
    "random_ratio": 0.5,
    "pretrained": False,
    "neck_channels": 64,
}


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and its live children (DataLoader workers)."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--size", type=int, default=128, help="synthetic image width and network input")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="override lr_linear_max / lr_cosine_max_1")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a parameter")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    params = dict(PARAMS)
    params.update(
        data_root=str(work / "data"),
        synthetic_images=args.images,
        synthetic_size=args.size,
        output_scale_S=args.size // 32,
        num_epoch=args.epochs,
        num_workers=args.workers,
        lr_cosine_max_1=args.lr or params["lr_linear_max"],
        lr_T_half_1=args.epochs - params["lr_warmup_epoch"],
    )
    if args.lr:
        params["lr_linear_max"] = args.lr
    for item in args.set:
        k, _, v = item.partition("=")
        params[k] = json.loads(v)
    (work / "params.json").write_text(json.dumps(params, indent=1))
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    print(f"# {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}")
    print(f"# params: {json.dumps(params)}")
    cmd = [sys.executable, "-m", "trainer", "--params", str(work / "params.json"),
           "--checkpoint-dir", str(work / "ckpt"), "--events", str(events)]  # fmt: skip
    t0 = time.monotonic()
    log = open(work / "trainer.log", "w")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seen = 0
    print("epoch  minutes  cpu_min/2  AP50    VOCmAP  eval_loss")
    cpu = 0.0
    best = (0.0, -1, 0.0)
    while True:
        done = proc.poll() is not None
        cpu = max(cpu, tree_cpu_seconds(proc.pid))
        lines = events.read_text().splitlines() if events.exists() else []
        for line in lines[seen:]:
            ev = json.loads(line)
            if ev["event"] == "eval":
                m, minutes = ev["metrics"], (time.monotonic() - t0) / 60
                row = (f"{ev['epoch']:5d}  {minutes:7.2f}  {cpu / 120:9.2f}  {m['AP50']:.4f}  {m['VOCmAP']:.4f}  "
                       f"{m['loss']:.3f}")  # fmt: skip
                print(row, flush=True)
                if m["AP50"] > best[0]:
                    best = (m["AP50"], ev["epoch"], minutes)
        seen = len(lines)
        if done:
            break
        time.sleep(1.0)
    total = (time.monotonic() - t0) / 60
    print(f"# exit {proc.returncode}; total {total:.2f} min wall (incl. data generation and start-up); "
          f"cpu_min/2 = CPU time of trainer + workers / 2 cores, unaffected by other load")  # fmt: skip
    print(f"# best AP50 {best[0]:.4f} at epoch {best[1]} after {best[2]:.2f} min; log: {work / 'trainer.log'}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
