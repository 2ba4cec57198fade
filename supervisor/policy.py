"""Pure restart decisions: (what the ledger says, how the attempt ended) -> what to do next.

No I/O, no clock, no processes: randomness for jitter comes in as an argument, so every case is a
plain function call in the tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from supervisor.config import RestartConfig
from supervisor.faults import NORMAL_START, Fault
from supervisor.ledger import STATUS_COMPLETED, STATUS_GAVE_UP, AttemptView, RunView
from supervisor.recordcfg import EarlyStopRule

# Faults that are not the trainer's doing: they pause or resume, and spend no restart budget.
EXTERNAL = frozenset(f for f in Fault if f.external)


@dataclass(frozen=True)
class Launch:
    """Start an attempt: resume from load_epoch (-1 fresh) with seed, after delay_s; with load_step,
    from the mid-epoch checkpoint `load_step` optimizer steps into load_epoch (training resumes there)."""

    load_epoch: int
    seed: int
    reason: str
    delay_s: float = 0.0
    batch_divisor: int = 1
    note: str = ""
    load_step: int | None = None

    @property
    def start_epoch(self) -> int:
        return self.load_epoch if self.load_step is not None else self.load_epoch + 1


@dataclass(frozen=True)
class Pause:
    reason: str


@dataclass(frozen=True)
class GiveUp:
    diagnosis: str


@dataclass(frozen=True)
class Complete:
    pass


@dataclass(frozen=True)
class EarlyStop:
    """An [[early_stop]] rule fired: the run ends, status "early stopped" (exit 0)."""

    diagnosis: str


Decision = Launch | Pause | GiveUp | Complete | EarlyStop
# The reason of the first attempt of a finished run given more epochs (or steps): it goes on from its last one.
EXTENDED = "extended"


def early_stop(metrics: dict[int, dict[str, Any]], rules: list[EarlyStopRule], noun: str = "epoch"
               ) -> tuple[EarlyStopRule, dict[str, Any]] | None:  # fmt: skip
    """The first rule the eval metrics (position -> {name: value}) make fire, with what fired it (rule, metric,
    value, epoch); None while none does. A threshold is judged on the first evaluation at or after its `at`;
    a patience counts evaluations of the metric since its best (an improvement beats it by more than min_delta)."""
    for rule in rules:
        series = [(pos, float(m[rule.metric])) for pos, m in sorted(metrics.items())
                  if isinstance(m.get(rule.metric), (int, float)) and not isinstance(m.get(rule.metric), bool)]
        if rule.patience is not None:
            best, since = None, 0
            for pos, value in series:
                better = best is None or (value > best + rule.min_delta if rule.improves == "max"
                                          else value < best - rule.min_delta)  # fmt: skip
                best, since = (value, 0) if better else (best, since + 1)
                if since >= rule.patience:
                    return rule, {"rule": rule.describe(noun), "metric": rule.metric, "value": value, "epoch": pos}
            continue
        judged = next(((pos, v) for pos, v in series if pos >= (rule.at or 0)), None)
        if judged is None:
            continue
        pos, value = judged
        if (rule.below is not None and value < rule.below) or (rule.above is not None and value > rule.above):
            return rule, {"rule": rule.describe(noun), "metric": rule.metric, "value": value, "epoch": pos}
    return None


def derived_seed(name: str, n: int) -> int:
    """The n-th seed derived from the run name, once the pool is used up (stable across machines)."""
    digest = hashlib.sha256(f"{name}:seed:{n}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def next_seed(pool: list[int], used: set[int], name: str) -> int:
    """The first pool seed this run has not used, then derived ones; never a used seed."""
    for seed in pool:
        if seed not in used:
            return seed
    n = 0
    while (seed := derived_seed(name, n)) in used:
        n += 1
    return seed


def is_complete(view: RunView, epochs: int) -> bool:
    """The last position (epoch epochs-1, or in a run of steps step N: pass span = N + 1) is verified."""
    return (epochs - 1) in view.checkpoints


def consecutive_same_start(attempts: list[AttemptView], load: int) -> int:
    """How many attempts at the end of the list failed after resuming from `load` without a new checkpoint
    (a run of steps: the same failing step rarely repeats, the same stretch does)."""
    n = 0
    for a in reversed(attempts):
        if a.load_epoch != load or a.progressed or _fault_of(a) in EXTERNAL or a.load_step is not None:
            break
        n += 1
    return n


def _fault_of(a: AttemptView) -> Fault | None:
    try:
        return Fault(a.fault) if a.fault else None
    except ValueError:
        return None


def consecutive_no_progress(attempts: list[AttemptView]) -> int:
    """How many attempts at the end of the list failed without raising the high-water epoch."""
    n = 0
    for a in reversed(attempts):
        if a.progressed or _fault_of(a) in EXTERNAL:
            break
        n += 1
    return n


def consecutive_same_epoch(attempts: list[AttemptView], epoch: int) -> int:
    """How many attempts at the end of the list failed during `epoch`."""
    n = 0
    for a in reversed(attempts):
        if a.failed_epoch != epoch or _fault_of(a) in EXTERNAL:
            break
        n += 1
    return n


def resume_epoch(view: RunView, before: int, rollback: int = 0) -> int:
    """Newest verified epoch <= before - 1, stepped back `rollback` verified ones (at most to the oldest).

    -1 (fresh start) when no verified checkpoint precedes `before`.
    """
    candidates = [e for e in view.verified_epochs() if e <= before - 1]
    if not candidates:
        return -1
    return candidates[max(0, len(candidates) - 1 - rollback)]


def exact_resume(view: RunView, fault: Fault | None) -> Launch | None:
    """After a pause (stopped, time limit, preempted), or a lost session that left a mid-epoch checkpoint
    newer than every epoch end: continue from the newest checkpoint with the same seed, so the run goes
    on as if it had never stopped. None when the rule does not apply (faults keep the log's rule)."""
    last, newest = view.last, view.newest()
    if last is None or newest is None or fault is None:
        return None
    if not (fault.pauses or (fault is Fault.SESSION_LOST and newest.step is not None)):
        return None
    return Launch(load_epoch=newest.epoch, load_step=newest.step, seed=last.seed, reason=fault.value,
                  batch_divisor=last.batch_divisor)  # fmt: skip


def first_launch(view: RunView, pool: list[int], name: str, epochs: int) -> Decision:
    """What to do when the supervisor starts on a run: begin, continue after a pause or lost session."""
    if is_complete(view, epochs):
        return Complete()
    last = view.last
    seed = next_seed(pool, view.seeds_used, name)
    divisor = last.batch_divisor if last else 1
    if last is None:  # a fresh start, or from the parent's checkpoint ([init]) recorded before any attempt
        return Launch(load_epoch=max(view.checkpoints, default=-1), seed=seed, reason=NORMAL_START)
    if view.status == STATUS_COMPLETED and last.fault is None:  # finished, then given more epochs: go on
        return Launch(load_epoch=resume_epoch(view, before=epochs), seed=seed, reason=EXTENDED,
                      batch_divisor=divisor)  # fmt: skip
    fault = _fault_of(last) or Fault.SESSION_LOST
    exact = exact_resume(view, fault) if view.status != STATUS_GAVE_UP else None
    if exact is not None:
        return exact
    load = resume_epoch(view, before=epochs)
    return Launch(load_epoch=load, seed=seed, reason=fault.value, batch_divisor=divisor)


def decide(view: RunView, cfg: RestartConfig, pool: list[int], name: str, epochs: int, u: float) -> Decision:
    """Next step after the last attempt in `view` ended. `u` in [0, 1) drives the backoff jitter. In a run of
    steps (view.unit) `epochs` is the span (steps + 1) and positions are step counts."""
    if is_complete(view, epochs):
        return Complete()
    last = view.last
    assert last is not None and last.ended, "decide() needs an ended attempt"
    fault = _fault_of(last) or Fault.CRASH
    noun = "step" if view.unit == "steps" else "epoch"
    if fault.pauses:
        return Pause(fault.value)
    if fault is Fault.INCOMPLETE:
        # An exit 0 is no failure: a script that saved more and stopped (its own time budget) continues from its
        # newest checkpoint (a new seed, as every restart that is no pause); one that saved nothing new would only
        # exit again: say why and stop.
        newest = view.newest()
        if not last.progressed or newest is None:
            return GiveUp(last.detail or f"the trainer exited 0 before the run's last {noun} was verified")
        seed = next_seed(pool, view.seeds_used, name)
        return Launch(load_epoch=newest.epoch, load_step=newest.step, seed=seed, reason=fault.value,
                      batch_divisor=last.batch_divisor,
                      note="it exited 0 after new checkpoints: continuing")  # fmt: skip

    recent = view.attempts[view.budget_start :]  # a give-up and a new start reset the budgets
    counted = [a for a in recent if a.ended and _fault_of(a) not in EXTERNAL and a.fault]
    if fault not in EXTERNAL:
        if len(counted) > cfg.max_restarts:
            return GiveUp(f"restart budget exhausted: {len(counted)} faults > max_restarts = {cfg.max_restarts}")
        limit = cfg.per_fault.get(fault.value)
        same = sum(1 for a in counted if _fault_of(a) is fault)
        if limit is not None and same > limit:
            return GiveUp(f"'{fault.value}' happened {same} times > restart.per_fault.{fault.value} = {limit}")

        early = recent[-cfg.early_failure_limit :]
        if (
            len(early) == cfg.early_failure_limit
            and all(a.steps == 0 and a.fault == fault.value for a in early)
        ):
            hint = next((line for line in reversed(last.tail) if line.strip()), last.exit or "")
            return GiveUp(
                f"the trainer fails with '{fault.value}' before its first step every time "
                f"({len(early)} attempts); last output: {hint.strip()[:300]}"
            )
        stuck = consecutive_no_progress(recent)
        if stuck >= cfg.no_progress_limit:
            return GiveUp(
                f"no progress across {stuck} attempts: no checkpoint beyond {noun} {view.high_water} "
                f"(last fault '{fault.value}' during {noun} {last.failed_epoch})"
            )

    failed = last.failed_epoch if last.failed_epoch is not None else view.high_water + 1
    rollback = 0
    note = ""
    if fault not in EXTERNAL:
        if view.unit == "steps":
            rollback = consecutive_same_start(view.attempts, resume_epoch(view, before=failed)) // cfg.rollback_after
        else:
            rollback = consecutive_same_epoch(view.attempts, failed) // cfg.rollback_after
    load = resume_epoch(view, before=failed, rollback=rollback)
    if rollback and load != resume_epoch(view, before=failed):  # already at a fresh start: nothing rolled back
        base = resume_epoch(view, before=failed)
        what = f"the steps after step {base}" if view.unit == "steps" else f"epoch {failed}"
        note = f"{what} failed {rollback * cfg.rollback_after}x in a row: rolled back to {noun} {load}"

    divisor = last.batch_divisor
    if fault is Fault.GPU_OOM and cfg.halve_batch_on_gpu_oom:
        divisor = min(divisor * 2, cfg.max_batch_divisor)

    stuck = consecutive_no_progress(recent) if fault not in EXTERNAL else 0
    delay = 0.0
    if stuck:
        base = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (stuck - 1))
        delay = max(0.0, base * (1 + cfg.backoff_jitter * (2 * u - 1)))
    seed = next_seed(pool, view.seeds_used, name)
    return Launch(load_epoch=load, seed=seed, reason=fault.value, delay_s=delay, batch_divisor=divisor, note=note)


def retention(
    view: RunView,
    keep_last: int,
    keep_best: int,
    metric: str | None,
    mode: str,
    protect: set[int],
) -> list[int]:
    """Verified epochs that retention may delete: never the newest `keep_last`, the best `keep_best`
    by `metric`, or a protected one (the checkpoint an attempt resumes from)."""
    epochs = view.verified_epochs()
    keep = set(epochs[-max(1, keep_last) :]) | protect
    if metric and keep_best:
        scored = []
        for e in epochs:
            value = view.metrics.get(e, {}).get(metric)
            if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
                scored.append((value if mode == "max" else -value, e))
        keep |= {e for _, e in sorted(scored, reverse=True)[:keep_best]}
    return [e for e in epochs if e not in keep]
