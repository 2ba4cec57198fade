"""The overhead of `[checkpoints] every_s = "auto"` as a share of training time, with the reference trainer.

    python benchmarks/bench_auto_overhead.py [--runs 3] [--epochs 2]

The demo of run.toml (the detector on the synthetic set, CPU, local store) without its injected NaN,
under the real `supervisor start`, side by side: every_s unset vs "auto", runs alternating. Figures:
  train s      the trainer's own seconds of training per epoch (its "epoch E/N ... Xs" log line): the
               optimizer steps, with any stall a save caused; evaluation excluded
  overhead     (auto - unset) / unset of the median train seconds (what the run really pays; noisy on
               a busy machine)
  stall share  sum of the mid-epoch saves' stall_s (what the trainer was blocked for) / train seconds
  saves        mid-epoch checkpoints taken; interval the last interval "auto" chose (ledger plan fact)
Prints medians over --runs; asserts nothing. CheckFreq's target is under 3.5 % (auto_overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import toml_value  # noqa: E402  (the TOML writer the tests use)

EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ loss .* ([0-9.]+)s(?: \||$)")


def write_toml(home: Path, epochs: int, every: str | None, data_root: Path) -> Path:
    demo = tomllib.loads((ROOT / "run.toml").read_text())
    params = {k: v for k, v in demo["trainer"]["params"].items() if k != "inject_fault"}
    params.update(data_root=str(data_root), num_epoch=epochs)
    lines = ['name = "bench"', f"epochs = {epochs}", "", "[trainer]", 'command = ["python", "-m", "trainer"]',
             f"cwd = {toml_value(str(ROOT))}", "", "[trainer.params]"]  # fmt: skip
    lines += [f"{k} = {toml_value(v)}" for k, v in params.items()]
    lines += ["", "[checkpoints]", "keep_last = 2"] + ([f"every_s = {toml_value(every)}"] if every else [])
    lines += ["", "[platform]", 'spot = "off"']
    path = home / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def one(home: Path, epochs: int, every: str | None, data_root: Path) -> dict:
    toml = write_toml(home, epochs, every, data_root)
    out = subprocess.run([sys.executable, "-m", "supervisor.cli", "start", "-q", str(toml)], capture_output=True,
                         text=True, timeout=3600)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"start exited {out.returncode}: {out.stderr[-2000:]}")
    run_dir = home / "runs" / "bench"
    log = "\n".join(p.read_text() for p in sorted((run_dir / "attempts").glob("*.log")))
    train = sum(float(m.group(2)) for m in EPOCH_LINE.finditer(log))
    events = [json.loads(x) for p in sorted((run_dir / "attempts").glob("*.events.jsonl"))
              for x in p.read_text().splitlines() if x.strip()]  # fmt: skip
    mid = [e for e in events if e.get("event") == "checkpoint" and "step" in e]
    facts = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    plans = [f for f in facts if f["fact"] == "plan" and f.get("every_s")]
    return {"train": train, "stall": sum(float(e.get("stall_s", 0.0)) for e in mid), "saves": len(mid),
            "interval": plans[-1]["every_s"] if plans else None}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {"unset": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        data_root = Path(tmp) / "data"  # generated once by the first run, shared by all
        for i in range(args.runs):
            for every in (None, "auto"):
                home = Path(tmp) / f"{every or 'unset'}-{i}"
                home.mkdir()
                results[every or "unset"].append(one(home, args.epochs, every, data_root))
    base = statistics.median(r["train"] for r in results["unset"])
    auto = statistics.median(r["train"] for r in results["auto"])
    share = statistics.median(r["stall"] / r["train"] for r in results["auto"] if r["train"])
    print(f"reference trainer, demo params (CPU), {args.epochs} epochs; median of {args.runs} runs each, "
          f"alternating; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'every_s':<10}{'train s':>10}{'saves':>7}{'interval s':>12}")
    for name, rows in results.items():
        saves = statistics.median(r["saves"] for r in rows)
        interval = [r["interval"] for r in rows if r["interval"]]
        shown = f"{statistics.median(interval):.1f}" if interval else "-"
        print(f"{name:<10}{statistics.median(r['train'] for r in rows):>10.2f}{saves:>7g}{shown:>12}")
    print(f"overhead of auto: {100 * (auto - base) / base:+.2f}% of training time (medians, side by side)")
    print(f"stall share of auto's saves: {100 * share:.2f}% of training time (sum of stall_s / train s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
