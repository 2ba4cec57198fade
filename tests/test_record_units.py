"""The record's pure parts: early-stop rules, parameter changes, deltas in points, the index table, and the
config of [record], [init] and [[early_stop]]."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import record
from supervisor.config import ConfigError, parse_config
from supervisor.policy import early_stop
from supervisor.recordcfg import EarlyStopRule


def rules(*raw: dict) -> list[EarlyStopRule]:
    return [EarlyStopRule(**r) for r in raw]


def test_a_threshold_is_judged_on_the_first_evaluation_at_or_after_its_epoch():
    r = rules({"metric": "VOCmAP", "below": 0.05, "at": 25})
    assert early_stop({24: {"VOCmAP": 0.01}}, r) is None  # before epoch 25: not judged yet
    assert early_stop({24: {"VOCmAP": 0.01}, 26: {"VOCmAP": 0.06}}, r) is None
    fired = early_stop({24: {"VOCmAP": 0.01}, 26: {"VOCmAP": 0.04}}, r)
    assert fired is not None and fired[1] == {"rule": "VOCmAP below 0.05 at epoch 25", "metric": "VOCmAP",
                                              "value": 0.04, "epoch": 26}  # fmt: skip
    above = rules({"metric": "val_loss", "above": 3.0, "at": 2})
    assert early_stop({2: {"val_loss": 3.5}}, above, "step")[1]["rule"] == "val_loss above 3 at step 2"


def test_patience_counts_evaluations_since_the_best_by_the_metrics_direction():
    r = rules({"metric": "AP50", "patience": 2, "min_delta": 0.01})
    plateau = {e: {"AP50": v} for e, v in enumerate([0.5, 0.505, 0.508, 0.509])}  # within min_delta of 0.5
    fired = early_stop(plateau, r)
    assert fired is not None and fired[1]["epoch"] == 2
    assert early_stop({e: {"AP50": 0.5 + e / 10} for e in range(6)}, r) is None
    loss = rules({"metric": "val_loss", "patience": 2})  # "loss": lower is better
    assert early_stop({0: {"val_loss": 3.0}, 1: {"val_loss": 2.0}, 2: {"val_loss": 1.0}}, loss) is None
    assert early_stop({0: {"val_loss": 1.0}, 1: {"val_loss": 2.0}, 2: {"val_loss": 1.5}}, loss)[1]["epoch"] == 2
    assert early_stop({0: {"AP50": None}, 1: {"other": 1.0}}, r) is None  # no values: nothing fires


def test_parameter_changes_and_deltas_in_points():
    changes = record.param_changes({"lr": 0.05, "opt": {"m": 0.9}, "new": 1}, {"lr": 0.1, "opt": {"m": 0.9}, "old": 2})
    assert changes == {"lr": {"from": 0.1, "to": 0.05}, "new": {"from": None, "to": 1}, "old": {"from": 2, "to": None}}
    assert record.delta("AP50", 0.5243, 0.5225) == {"delta": pytest.approx(0.18), "unit": "points"}
    assert record.delta("val_loss", 0.9, 1.0)["unit"] == "value"
    line = "\n".join(record.result_lines({"unit": "epochs", "best": {"AP50": {"value": 0.5243, "epoch": 200,
                                          "mode": "max"}}, "baselines": [{"run": "seed-sgd", "deltas": {
                                          "AP50": {"delta": 0.18, "unit": "points"}}}]}))  # fmt: skip
    assert "* max AP50: 52.43% @ epoch 200, + 0.18% [seed-sgd]" in line  # the log's own line


def cfg(**raw):
    return parse_config({"name": "x", "epochs": 10, "trainer": {"command": "t"}, **raw}, Path("/b"), Path("r.toml"))


def refusal(**raw) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(**raw)
    return str(info.value)


def test_record_init_and_early_stop_are_checked():
    assert cfg(record={"baselines": ["a"], "trackers": ["tensorboard"]}).record.baselines == ["a"]
    assert "not both and not neither" in refusal(early_stop=[{"metric": "AP50"}])
    assert "needs `at = E`" in refusal(early_stop=[{"metric": "AP50", "below": 0.1}])
    assert "past the run's last epoch (9)" in refusal(early_stop=[{"metric": "AP50", "below": 0.1, "at": 10}])
    assert "names this run itself" in refusal(init={"from_run": "x", "epoch": 1})
    assert "`epoch = ...`" in refusal(init={"from_run": "y", "step": 5})
    assert "record.trackers" in refusal(record={"trackers": ["comet"]})
    assert "record.baselines" in refusal(record={"baselines": ["a/b"]})
