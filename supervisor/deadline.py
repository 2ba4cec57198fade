"""The deadline plan: from measured costs, how early to ask for the final checkpoint so it is committed
to the store before the machine goes, how long a pause may wait and drain, and the `every_s = "auto"`
interval. Pure: costs in, seconds out; the watchdog measures and acts (docs/guarantees.md, "Deadlines").

Costs, each measured during the run and kept in the ledger's `plan` facts for the next session:
  step_s      median seconds per optimizer step (from the step events' times)
  save_s      seconds from asking for a checkpoint (or from the trainer starting to save it) to its
              announcement: the training stall plus the background write
  stall_s     seconds training waited for a save (the snapshot)
  cost_s      training seconds one checkpoint takes away: the stall plus the steps not trained while
              the background write competed for the CPU and the GIL (from the step events' times)
  size        bytes of the last checkpoint
  upload_bps  bytes per second of the store's recent uploads (or `[platform] upload_speed`)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass

# Slack of the plan: the time limit pauses this much earlier than the measured costs need; a pause
# lets the trainer use it (a slower step, a busy machine).
RESERVE_S = 5.0
# Seconds kept after the final commit for the ledger's last line and the processes' exits.
END_RESERVE_S = 1.0
# Measured costs vary (a slower step, a busier network): the plan asks this much more than measured.
SAFETY = 1.25
# "auto": the first checkpoint comes after this much training, to measure what one costs (CheckFreq
# profiles the first iterations the same way); the interval never goes below MIN_INTERVAL_S.
PROBE_S = 10.0
MIN_INTERVAL_S = 10.0
PROBE_WHY = "nothing measured yet"


def seconds(value: object) -> float | None:
    """A finite, non-negative number from an event or fact field; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


@dataclass
class Costs:
    step_s: float | None = None
    save_s: float | None = None
    stall_s: float | None = None
    size: int | None = None
    upload_bps: float | None = None
    cost_s: float | None = None

    def fields(self) -> dict[str, float | int | None]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_plan(cls, plan: dict) -> Costs:
        """The costs a `plan` fact recorded (an earlier session's measurements); junk fields are None."""
        size = seconds(plan.get("size"))
        return cls(seconds(plan.get("step_s")), seconds(plan.get("save_s")), seconds(plan.get("stall_s")),
                   int(size) if size is not None else None, seconds(plan.get("upload_bps")),
                   seconds(plan.get("cost_s")))  # fmt: skip

    def merged(self, older: Costs) -> Costs:
        """These costs, with what is still unmeasured taken from `older`."""
        mine, theirs = asdict(self), asdict(older)
        return Costs(**{k: mine[k] if mine[k] is not None else theirs[k] for k in mine})


def median_interval(times: Iterable[float]) -> float | None:
    """Median gap between consecutive times (seconds per step); None with fewer than two."""
    ts = list(times)
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False) if b >= a]
    return statistics.median(gaps) if gaps else None


def save_cost(window: tuple[float, float], step_times: Iterable[float], step_s: float, stall_s: float) -> float:
    """Training seconds a save took away: over the save's `window` (unix start, end) training would have
    made window/step_s steps; each one it did not make is lost time (never less than the stall itself)."""
    start, end = window
    done = sum(1 for t in step_times if start < t <= end)
    return max(stall_s, (end - start) - done * step_s)


def upload_s(costs: Costs, backlog: int = 0) -> float | None:
    """Seconds to upload the next checkpoint behind `backlog` queued bytes; None when size or speed are unknown."""
    if costs.size is None or not costs.upload_bps:
        return None
    return (backlog + costs.size) / costs.upload_bps


def final_checkpoint_s(costs: Costs, backlog: int = 0) -> float:
    """Seconds from asking for the final checkpoint until it is committed: the rest of one step, the save,
    the upload (after what is queued), with SAFETY and RESERVE_S. Unmeasured parts count as 0."""
    work = (costs.step_s or 0.0) + (costs.save_s or 0.0) + (upload_s(costs, backlog) or 0.0)
    return SAFETY * work + RESERVE_S


def time_limit_margin(costs: Costs, floor_s: float, backlog: int = 0) -> float:
    """How long before the session limit to pause: stop_margin_s, or more when the final checkpoint needs it."""
    return max(floor_s, final_checkpoint_s(costs, backlog))


def pause_budget(left_s: float | None, costs: Costs, backlog: int, default_s: float) -> float:
    """How long a pause may wait for the trainer's final checkpoint: with `left_s` seconds until the machine
    goes, what remains after the upload (with SAFETY) and END_RESERVE_S; without a deadline, `default_s`."""
    if left_s is None:
        return default_s
    return max(0.0, left_s - SAFETY * (upload_s(costs, backlog) or 0.0) - END_RESERVE_S)


def drain_budget(left_s: float | None, configured_s: float) -> float:
    """How long the final drain may wait: `drain_timeout_s`, and never past the deadline's reserve."""
    if left_s is None:
        return configured_s
    return max(0.0, min(configured_s, left_s - END_RESERVE_S))


def auto_interval(costs: Costs, share: float) -> tuple[float, str]:
    """CheckFreq's rule: checkpoint as often as keeps what a checkpoint costs training (`cost_s`: the stall
    and the slowdown while it is written; else the stall, else the whole save) at `share` of training
    time, but never more often than one checkpoint can be written and uploaded (so saves never queue up).
    Returns (seconds, why) with the measured figures in `why`."""
    cost, name = next(((v, n) for v, n in ((costs.cost_s, "cost"), (costs.stall_s, "stall"), (costs.save_s, "save"))
                       if v is not None), (None, ""))  # fmt: skip
    if cost is None:
        return PROBE_S, f"{PROBE_WHY}: a first checkpoint after {PROBE_S:g}s measures the costs"
    by_share = cost / share
    background = max(0.0, (costs.save_s or 0.0) - (costs.stall_s or 0.0)) + (upload_s(costs) or 0.0)
    interval = max(by_share, background, MIN_INTERVAL_S)
    why = (f"{name} {cost:.3g}s / {share:.1%} = {by_share:.0f}s; write+upload {background:.3g}s; "
           f"minimum {MIN_INTERVAL_S:g}s")  # fmt: skip
    return interval, why


def shortfalls(costs: Costs, windows: dict[str, float]) -> list[str]:
    """One line per notice window (name -> seconds) too short to commit a final checkpoint at these costs."""
    need = final_checkpoint_s(costs)
    if costs.save_s is None and upload_s(costs) is None:
        return []
    out = []
    for name, seconds in windows.items():
        if need > seconds:
            parts = [f"a step {costs.step_s:.3g}s" if costs.step_s else "",
                     f"a save {costs.save_s:.3g}s" if costs.save_s else "",
                     f"an upload of {costs.size / 1e6:.0f} MB at {costs.upload_bps / 1e6:.3g} MB/s"
                     if upload_s(costs) is not None else ""]  # fmt: skip
            costs_text = " + ".join(p for p in parts if p)
            out.append(f"{name} ({seconds:g}s) cannot cover {costs_text} (x{SAFETY} + {RESERVE_S:g}s = {need:.0f}s): "
                       "the final checkpoint would not reach the store; checkpoint more often (every_s) or "
                       "make checkpoints smaller")  # fmt: skip
    return out
