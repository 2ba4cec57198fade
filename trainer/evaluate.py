"""Detection post-processing and PASCAL VOC evaluation.

`evaluate_detections` follows the VOC devkit (VOCevaldet.m): detections of a class are taken in
descending score (ties keep their input order, as the devkit's stable sort does); each is matched
to the ground truth of its image and class with the highest IoU (pixel-inclusive, +1 widths); it is
a true positive when that IoU >= iou_thresh and the ground truth is not yet taken, ignored (neither
TP nor FP) when that ground truth is difficult, and a false positive otherwise (duplicates
included). Difficult objects do not count in the number of positives.
`AP50` is the all-point AP of the VOC2010+ devkit, `VOCmAP` the VOC2007 11-point AP, both
averaged over the classes that have at least one non-difficult object; fractions in [0, 1].
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms, box_convert

from trainer.targets import decode_level


def ap_all_point(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC2010+ AP: area under the precision envelope, summed where recall changes."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def ap_11_point(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC2007 AP: mean of the best precision at recall >= t for t = 0, 0.1, ..., 1."""
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
        p = prec[rec >= t - 1e-12]
        ap += (float(p.max()) if p.size else 0.0) / 11.0
    return ap


def _iou_plus_one(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    ix1 = np.maximum(gts[:, 0], box[0])
    iy1 = np.maximum(gts[:, 1], box[1])
    ix2 = np.minimum(gts[:, 2], box[2])
    iy2 = np.minimum(gts[:, 3], box[3])
    iw = np.maximum(ix2 - ix1 + 1.0, 0.0)
    ih = np.maximum(iy2 - iy1 + 1.0, 0.0)
    inter = iw * ih
    area_d = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    area_g = (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
    return inter / (area_d + area_g - inter)


def evaluate_detections(
    detections: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    iou_thresh: float = 0.5,
) -> dict[str, Any]:
    """VOC AP of `detections` ({image_id, label, score, box}) against `annotations`
    ({image_id, label, box, difficult}); boxes are [x1, y1, x2, y2] in pixels.

    Returns {"AP50", "VOCmAP", "per_class": {label: {"AP50", "VOCmAP", "npos", "ndet"}}}; classes
    whose objects are all difficult (or absent) are left out of the means; no class at all gives 0.
    """
    gt: dict[tuple[Hashable, Hashable], dict[str, Any]] = {}
    npos: dict[Hashable, int] = defaultdict(int)
    grouped: dict[tuple[Hashable, Hashable], list[tuple[list[float], bool]]] = defaultdict(list)
    for a in annotations:
        diff = bool(a.get("difficult", False))
        grouped[(a["image_id"], a["label"])].append((list(a["box"]), diff))
        if not diff:
            npos[a["label"]] += 1
        else:
            npos.setdefault(a["label"], 0)
    for key, items in grouped.items():
        gt[key] = {
            "boxes": np.asarray([b for b, _ in items], dtype=np.float64).reshape(-1, 4),
            "difficult": np.asarray([d for _, d in items], dtype=bool),
            "taken": np.zeros(len(items), dtype=bool),
        }
    by_class: dict[Hashable, list[dict[str, Any]]] = defaultdict(list)
    for d in detections:
        by_class[d["label"]].append(d)

    per_class: dict[Hashable, dict[str, float]] = {}
    for label, n in npos.items():
        if n == 0:
            continue
        dets = by_class.get(label, [])
        scores = np.asarray([float(d["score"]) for d in dets], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        for rank, i in enumerate(order):
            d = dets[i]
            g = gt.get((d["image_id"], label))
            if g is None or not len(g["boxes"]):
                fp[rank] = 1
                continue
            ious = _iou_plus_one(np.asarray(d["box"], dtype=np.float64), g["boxes"])
            j = int(np.argmax(ious))
            if ious[j] >= iou_thresh:
                if g["difficult"][j]:
                    continue
                if not g["taken"][j]:
                    tp[rank] = 1
                    g["taken"][j] = True
                else:
                    fp[rank] = 1
            else:
                fp[rank] = 1
        keep = (tp + fp) > 0  # ignored (difficult) detections drop out of the PR curve
        ctp, cfp = np.cumsum(tp[keep]), np.cumsum(fp[keep])
        rec = ctp / n
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        per_class[label] = {
            "AP50": ap_all_point(rec, prec),
            "VOCmAP": ap_11_point(rec, prec),
            "npos": n,
            "ndet": len(dets),
        }
    if not per_class:
        return {"AP50": 0.0, "VOCmAP": 0.0, "per_class": {}}
    return {
        "AP50": float(np.mean([v["AP50"] for v in per_class.values()])),
        "VOCmAP": float(np.mean([v["VOCmAP"] for v in per_class.values()])),
        "per_class": per_class,
    }


@torch.no_grad()
def postprocess(
    outputs: list[torch.Tensor],
    anchors: torch.Tensor,
    input_hw: tuple[int, int],
    conf_thres: float,
    conf_ratio_thres: float,
    nms_thres: float = 0.5,
    max_det: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per image: {"boxes" (K, 4) xyxy input pixels, "scores" (K,), "labels" (K,)}.

    score = sigmoid(objectness) * sigmoid(class logit) for every (slot, class) pair; a pair is kept
    when score >= conf_thres and score >= conf_ratio_thres * the best score of its image, then
    per-class NMS at nms_thres and the max_det best.
    """
    h_in, w_in = input_hw
    boxes, scores = [], []
    for lvl, raw in enumerate(outputs):
        raw = raw.float()
        b = raw.shape[0]
        boxes.append(decode_level(raw[..., :4], anchors[lvl]).reshape(b, -1, 4))
        scores.append((raw[..., 4:5].sigmoid() * raw[..., 5:].sigmoid()).reshape(b, -1, raw.shape[-1] - 5))
    all_boxes = torch.cat(boxes, 1)
    all_scores = torch.cat(scores, 1)
    scale = torch.tensor([w_in, h_in, w_in, h_in], dtype=all_boxes.dtype, device=all_boxes.device)
    results = []
    for i in range(all_boxes.shape[0]):
        s = all_scores[i]
        thr = max(conf_thres, conf_ratio_thres * float(s.max())) if s.numel() else conf_thres
        slot, label = torch.nonzero(s >= thr, as_tuple=True)
        sc = s[slot, label]
        if sc.numel() > 30 * max_det:  # cap NMS work on untrained models
            top = torch.topk(sc, 30 * max_det).indices
            slot, label, sc = slot[top], label[top], sc[top]
        bx = box_convert(all_boxes[i, slot], "cxcywh", "xyxy") * scale
        keep = batched_nms(bx, sc, label, nms_thres)[:max_det]
        results.append({"boxes": bx[keep], "scores": sc[keep], "labels": label[keep]})
    return results
