"""The restart policy as pure functions: no processes, no clock."""

from __future__ import annotations

import itertools

import pytest

from supervisor import ledger as L
from supervisor import policy
from supervisor.config import RestartConfig
from supervisor.faults import NORMAL_START, Fault

POOL = [29, 28, 31, 30, 37]


class Story:
    """Builds a ledger fact by fact, the way the watchdog writes it."""

    def __init__(self):
        self.facts: list[dict] = []
        self.n = 0

    def start(self, load_epoch: int, seed: int, reason: str = NORMAL_START, divisor: int = 1) -> Story:
        self.facts.append({"fact": L.ATTEMPT_STARTED, "attempt": self.n, "seed": seed, "load_epoch": load_epoch,
                           "reason": reason, "batch_divisor": divisor})  # fmt: skip
        return self

    def ckpt(self, *epochs: int) -> Story:
        for e in epochs:
            self.facts.append({"fact": L.CHECKPOINT, "epoch": e, "path": f"c/{e}", "size": 1, "sha256": f"h{e}"})
        return self

    def end(self, fault: Fault | None, failed_epoch: int, steps: int = 5, progressed: bool = False) -> Story:
        self.facts.append({"fact": L.ATTEMPT_ENDED, "attempt": self.n, "fault": fault.value if fault else None,
                           "failed_epoch": failed_epoch, "steps": steps, "progressed": progressed,
                           "tail": ["Traceback", "ValueError: boom"]})  # fmt: skip
        self.n += 1
        return self

    def view(self) -> L.RunView:
        return L.fold(self.facts)


def decide(story: Story, epochs: int = 10, u: float = 0.5, **cfg) -> policy.Decision:
    return policy.decide(story.view(), RestartConfig(**cfg), POOL, "run", epochs, u)


def test_first_start_is_fresh_with_first_pool_seed():
    d = policy.first_launch(L.fold([]), POOL, "run", 10)
    assert d == policy.Launch(load_epoch=-1, seed=29, reason=NORMAL_START)


def test_nan_restarts_from_epoch_minus_one_with_new_seed():
    s = Story().start(-1, 29).ckpt(0, 1, 2, 3, 4, 5, 6, 7).end(Fault.NAN, 8, progressed=True)
    d = decide(s)
    assert isinstance(d, policy.Launch)
    assert (d.start_epoch, d.load_epoch, d.seed, d.reason, d.delay_s) == (8, 7, 28, "nan", 0.0)


def test_the_experiment_log_table_is_reproduced():
    """The restart table of resnet18-voc-zqy-seed-sgd, given the same faults at the same epochs."""
    faults = [(8, Fault.NAN), (21, Fault.NAN), (62, Fault.CRASH), (64, Fault.TEST_NAN), (94, Fault.NAN),
              (113, Fault.CUDA_ERROR), (130, Fault.NAN), (133, Fault.TEST_NAN)]  # fmt: skip
    s, load = Story(), -1
    rows = []
    pool = [29, 28, 31, 30, 37, 32, 33, 47, 36]
    seed, reason = 29, NORMAL_START
    for epoch, fault in faults:
        s.start(load, seed, reason).ckpt(*range(load + 1, epoch)).end(fault, epoch, progressed=True)
        rows.append((load + 1, load, seed, reason))
        d = policy.decide(s.view(), RestartConfig(), pool, "run", 160, 0.5)
        load, seed, reason = d.load_epoch, d.seed, d.reason
    rows.append((load + 1, load, seed, reason))
    assert rows == [(0, -1, 29, "normal start"), (8, 7, 28, "nan"), (21, 20, 31, "nan"), (62, 61, 30, "crash"),
                    (64, 63, 37, "test nan"), (94, 93, 32, "nan"), (113, 112, 33, "cuda error"),
                    (130, 129, 47, "nan"), (133, 132, 36, "test nan")]  # fmt: skip


def test_seeds_never_repeat_even_past_the_pool():
    used: list[int] = []
    for _ in range(len(POOL) + 20):
        seed = policy.next_seed(POOL, set(used), "run")
        assert seed not in used
        used.append(seed)
    assert used[: len(POOL)] == POOL
    assert policy.next_seed(POOL, set(used), "run") == policy.next_seed(POOL, set(used), "run")  # stable


@pytest.mark.parametrize("fault", [Fault.TIME_LIMIT, Fault.PREEMPTED, Fault.STOPPED])
def test_external_ends_pause(fault):
    s = Story().start(-1, 29).ckpt(0).end(fault, 1)
    assert decide(s) == policy.Pause(fault.value)


def test_session_lost_resumes_without_spending_budget():
    s = Story().start(-1, 29).ckpt(0, 1).end(Fault.SESSION_LOST, 2)
    d = decide(s, max_restarts=0)
    assert isinstance(d, policy.Launch) and d.reason == "session lost" and d.load_epoch == 1


def test_total_budget():
    s = Story().start(-1, 29).ckpt(0).end(Fault.NAN, 1, progressed=True)
    s.start(0, 28, "nan").ckpt(1).end(Fault.NAN, 2, progressed=True)
    assert isinstance(decide(s, max_restarts=2), policy.Launch)
    assert isinstance(decide(s, max_restarts=1), policy.GiveUp)


def test_per_fault_budget():
    s = Story().start(-1, 29).ckpt(0).end(Fault.HANG, 1, progressed=True)
    s.start(0, 28, "hang").ckpt(1).end(Fault.HANG, 2, progressed=True)
    d = decide(s, per_fault={"hang": 1})
    assert isinstance(d, policy.GiveUp) and "restart.per_fault.hang" in d.diagnosis
    assert isinstance(decide(s, per_fault={"nan": 0}), policy.Launch)


def test_give_up_resets_budgets_for_a_new_start():
    s = Story().start(-1, 29).ckpt(0).end(Fault.HANG, 1, progressed=True)
    s.facts.append({"fact": L.RUN_ENDED, "status": L.STATUS_GAVE_UP})
    s.start(0, 28, "hang").end(Fault.HANG, 1)
    assert isinstance(decide(s, max_restarts=1), policy.Launch)


def test_early_failures_give_up_with_last_output():
    s = Story()
    for seed in (29, 28, 31):
        s.start(-1, seed).end(Fault.CRASH, 0, steps=0)
    d = decide(s, early_failure_limit=3)
    assert isinstance(d, policy.GiveUp)
    assert "before its first step" in d.diagnosis and "ValueError: boom" in d.diagnosis


def test_early_failures_of_different_kinds_do_not_give_up():
    s = Story().start(-1, 29).end(Fault.CRASH, 0, steps=0).start(-1, 28).end(Fault.HANG, 0, steps=0)
    s.start(-1, 31).end(Fault.CRASH, 0, steps=0)
    assert isinstance(decide(s, early_failure_limit=3, no_progress_limit=10), policy.Launch)


def test_no_progress_gives_up():
    s = Story().start(-1, 29).ckpt(0, 1, 2).end(Fault.NAN, 3, progressed=True)
    for seed in (28, 31, 30):
        s.start(2, seed, "nan").end(Fault.NAN, 3)
    d = decide(s, no_progress_limit=3, rollback_after=10)
    assert isinstance(d, policy.GiveUp) and "no progress across 3 attempts" in d.diagnosis
    assert isinstance(decide(s, no_progress_limit=4, rollback_after=10), policy.Launch)


def test_rollback_after_repeated_failure_at_same_epoch():
    s = Story().start(-1, 29).ckpt(0, 1, 2, 3).end(Fault.NAN, 4, progressed=True)
    assert decide(s, rollback_after=2).load_epoch == 3
    s.start(3, 28, "nan").end(Fault.NAN, 4)
    d = decide(s, rollback_after=2)
    assert d.load_epoch == 2 and "rolled back" in d.note
    s.start(2, 31, "nan").ckpt(3).end(Fault.NAN, 4)
    assert decide(s, rollback_after=2).load_epoch == 2  # 3 in a row: still one back
    s.start(2, 30, "nan").ckpt(3).end(Fault.NAN, 4)
    assert decide(s, rollback_after=2, no_progress_limit=10).load_epoch == 1


def test_rollback_stops_at_the_oldest_verified_checkpoint():
    view = Story().ckpt(5, 6).view()
    assert policy.resume_epoch(view, before=7, rollback=5) == 5
    assert policy.resume_epoch(view, before=5) == -1


def test_resume_skips_unavailable_checkpoints():
    s = Story().start(-1, 29).ckpt(0, 1, 2).end(Fault.NAN, 3, progressed=True)
    s.facts.append({"fact": L.CHECKPOINT_UNAVAILABLE, "epoch": 2, "sha256": "h2"})
    assert decide(s).load_epoch == 1


def test_backoff_grows_without_progress_and_resets_with_it():
    s = Story().start(-1, 29).ckpt(0).end(Fault.CRASH, 1, progressed=True)
    assert decide(s).delay_s == 0.0
    delays = []
    for seed in (28, 31, 30):
        s.start(0, seed, "crash").end(Fault.CRASH, 1)
        delays.append(decide(s, backoff_initial_s=1, backoff_max_s=3, backoff_jitter=0, no_progress_limit=9).delay_s)
    assert delays == [1.0, 2.0, 3.0]
    s.start(0, 37, "crash").ckpt(1).end(Fault.CRASH, 2, progressed=True)
    assert decide(s).delay_s == 0.0


def test_jitter_stays_within_bounds():
    s = Story().start(-1, 29).end(Fault.CRASH, 0, steps=3)
    for u in (0.0, 0.25, 0.999):
        d = policy.decide(s.view(), RestartConfig(backoff_initial_s=10, backoff_jitter=0.2), POOL, "run", 10, u)
        assert 8.0 <= d.delay_s <= 12.0


def test_gpu_oom_halves_batch_up_to_the_cap():
    s = Story().start(-1, 29, divisor=4).ckpt(0).end(Fault.GPU_OOM, 1, progressed=True)
    assert decide(s).batch_divisor == 8
    assert decide(s, max_batch_divisor=4).batch_divisor == 4
    assert decide(s, halve_batch_on_gpu_oom=False).batch_divisor == 4
    s2 = Story().start(-1, 29, divisor=2).ckpt(0).end(Fault.NAN, 1, progressed=True)
    assert decide(s2).batch_divisor == 2  # kept for later attempts


def test_complete_when_last_epoch_verified():
    s = Story().start(-1, 29).ckpt(*range(10)).end(None, 10, progressed=True)
    assert decide(s, epochs=10) == policy.Complete()
    assert policy.first_launch(s.view(), POOL, "run", 10) == policy.Complete()


def test_retention_keeps_last_best_and_protected():
    s = Story().ckpt(*range(8))
    s.facts += [{"fact": L.METRICS, "epoch": e, "metrics": {"AP50": v}} for e, v in [(1, 0.9), (4, 0.5), (6, 0.7)]]
    view = s.view()
    assert policy.retention(view, 2, 1, "AP50", "max", {3}) == [0, 2, 4, 5]
    assert policy.retention(view, 2, 1, "AP50", "min", set()) == [0, 1, 2, 3, 5]
    assert policy.retention(view, 1, 0, None, "max", set()) == list(range(7))


def test_decisions_are_total_over_many_histories():
    """Every combination of recent faults yields a decision that never reuses a seed."""
    faults = [f for f in Fault if f is not Fault.SESSION_LOST]
    for combo in itertools.product(faults, repeat=3):
        s, load = Story(), -1
        seed = 29
        for fault in combo:
            s.start(load, seed).ckpt(load + 1).end(fault, load + 2, progressed=True)
            d = decide(s)
            if not isinstance(d, policy.Launch):
                assert isinstance(d, (policy.Pause, policy.GiveUp))
                break
            assert d.seed not in s.view().seeds_used
            assert d.load_epoch == load + 1
            load, seed = d.load_epoch, d.seed
