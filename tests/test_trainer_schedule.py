"""The learning-rate schedule of the log's runs, computed as a pure function of the epoch."""

from __future__ import annotations

import pytest

from trainer.params import load_params
from trainer.schedule import LRSchedule, prior_active, step_position

TRIPLE = {  # resnet18-voc-triple-cosine-sgd
    "lr_linear_max": 0.5, "lr_warmup_epoch": 30,
    "lr_cosine_max_1": 0.5, "lr_T_half_1": 130,
    "lr_cosine_max_2": 0.5, "lr_T_half_2": 50,
    "lr_cosine_max_3": 0.25, "lr_T_half_3": 60,
}  # fmt: skip


def test_triple_cosine_curve():
    s = LRSchedule.from_params(load_params(TRIPLE))
    assert s.length == 270
    expected = {
        0: 0.0, 15: 0.25, 30: 0.5,  # linear warm-up
        95: 0.25, 159.999: 0.0,  # first cosine: half at its middle, ~0 at its end
        160: 0.5, 185: 0.25,  # second cosine restarts at 0.5
        210: 0.25, 240: 0.125,  # third starts at 0.25
        270: 0.0, 300: 0.0,  # after the last segment
    }  # fmt: skip
    for t, lr in expected.items():
        assert s.lr_at(t) == pytest.approx(lr, abs=1e-6), t


def test_double_cosine_and_baseline_alias():
    double_params = {k: v for k, v in TRIPLE.items() if not k.endswith("_3")}
    double = LRSchedule.from_params(load_params(double_params))
    assert double.length == 210
    assert double.lr_at(160) == pytest.approx(0.5) and double.lr_at(210) == 0.0
    baseline = LRSchedule.from_params(load_params({"lr_linear_max": 0.5, "lr_warmup_epoch": 30, "lr_T_half": 130}))
    assert baseline.segments == ((0.5, 130.0),)  # lr_cosine_max_1 defaults to lr_linear_max
    assert baseline.lr_at(30 + 65) == pytest.approx(0.25)
    assert baseline.length == 160


def test_no_segment_keeps_the_warm_up_peak():
    s = LRSchedule(0.1, 5)
    assert s.curve([0, 2.5, 5, 50]) == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_no_warm_up():
    s = LRSchedule(0.1, 0, ((0.2, 10),))
    assert s.lr_at(0) == pytest.approx(0.2)
    assert s.lr_at(5) == pytest.approx(0.1)


def test_step_position_and_prior_window():
    assert step_position(2, 0, 10) == pytest.approx(2.1)
    assert step_position(2, 9, 10) == pytest.approx(3.0)
    assert prior_active(59, 60) and not prior_active(60, 60)


def test_state_dict_is_primitive():
    sd = LRSchedule.from_params(load_params(TRIPLE)).state_dict()
    assert sd["segments"] == [[0.5, 130.0], [0.5, 50.0], [0.25, 60.0]]
