"""The YOLO loss with every knob of the experiment log.

Per output level l (stride 32, 16, 8 -> weight lambda_scale_1, _2, _4), summed over slots and divided
by the number of images:

  lambda_coord  * sum_pos  w_c * [(sig(tx)-x)^2 + (sig(ty)-y)^2 + (tw-log(w/a_w))^2 + (th-log(h/a_h))^2]
  lambda_obj    * sum_pos  BCE(obj, 1)
  lambda_noobj  * sum_neg  BCE(obj, 0)
  lambda_class  * sum_pos  sum_c BCE(cls_c, onehot_c)
  lambda_prior  * sum_nonpos [(sig(tx)-.5)^2 + (sig(ty)-.5)^2 + tw^2 + th^2]   (epoch < epoch_prior)

w_c = 2 - w*h (box size as input fractions) when scale_coord, else 1: small boxes weigh more.
"neg" are the slots without an object; with no_obj_v3 (YOLOv3) those whose decoded box overlaps a
ground truth by more than IoU_thres are ignored instead of pushed to 0 (YOLOv1/v2 push them all).
The prior term (darknet's region layer) pulls every non-responsible prediction toward its anchor
while epoch < epoch_prior and vanishes afterwards. eps floors w/anchor inside the log.
The knobs are declared once, with their defaults, in trainer.params.LossWeights; a run's `Params` is one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.params import LossWeights
from trainer.targets import build_targets, decode_level, gt_by_image, max_iou_with_gt

COMPONENTS = ("coord", "obj", "noobj", "class", "prior")


def yolo_loss(
    outputs: list[torch.Tensor],
    gt: torch.Tensor,
    anchors: torch.Tensor,
    weights: LossWeights,
    epoch: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (a scalar tensor) and its weighted components summed over levels (floats).

    `outputs` are the detector's three raw levels, `gt` the batch's (N, 6) ground-truth rows in
    input fractions, `anchors` (3, 3, 2); `weights` may be the run's `Params`. Computed in float32
    whatever the autocast dtype.
    """
    outputs = [o.float() for o in outputs]
    batch = outputs[0].shape[0]
    gt = gt.to(outputs[0].device, torch.float32)
    grids = [(o.shape[2], o.shape[3]) for o in outputs]
    targets = build_targets(gt, anchors, grids, weights.eps)
    use_prior = epoch < weights.epoch_prior and weights.lambda_prior != 0
    gt_xyxy = gt_by_image(gt, batch) if weights.no_obj_v3 else None
    total = outputs[0].new_zeros(())
    parts = torch.zeros(len(COMPONENTS), device=outputs[0].device)
    for lvl, (raw, t) in enumerate(zip(outputs, targets, strict=True)):
        pos_mask = torch.zeros(raw.shape[:4], dtype=torch.bool, device=raw.device)
        pos_mask[t.b, t.a, t.gj, t.gi] = True
        p = raw[t.b, t.a, t.gj, t.gi]  # (P, 5 + C)
        zero = raw.new_zeros(())
        if t.count:
            wc = (2.0 - t.wh.prod(1)) if weights.scale_coord else torch.ones_like(t.wh[:, 0])
            err = (p[:, 0:2].sigmoid() - t.txy).pow(2).sum(1) + (p[:, 2:4] - t.twh).pow(2).sum(1)
            coord = (wc * err).sum()
            obj = F.binary_cross_entropy_with_logits(p[:, 4], torch.ones_like(p[:, 4]), reduction="sum")
            onehot = F.one_hot(t.cls, raw.shape[-1] - 5).to(p.dtype)
            cls = F.binary_cross_entropy_with_logits(p[:, 5:], onehot, reduction="sum")
        else:
            coord = obj = cls = zero
        neg_mask = ~pos_mask
        if weights.no_obj_v3:
            with torch.no_grad():
                best = max_iou_with_gt(decode_level(raw[..., :4].detach(), anchors[lvl]), gt_xyxy)
            neg_mask &= best <= weights.IoU_thres
        logit = raw[..., 4]
        noobj = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit), reduction="none")
        noobj = (noobj * neg_mask).sum()
        if use_prior:
            d = (raw[..., 0:2].sigmoid() - 0.5).pow(2).sum(-1) + raw[..., 2:4].pow(2).sum(-1)
            prior = (d * ~pos_mask).sum()
        else:
            prior = zero
        terms = {
            "coord": weights.lambda_coord * coord,
            "obj": weights.lambda_obj * obj,
            "noobj": weights.lambda_noobj * noobj,
            "class": weights.lambda_class * cls,
            "prior": weights.lambda_prior * prior if use_prior else zero,
        }
        scale = weights.lambda_scale[lvl] / batch
        for i, k in enumerate(COMPONENTS):
            total = total + scale * terms[k]
            parts[i] += scale * terms[k].detach()
    return total, dict(zip(COMPONENTS, parts.tolist(), strict=True))
