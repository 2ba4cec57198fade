"""Learning-rate schedule: linear warm-up, then any number of cosine half-periods.

A pure function of the (fractional) epoch, so resuming needs no scheduler state: the LR of a step
depends only on where that step lies in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up from 0 to `warmup_max` over `warmup_epochs`, then cosine segments back to back.

    Segment k starts at `segments[k][0]` and falls along half a cosine to 0 over `segments[k][1]`
    epochs (the log's lr_cosine_max_k / lr_T_half_k). After the last segment the LR stays at 0; with
    no segment at all it stays at `warmup_max`.
    """

    warmup_max: float
    warmup_epochs: float
    segments: tuple[tuple[float, float], ...] = ()

    @classmethod
    def from_params(cls, params: object) -> LRSchedule:
        segs = tuple((s.lr_max, s.t_half) for s in params.cosine_segments)  # type: ignore[attr-defined]
        return cls(params.lr_linear_max, params.lr_warmup_epoch, segs)  # type: ignore[attr-defined]

    @property
    def length(self) -> float:
        """Epochs covered by warm-up and all segments (the log's num_epoch minus the tail)."""
        return self.warmup_epochs + sum(t for _, t in self.segments)

    def lr_at(self, t: float) -> float:
        """The learning rate at fractional epoch `t` (t = epoch + fraction of the epoch done)."""
        if t < self.warmup_epochs:
            return self.warmup_max * max(t, 0.0) / self.warmup_epochs
        if not self.segments:
            return self.warmup_max
        start = self.warmup_epochs
        for lr_max, t_half in self.segments:
            if t < start + t_half:
                return lr_max * 0.5 * (1.0 + math.cos(math.pi * (t - start) / t_half))
            start += t_half
        return 0.0

    def curve(self, epochs: Sequence[float]) -> list[float]:
        return [self.lr_at(t) for t in epochs]

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint records about the schedule (primitives only; it is recomputed on load)."""
        return {
            "kind": "warmup_cosine",
            "warmup_max": self.warmup_max,
            "warmup_epochs": self.warmup_epochs,
            "segments": [list(s) for s in self.segments],
        }


def step_position(epoch: int, step: int, steps_per_epoch: int) -> float:
    """Fractional epoch at the end of optimizer step `step` (0-based) of `epoch`."""
    return epoch + (step + 1) / max(1, steps_per_epoch)


def prior_active(epoch: int, epoch_prior: int) -> bool:
    """The anchor-prior loss applies in epochs 0 .. epoch_prior-1 and vanishes afterwards."""
    return epoch < epoch_prior
