"""Runs many seeded crash-consistency schedules (tests/crash_harness.py) against a SeaweedFS of its own
and prints what it injected, what it checked and every violation with the seed that replays it.

    python benchmarks/crash_harness.py --schedules 300 --seed 1 [--minutes 480] [--work DIR] [--keep]

Schedule i uses seed S + i (the same sizes as the CI part, so a seed from a CI failure replays here).
Stops starting schedules after --minutes. Exit status 1 when a violation was found, 3 on harness errors.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from crash_harness import (  # noqa: E402  (the harness library the tests use)
    CI_SIZES,
    FAULT_KINDS,
    GUARANTEES,
    Harness,
    HarnessError,
    Totals,
    replay_command,
)


def summary(t: Totals, first_seed: int, wall_s: float, disk_ok: bool) -> str:
    out = [f"schedules run: {t.schedules} (seeds {first_seed}..{first_seed + t.schedules - 1}) in {wall_s / 60:.1f} min"
           f"{'' if disk_ok else '; disk_full skipped (mount of a tmpfs not permitted)'}"]  # fmt: skip
    out.append(f"faults injected: {sum(t.faults.values())}")
    out += [f"  {kind:<16} {t.faults.get(kind, 0):>5}" for kind in FAULT_KINDS]
    out.append(f"guarantees checked: {sum(t.checks.values())}")
    out += [f"  {g:<9} {t.checks.get(g, 0):>5}  {text}" for g, text in GUARANTEES.items()]
    failing = sorted({v.seed for v in t.violations})
    out.append(f"violations: {len(t.violations)} in {len(failing)} schedule(s)")
    for g, text in GUARANTEES.items():
        seeds = sorted({v.seed for v in t.violations if v.guarantee == g})
        n = sum(1 for v in t.violations if v.guarantee == g)
        if n:
            out.append(f"  {g:<9} {n:>5}  {text}; seeds {' '.join(map(str, seeds))}")
    out.append(f"longest time the bucket held no committed checkpoint after its first commit: {t.longest_gap_s:.1f}s")
    if t.harness_errors:
        out.append(f"harness errors (not violations): {len(t.harness_errors)}")
        out += [f"  {e}" for e in t.harness_errors]
    if t.notes:
        out.append(f"notes ({len(t.notes)}, not violations):")
        out += [f"  {n}" for n in t.notes[:20]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1, help="seed of the first schedule")
    ap.add_argument("--minutes", type=float, default=None, help="start no schedule after this many minutes")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep every schedule's folder, not only failing ones")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="crash-harness-"))
    t0 = time.monotonic()
    totals = Totals()
    harness = Harness(work)
    print(f"crash harness: work folder {work}, SeaweedFS at {harness.server.weed.endpoint}", flush=True)
    try:
        for i in range(args.schedules):
            if args.minutes is not None and time.monotonic() - t0 > args.minutes * 60:
                break
            seed = args.seed + i
            try:
                result = harness.run_schedule(seed, CI_SIZES, keep="always" if args.keep else "violations")
            except HarnessError as exc:
                totals.harness_errors.append(f"seed {seed}: {exc}")
                print(f"seed {seed}: harness error: {exc}", flush=True)
                harness.close()
                harness = Harness(work)
                continue
            totals.add(result)
            state = f"{len(result.violations)} violation(s)" if result.violations else "ok"
            print(f"seed {seed}: {state}, {result.rounds} rounds, {result.wall_s:.1f}s, "
                  f"faults {dict(sorted(result.faults.items()))}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted: summary of the schedules so far", flush=True)
    finally:
        harness.close()
    print()
    print(summary(totals, args.seed, time.monotonic() - t0, harness.disk_ok))
    failing = [r for r in totals.results if r.violations]
    if failing:
        print("\ndetails:")
        for r in failing:
            print(r.describe())
            print()
        for r in failing:
            print(f"REPLAY: {replay_command(r.seed)}")
    if not args.work and not args.keep and not failing:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failing else (3 if totals.harness_errors else 0)


if __name__ == "__main__":
    sys.exit(main())
