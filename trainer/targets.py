"""Assigning ground-truth boxes to output slots, and decoding raw outputs into boxes. Vectorised.

Conventions: boxes are (cx, cy, w, h) as fractions of the network input; a batch's ground truth is
one (N, 6) tensor of rows [image index, class, cx, cy, w, h]; levels are ordered stride 32, 16, 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_convert, box_iou


@dataclass(frozen=True)
class LevelTargets:
    """The positive slots of one output level and what each must predict."""

    b: torch.Tensor  # image index (P,)
    a: torch.Tensor  # anchor within the level (P,)
    gj: torch.Tensor  # grid row (P,)
    gi: torch.Tensor  # grid column (P,)
    txy: torch.Tensor  # offset of the centre inside its cell, in [0, 1) (P, 2)
    twh: torch.Tensor  # log(size / anchor) (P, 2)
    cls: torch.Tensor  # class index (P,)
    wh: torch.Tensor  # box size as fractions of the input (P, 2), for the 2 - w*h coordinate weight

    @property
    def count(self) -> int:
        return int(self.b.numel())


def _wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing a centre, from sizes only: (N, 2) x (M, 2) -> (N, M)."""
    inter = torch.min(wh1[:, None, :], wh2[None, :, :]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None, :] - inter)


def build_targets(
    gt: torch.Tensor, anchors: torch.Tensor, grids: list[tuple[int, int]], eps: float
) -> list[LevelTargets]:
    """Give each ground-truth box to the one anchor (of all 9) whose shape fits it best, at the cell
    holding its centre, as YOLOv3 does. When two boxes claim the same slot the later row wins.

    `anchors` is (levels, 3, 2) in input fractions; `grids` the (H, W) of each level.
    """
    levels, per_level = anchors.shape[:2]
    flat = anchors.reshape(-1, 2).to(gt.device)
    out: list[LevelTargets] = []
    if gt.numel():
        best = _wh_iou(gt[:, 4:6].clamp(min=eps), flat).argmax(1)
    else:
        best = torch.zeros(0, dtype=torch.long, device=gt.device)
    for lvl in range(levels):
        h, w = grids[lvl]
        sel = torch.nonzero(best // per_level == lvl).squeeze(1)
        g = gt[sel]
        a = best[sel] % per_level
        gx, gy = g[:, 2] * w, g[:, 3] * h
        gi = gx.long().clamp(0, w - 1)
        gj = gy.long().clamp(0, h - 1)
        b = g[:, 0].long()
        # Later rows overwrite earlier ones in the same slot (deterministically: keep the last).
        key = ((b * per_level + a) * h + gj) * w + gi
        if key.numel():
            uniq, inv = torch.unique(key, return_inverse=True)
            last = torch.full((uniq.numel(),), -1, dtype=torch.long, device=key.device)
            last = last.scatter_reduce(0, inv, torch.arange(key.numel(), device=key.device), "amax")
            keep = last
        else:
            keep = torch.zeros(0, dtype=torch.long, device=gt.device)
        anc = flat[lvl * per_level + a[keep]]
        out.append(
            LevelTargets(
                b=b[keep],
                a=a[keep],
                gj=gj[keep],
                gi=gi[keep],
                txy=torch.stack([gx[keep] - gi[keep], gy[keep] - gj[keep]], 1).clamp(0.0, 1.0 - 1e-4),
                twh=torch.log((g[keep, 4:6] / anc).clamp(min=eps)),
                cls=g[keep, 1].long(),
                wh=g[keep, 4:6],
            )
        )
    return out


def decode_level(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Boxes (B, A, H, W, 4) as (cx, cy, w, h) input fractions from one level's raw output.

    `anchors` is this level's (3, 2). The size exponent is clamped so a wild prediction gives a huge
    box instead of inf.
    """
    _, _, h, w, _ = raw.shape
    dev, dt = raw.device, raw.dtype
    gy, gx = torch.meshgrid(torch.arange(h, device=dev, dtype=dt), torch.arange(w, device=dev, dtype=dt), indexing="ij")
    cx = (raw[..., 0].sigmoid() + gx) / w
    cy = (raw[..., 1].sigmoid() + gy) / h
    anc = anchors.to(dev, dt).view(1, -1, 1, 1, 2)
    wh = raw[..., 2:4].clamp(max=10.0).exp() * anc
    return torch.cat([cx.unsqueeze(-1), cy.unsqueeze(-1), wh], -1)


def gt_by_image(gt: torch.Tensor, batch: int) -> torch.Tensor:
    """Ground-truth boxes as (B, G, 4) xyxy fractions, padded with empty boxes."""
    counts = torch.bincount(gt[:, 0].long(), minlength=batch) if gt.numel() else torch.zeros(batch)
    g = int(counts.max().item()) if batch else 0
    out = torch.zeros(batch, max(g, 1), 4, device=gt.device, dtype=gt.dtype)
    if gt.numel():
        order = torch.argsort(gt[:, 0], stable=True)
        rows = gt[order]
        bi = rows[:, 0].long()
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.shape[0], device=gt.device) - starts.to(gt.device)[bi]
        out[bi, slot] = box_convert(rows[:, 2:6], "cxcywh", "xyxy")
    return out


def max_iou_with_gt(boxes: torch.Tensor, gt_xyxy: torch.Tensor) -> torch.Tensor:
    """For predicted boxes (B, ..., 4) cxcywh, the best IoU with any ground truth of their image."""
    b = boxes.shape[0]
    flat = box_convert(boxes.reshape(b, -1, 4), "cxcywh", "xyxy")
    iou = box_iou(flat, gt_xyxy.to(flat.dtype))  # (B, K, G)
    return iou.amax(-1).reshape(boxes.shape[:-1])
