"""How long a checkpoint blocks training: `Supervised.save_checkpoint(background=True)` against a
synchronous torch.save + fsync (+ rename, as the client did before) of the same state.

    python benchmarks/bench_checkpoint_stall.py [--sizes-mb 100 1000] [--runs 5] [--dir DIR]

The state is a dict of float32 tensors (4 MiB each) of about the given size. Per size and mode it
prints medians over --runs: the stall (time the caller was blocked; for background saves the first
one, which allocates its host buffers, apart from the later ones, which copy into the previous
snapshot's: Supervised.reuse_buffers), for the background save the time until its checkpoint event
is announced (file written, fsynced, renamed, hashed) and the speed of a matmul loop the caller runs
meanwhile, relative to the same loop alone (the write shares the CPU and the GIL with training).
Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from supervisor.client import Supervised, atomic_write  # noqa: E402

TENSOR_ELEMENTS = 1 << 20  # 4 MiB of float32


def make_state(size_mb: int) -> dict[str, torch.Tensor]:
    count = max(1, round(size_mb * 1e6 / (4 * TENSOR_ELEMENTS)))
    g = torch.Generator().manual_seed(0)
    return {f"layer{i:04d}.weight": torch.randn(TENSOR_ELEMENTS, generator=g) for i in range(count)}


def work_rate(until: Callable[[], bool], min_s: float = 0.0) -> float:
    """Matmuls per second the caller manages until `until()` is true (and at least min_s)."""
    a = torch.randn(256, 256)
    n, t0 = 0, time.perf_counter()
    while not until() or time.perf_counter() - t0 < min_s:
        a = torch.mm(a, a).div_(a.norm() + 1e-6)
        n += 1
    return n / (time.perf_counter() - t0)


def saving() -> bool:
    return any(t.name == "checkpoint-save" and t.is_alive() for t in threading.enumerate())


def bench(size_mb: int, runs: int, where: Path) -> dict[str, float]:
    state = make_state(size_mb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    sup = Supervised(checkpoint_dir=where / "ckpt", events_path=where / "events.jsonl")
    sync_stall, bg_stall, announced, write_s, speed = [], [], [], [], []
    for run in range(runs):
        # Synchronous: what a trainer blocked on torch.save + fsync + rename waits.
        path = where / "ckpt" / f"sync-{run}.pt"
        t0 = time.perf_counter()
        atomic_write(path, lambda f: torch.save(state, f))
        sync_stall.append(time.perf_counter() - t0)
        path.unlink()

        # Background: the caller is blocked by the snapshot only, then trains (here: matmuls).
        wall0, t0 = time.time(), time.perf_counter()
        path = sup.save_checkpoint(state, run)
        bg_stall.append(time.perf_counter() - t0)
        busy = work_rate(lambda: not saving())
        sup.wait()
        speed.append(busy / work_rate(lambda: True, min_s=0.5))  # the same loop with no write going on
        event = [json.loads(x) for x in (where / "events.jsonl").read_text().splitlines()][-1]
        assert event["event"] == "checkpoint" and event["size"] == path.stat().st_size
        announced.append(event["t"] - wall0)
        write_s.append(event["write_s"])
        path.unlink()
    med = statistics.median
    return {
        "mb": nbytes / 1e6, "sync": med(sync_stall), "bg_first": bg_stall[0], "bg": med(bg_stall[1:] or bg_stall),
        "announced": med(announced), "write": med(write_s), "speed": med(speed),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.runs} runs")
    print()
    print("| state | sync save+fsync stall | background stall, 1st save | background stall, later saves "
          "| stall ratio | background announced after | background write_s | caller speed during write |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes_mb:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-ckpt-") as tmp:
            r = bench(size, args.runs, Path(tmp))
        print(f"| {r['mb']:.0f} MB | {r['sync']:.3f} s | {r['bg_first']:.3f} s | {r['bg']:.3f} s "
              f"| x{r['sync'] / r['bg']:.1f} | {r['announced']:.3f} s | {r['write']:.3f} s | {r['speed']:.0%} |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
