"""VOC evaluation against hand-computed cases (all-point AP50 and 11-point VOCmAP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluate import ap_11_point, ap_all_point, evaluate_detections, postprocess
from trainer.model import level_anchors

BOX = [0, 0, 9, 9]  # 10 x 10 pixels (VOC pixel-inclusive)
FAR = [50, 50, 59, 59]


def gt(image_id, box, label=0, difficult=False):
    return {"image_id": image_id, "label": label, "box": box, "difficult": difficult}


def det(image_id, box, score, label=0):
    return {"image_id": image_id, "label": label, "box": box, "score": score}


def test_duplicate_is_false_positive_and_11_point_differs_from_all_point():
    # Order: TP (.9), duplicate FP (.8), TP (.7): recall .5 .5 1, precision 1 .5 2/3.
    anns = [gt(1, BOX), gt(2, BOX)]
    dets = [det(1, BOX, 0.9), det(1, BOX, 0.8), det(2, BOX, 0.7)]
    r = evaluate_detections(dets, anns)
    assert r["AP50"] == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))  # 0.8333
    assert r["VOCmAP"] == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11)  # 0.8485
    assert r["per_class"][0]["npos"] == 2


def test_recall_below_one():
    r = evaluate_detections([det(1, BOX, 0.9)], [gt(1, BOX), gt(2, BOX)])
    assert r["AP50"] == pytest.approx(0.5)
    assert r["VOCmAP"] == pytest.approx(6 / 11)


def test_difficult_objects_are_ignored():
    anns = [gt(1, BOX), gt(1, FAR, difficult=True)]
    dets = [det(1, FAR, 0.9), det(1, [100, 100, 109, 109], 0.8), det(1, BOX, 0.7)]
    # The detection of the difficult object is neither TP nor FP: FP then TP, npos = 1.
    r = evaluate_detections(dets, anns)
    assert r["AP50"] == pytest.approx(0.5)
    assert r["VOCmAP"] == pytest.approx(0.5)
    # Were it not difficult: TP, FP, TP with npos 2.
    r2 = evaluate_detections(dets, [gt(1, BOX), gt(1, FAR)])
    assert r2["AP50"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_ties_keep_input_order_like_the_devkit():
    anns = [gt(1, BOX)]
    miss = det(1, FAR, 0.8)
    hit = det(1, BOX, 0.8)
    assert evaluate_detections([miss, hit], anns)["AP50"] == pytest.approx(0.5)
    assert evaluate_detections([hit, miss], anns)["AP50"] == pytest.approx(1.0)


def test_class_without_detections_counts_zero_and_classes_without_objects_are_left_out():
    anns = [gt(1, BOX, label=0), gt(2, BOX, label=1), gt(3, BOX, label=2, difficult=True)]
    dets = [det(1, BOX, 0.9, label=0), det(4, BOX, 0.9, label=3), det(3, BOX, 0.5, label=2)]
    r = evaluate_detections(dets, anns)
    assert set(r["per_class"]) == {0, 1}
    assert r["per_class"][0]["AP50"] == pytest.approx(1.0)
    assert r["per_class"][1]["AP50"] == 0.0
    assert r["AP50"] == pytest.approx(0.5)
    assert r["VOCmAP"] == pytest.approx(0.5)


def test_iou_threshold_is_inclusive_with_plus_one_pixels():
    anns = [gt(1, [0, 0, 19, 9])]  # 20 x 10: IoU with BOX is exactly 100 / 200
    assert evaluate_detections([det(1, BOX, 0.9)], anns)["AP50"] == 1.0
    assert evaluate_detections([det(1, BOX, 0.9)], anns, iou_thresh=0.51)["AP50"] == 0.0


def test_best_overlap_already_taken_makes_a_false_positive():
    # Two objects side by side; the second detection overlaps the taken one best.
    a, b = [0, 0, 9, 9], [6, 0, 15, 9]
    anns = [gt(1, a), gt(1, b)]
    dets = [det(1, a, 0.9), det(1, [1, 0, 10, 9], 0.8)]
    r = evaluate_detections(dets, anns)
    assert r["AP50"] == pytest.approx(0.5)


def test_detection_on_an_image_without_objects_of_its_class_is_false_positive():
    r = evaluate_detections([det(9, BOX, 0.9), det(1, BOX, 0.5)], [gt(1, BOX)])
    assert r["AP50"] == pytest.approx(0.5)


def test_nothing_to_evaluate_is_zero_not_nan():
    assert evaluate_detections([], [])["AP50"] == 0.0
    assert evaluate_detections([det(1, BOX, 0.9)], [gt(1, BOX, difficult=True)])["VOCmAP"] == 0.0


def test_ap_functions_on_empty_curves():
    empty = np.zeros(0)
    assert ap_all_point(empty, empty) == 0.0
    assert ap_11_point(empty, empty) == 0.0


def test_postprocess_thresholds_and_nms():
    anchors = level_anchors()
    outs = [torch.full((1, 3, g, g, 7), -10.0) for g in (2, 4, 8)]
    # Two strong, nearly identical boxes of class 1 at stride-32 level, one weak box elsewhere.
    outs[0][..., 0:4] = 0.0  # centred in their cells, anchor-sized
    outs[0][0, 0, 0, 0, 4] = 5.0
    outs[0][0, 0, 0, 0, 6] = 5.0
    outs[0][0, 1, 0, 0, 4] = 4.0
    outs[0][0, 1, 0, 0, 6] = 4.0
    outs[0][0, 1, 0, 0, 2:4] = torch.log(anchors[0, 0] / anchors[0, 1])  # same size as anchor 0
    outs[2][0, 0, 7, 7, 0:4] = 0.0
    outs[2][0, 0, 7, 7, 4] = -1.0
    outs[2][0, 0, 7, 7, 5] = -1.0
    res = postprocess(outs, anchors, (64, 64), conf_thres=0.01, conf_ratio_thres=0.0, nms_thres=0.5)[0]
    assert res["labels"].tolist() == [1, 0]  # duplicate suppressed, weak one kept
    res = postprocess(outs, anchors, (64, 64), conf_thres=0.01, conf_ratio_thres=0.5, nms_thres=0.5)[0]
    assert res["labels"].tolist() == [1]  # the weak one is below half the best score
    res = postprocess(outs, anchors, (64, 64), conf_thres=0.99, conf_ratio_thres=0.0)[0]
    assert res["boxes"].shape == (0, 4)
