"""Every loss knob of the log does what docs/trainer.md says, and target assignment is YOLOv3's."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.loss import LossWeights, yolo_loss
from trainer.model import Detector, level_anchors
from trainer.params import load_params
from trainer.targets import build_targets

ANCHORS = level_anchors()
GRIDS = [(2, 2), (4, 4), (8, 8)]
C = 3


def outputs(seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, h, w, 5 + C, generator=g) for h, w in GRIDS]


# One large box (stride-32 level), one medium, one small, in two images.
GT = torch.tensor(
    [
        [0, 0, 0.5, 0.5, 0.6, 0.5],
        [0, 1, 0.2, 0.3, 0.15, 0.15],
        [1, 2, 0.7, 0.6, 0.03, 0.04],
    ]
)


def parts(**kw) -> dict[str, float]:
    return yolo_loss(outputs(), GT, ANCHORS, LossWeights(**kw), epoch=0)[1]


def total(epoch: int = 0, **kw) -> float:
    return float(yolo_loss(outputs(), GT, ANCHORS, LossWeights(**kw), epoch=epoch)[0])


def levels(s1: float, s2: float, s4: float) -> dict[str, float]:
    """lambda_scale_1, _2, _4 as keyword arguments."""
    return {"lambda_scale_1": s1, "lambda_scale_2": s2, "lambda_scale_4": s4}


@pytest.mark.parametrize(
    ("knob", "component"),
    [("lambda_coord", "coord"), ("lambda_obj", "obj"), ("lambda_noobj", "noobj"), ("lambda_class", "class"),
     ("lambda_prior", "prior")],
)  # fmt: skip
def test_each_lambda_scales_its_own_term_only(knob, component):
    base = parts(**{knob: 1.0})
    doubled = parts(**{knob: 2.0})
    for name in base:
        expected = 2 * base[name] if name == component else base[name]
        assert doubled[name] == pytest.approx(expected, rel=1e-5)
    assert base[component] > 0


def test_lambda_scale_weights_the_stride_32_16_8_levels():
    full = total(**levels(1.0, 1.0, 1.0))
    per_level = [total(**levels(*s)) for s in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))]
    assert sum(per_level) == pytest.approx(full, rel=1e-5)
    assert total(**levels(2.0, 0.0, 0.0)) == pytest.approx(2 * per_level[0], rel=1e-5)
    assert total(**levels(0.4, 1.0, 4.0)) == pytest.approx(
        0.4 * per_level[0] + per_level[1] + 4 * per_level[2], rel=1e-5
    )


def test_prior_loss_vanishes_from_epoch_prior_on():
    w = LossWeights(epoch_prior=3, lambda_prior=0.5)
    before = yolo_loss(outputs(), GT, ANCHORS, w, epoch=2)
    after = yolo_loss(outputs(), GT, ANCHORS, w, epoch=3)
    assert before[1]["prior"] > 0
    assert after[1]["prior"] == 0.0
    assert float(before[0]) - float(after[0]) == pytest.approx(before[1]["prior"], rel=1e-5)


def test_prior_pulls_toward_the_anchor():
    outs = [torch.zeros(1, 3, h, w, 5 + C) for h, w in GRIDS]  # exactly the anchor priors
    p = yolo_loss(outs, GT[:2], ANCHORS, LossWeights(), epoch=0)[1]
    assert p["prior"] == pytest.approx(0.0, abs=1e-7)


def test_scale_coord_weights_coordinates_by_two_minus_wh():
    gt = torch.tensor([[0, 0, 0.5, 0.5, 0.6, 0.5]])  # w*h = 0.3
    on = yolo_loss(outputs(batch=1), gt, ANCHORS, LossWeights(scale_coord=True), 0)[1]["coord"]
    off = yolo_loss(outputs(batch=1), gt, ANCHORS, LossWeights(scale_coord=False), 0)[1]["coord"]
    assert on / off == pytest.approx(2 - 0.3, rel=1e-5)


def _overlapping_prediction() -> list[torch.Tensor]:
    """Logits where a non-responsible anchor predicts (confidently) a box on top of the object."""
    outs = [torch.zeros(1, 3, h, w, 5 + C) for h, w in GRIDS]
    outs[0][0, 1, 1, 1, 2:4] = torch.log(ANCHORS[0, 0] / ANCHORS[0, 1])  # anchor 1 shaped like anchor 0
    outs[0][0, 1, 1, 1, 4] = 6.0
    return outs


def test_no_obj_v3_ignores_good_non_responsible_predictions():
    anchor0 = ANCHORS[0, 0].tolist()
    gt = torch.tensor([[0, 0, 0.75, 0.75, anchor0[0], anchor0[1]]])  # centred in cell (1, 1)
    outs = _overlapping_prediction()
    v1 = yolo_loss(outs, gt, ANCHORS, LossWeights(no_obj_v3=False), 0)[1]["noobj"]
    v3 = yolo_loss(outs, gt, ANCHORS, LossWeights(no_obj_v3=True, IoU_thres=0.5), 0)[1]["noobj"]
    strict = yolo_loss(outs, gt, ANCHORS, LossWeights(no_obj_v3=True, IoU_thres=1.0), 0)[1]["noobj"]
    bce = math.log1p(math.exp(6.0))  # the confident prediction's BCE toward 0
    assert v1 - v3 == pytest.approx(bce, rel=1e-4)
    assert strict == pytest.approx(v1, rel=1e-6)  # IoU_thres = 1 ignores nothing


def test_eps_keeps_degenerate_boxes_finite():
    gt = torch.tensor([[0, 0, 0.5, 0.5, 0.0, 0.2]])
    loss_small, p_small = yolo_loss(outputs(batch=1), gt, ANCHORS, LossWeights(eps=1e-6), 0)
    loss_big, p_big = yolo_loss(outputs(batch=1), gt, ANCHORS, LossWeights(eps=1e-2), 0)
    assert math.isfinite(float(loss_small)) and math.isfinite(float(loss_big))
    assert p_small["coord"] > p_big["coord"]  # log(eps / anchor) is further from 0


def test_bubbliiiing_weights_give_a_finite_loss():
    w = LossWeights(**levels(0.4, 1.0, 4.0), lambda_coord=0.05, lambda_obj=5.0, lambda_class=20 / 80,
                    lambda_prior=0.001, IoU_thres=0.5)  # fmt: skip
    loss, p = yolo_loss(outputs(), GT, ANCHORS, w, 0)
    assert math.isfinite(float(loss)) and all(math.isfinite(v) for v in p.values())


# Computed by the loss before its knobs moved from a dataclass copied field by field out of Params into
# LossWeights, the base of Params: (total, components) at epoch 0 for outputs() and GT.
PINNED_DEFAULTS = (455.1240234375, {"coord": 143.51498413085938, "obj": 14.067789077758789,
                   "noobj": 204.26393127441406, "class": 42.76202392578125, "prior": 50.515281677246094})  # fmt: skip
PINNED_BUBBLIIIING = (679.4226684570312, {"coord": 0.5190505981445312, "obj": 7.813270568847656,
                      "noobj": 668.3845825195312, "class": 1.0786170959472656, "prior": 1.627169132232666})  # fmt: skip
BUBBLIIIING_TABLE = {**levels(0.4, 1.0, 4.0), "lambda_coord": 0.05, "lambda_obj": 5.0, "lambda_class": "1 * 20 / 80",
                     "lambda_prior": 0.001, "IoU_thres": 0.5}  # fmt: skip


@pytest.mark.parametrize(
    ("weights", "pinned"),
    [(LossWeights(), PINNED_DEFAULTS), (load_params({}), PINNED_DEFAULTS),
     (load_params(BUBBLIIIING_TABLE), PINNED_BUBBLIIIING)],
    ids=["defaults", "params-defaults", "params-bubbliiiing"],
)  # fmt: skip
def test_loss_values_match_those_pinned_before_the_knobs_moved(weights, pinned):
    loss, p = yolo_loss(outputs(), GT, ANCHORS, weights, epoch=0)
    assert float(loss) == pytest.approx(pinned[0], rel=1e-6)
    assert p == pytest.approx(pinned[1], rel=1e-6)


def test_targets_pick_the_best_anchor_level_and_cell():
    t = build_targets(GT, ANCHORS, GRIDS, 1e-6)
    assert [lt.count for lt in t] == [1, 1, 1]
    big, med, small = t
    assert (big.b.item(), big.gj.item(), big.gi.item()) == (0, 1, 1)
    assert (med.gj.item(), med.gi.item()) == (1, 0)  # 0.3 * 4 = 1.2, 0.2 * 4 = 0.8
    assert (small.b.item(), small.gj.item(), small.gi.item()) == (1, 4, 5)
    assert torch.allclose(med.txy, torch.tensor([[0.8, 0.2]]), atol=1e-5)


def test_targets_later_box_wins_a_shared_slot():
    gt = torch.tensor([[0, 0, 0.5, 0.5, 0.6, 0.5], [0, 2, 0.55, 0.55, 0.6, 0.5]])
    t = build_targets(gt, ANCHORS, GRIDS, 1e-6)[0]
    assert t.count == 1 and t.cls.item() == 2


def test_empty_batch_has_only_negatives():
    loss, p = yolo_loss(outputs(), torch.zeros(0, 6), ANCHORS, LossWeights(), 0)
    assert p["coord"] == p["obj"] == p["class"] == 0.0
    assert p["noobj"] > 0 and math.isfinite(float(loss))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = Detector(C, neck_channels=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    x = torch.rand(2, 3, 64, 64)
    losses = []
    for _ in range(8):
        loss, _ = yolo_loss(model(x), GT, ANCHORS, LossWeights(), 0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0]
