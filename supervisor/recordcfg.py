"""The run.toml tables of the experiment record: `[record]` (purpose, notes, baselines, trackers), `[init]`
(start from another run's checkpoint) and `[[early_stop]]` (rules that end a run early, status "early stopped")."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RUN_NAME = r"^[A-Za-z0-9._-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordConfig(_Strict):
    """What the record says beyond what the ledger knows (docs/record.md)."""

    purpose: str = ""  # why this run exists and how: the log's "purpose and method"
    notes: list[str] = Field(default_factory=list)  # more at any time: supervisor note RUN "text"
    # Runs (same store, or the same runs folder) whose best metrics the record compares against, in points.
    baselines: list[Annotated[str, Field(pattern=RUN_NAME)]] = Field(default_factory=list)
    # The run whose parameters the record diffs against: [init]'s parent by default, else the first baseline.
    compare_to: Annotated[str, Field(pattern=RUN_NAME)] | None = None
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    mlflow_uri: str | None = None  # default: a store inside the run dir

    @field_validator("trackers")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a tracker is named twice")
        return v


class InitConfig(_Strict):
    """Start this run from a verified checkpoint of another run of the same store (or runs folder)."""

    from_run: Annotated[str, Field(pattern=RUN_NAME)]
    epoch: Annotated[int, Field(ge=0)] | None = None  # the parent's checkpoint; `step` in a run of steps
    step: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one(self) -> InitConfig:
        if (self.epoch is None) == (self.step is None):
            raise ValueError("give the parent's checkpoint as `epoch = E` (or `step = S` in a run of steps)")
        return self

    @property
    def position(self) -> int:
        return self.epoch if self.epoch is not None else self.step  # type: ignore[return-value]


class EarlyStopRule(_Strict):
    """One rule: a threshold at a position ("VOCmAP below 0.05 at epoch 25") or a patience ("no improvement
    of AP50 in 10 evaluations")."""

    metric: Annotated[str, Field(min_length=1)]
    below: float | None = None
    above: float | None = None
    at: Annotated[int, Field(ge=0)] | None = None  # the epoch (or step) the threshold is judged at (or after)
    patience: Annotated[int, Field(ge=1)] | None = None  # evaluations without an improvement of min_delta
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    mode: Literal["max", "min"] | None = None  # what improves: "min" for names with "loss", else "max"

    @model_validator(mode="after")
    def _kind(self) -> EarlyStopRule:
        threshold = self.below is not None or self.above is not None
        if threshold == (self.patience is not None):
            raise ValueError("a rule is a threshold (below = X or above = X, with at = E) or a "
                             "patience (patience = N evaluations), not both and not neither")  # fmt: skip
        if threshold and self.at is None:
            raise ValueError("a threshold needs `at = E`, the epoch (or step) it is judged at")
        if self.below is not None and self.above is not None:
            raise ValueError("give below or above, not both")
        return self

    @property
    def improves(self) -> str:
        return self.mode or ("min" if re.search("loss", self.metric, re.I) else "max")

    def describe(self, noun: str = "epoch") -> str:
        """The rule in words, as the record and the log say it."""
        if self.patience is not None:
            delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
            return f"no improvement of {self.metric}{delta} in {self.patience} evaluations"
        side, value = ("below", self.below) if self.below is not None else ("above", self.above)
        return f"{self.metric} {side} {value:g} at {noun} {self.at}"
