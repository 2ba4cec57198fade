"""What zero-code snapshots of one overwritten checkpoint file (`[checkpoints] file`) cost.

    python benchmarks/bench_snapshot.py [--sizes-mb 100 1000] [--runs 5] [--dir DIR]

Per size, medians over --runs of:
- the script's own save (write + fsync of the file in place, as torch.save + a sync would),
- the time from that save until its snapshot is placed in the checkpoint dir (copied, hashed, fsynced),
  relative to `cp` of the same file (+ sync) as a reference for the copy alone,
- the longest time one `FileSnapshots.poll()` took while the copy ran: what the watch loop waits (it should
  be a stat, not the copy).
Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from supervisor.monitors.snapshot import FileSnapshots  # noqa: E402


def save(path: Path, data: bytes) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def one_run(folder: Path, data: bytes) -> tuple[float, float, float, float]:
    source = folder / "out" / "ckpt.pt"
    source.parent.mkdir(parents=True, exist_ok=True)
    ck = folder / "checkpoints"
    snaps = FileSnapshots(source, 0.0, lambda k: ck / f"step-{k:08d}.pt", range(1, 1000), by_epoch=False)
    snaps.baseline()
    snaps.note_key(10, time.time())
    save_s = save(source, data)
    time.sleep(0.06)  # the next output line comes after the save
    snaps.note_key(11, time.time())
    t0 = time.perf_counter()
    longest = 0.0
    while True:
        p0 = time.perf_counter()
        ready = snaps.poll()
        longest = max(longest, time.perf_counter() - p0)
        if ready:
            break
        time.sleep(0.01)
    placed_s = time.perf_counter() - t0
    snaps.close()
    reference = folder / "reference.pt"
    t0 = time.perf_counter()
    subprocess.run(["cp", str(source), str(reference)], check=True)
    subprocess.run(["sync", str(reference)], check=True)
    cp_s = time.perf_counter() - t0
    shutil.rmtree(ck)
    reference.unlink()
    return save_s, placed_s, cp_s, longest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{'size':>8} {'save':>8} {'snapshot':>9} {'cp+sync':>8} {'ratio':>6} {'max poll':>9}")
        for size in args.sizes_mb:
            data = os.urandom(1 << 20) * size  # incompressible enough for a file system, cheap to make
            rows = [one_run(Path(tmp) / f"r{i}", data) for i in range(args.runs)]
            save_s, placed_s, cp_s, longest = (statistics.median(col) for col in zip(*rows, strict=True))
            print(f"{size:>6}MB {save_s:>7.2f}s {placed_s:>8.2f}s {cp_s:>7.2f}s {placed_s / cp_s:>5.2f}x "
                  f"{longest * 1000:>7.1f}ms")  # fmt: skip
    print(f"medians over {args.runs} runs; snapshot = save -> placed in the checkpoint dir (copied, sha256, fsync)")


if __name__ == "__main__":
    main()
