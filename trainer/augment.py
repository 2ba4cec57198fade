"""Training augmentation and test-time letterbox, with boxes kept consistent (transforms.v2).

Randomness comes only from the `numpy.random.Generator` passed in, which the sampler derives from
(seed, epoch, position): the same sample at the same place of the same epoch is augmented the same
way in any process, so resuming and DataLoader workers change nothing. `random_ratio` is the
probability of each random step (ColorJitter, horizontal flip, random crop, RandomPadding,
RandomGaussianBlur, RandomNoise); FixRatio (letterbox, aspect ratio kept) always applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

PAD_VALUE = 114
MIN_BOX_SIDE = 2.0  # pixels; smaller boxes left by a crop are dropped


@dataclass(frozen=True)
class Letterbox:
    """How an image of size (h, w) was placed on the square canvas: x' = x * scale + pad."""

    scale: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=boxes.dtype)
        return (boxes - shift.to(boxes.device)) / self.scale


def _boxes(xyxy: torch.Tensor, h: int, w: int) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w))


def letterbox(
    img: torch.Tensor, boxes: torch.Tensor, size: int, fill_ratio: float = 1.0, offset: tuple[float, float] = (0.5, 0.5)
) -> tuple[torch.Tensor, torch.Tensor, Letterbox]:
    """FixRatio: resize so the longer side is `fill_ratio * size` and pad to size x size.

    `offset` in [0, 1]^2 places the resized image inside the free space (0.5, 0.5 = centred).
    Boxes are continuous xyxy pixels (a box covers [x1, x2) x [y1, y2)).
    """
    _, h, w = img.shape
    scale = fill_ratio * size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = F.resize(tv_tensors.Image(img), [nh, nw], antialias=True)
    bx = F.resize(_boxes(boxes, h, w), [nh, nw])
    left = int((size - nw) * offset[0])
    top = int((size - nh) * offset[1])
    padding = [left, top, size - nw - left, size - nh - top]
    img = F.pad(img, padding, fill=PAD_VALUE)
    bx = F.pad(bx, padding)
    sx, sy = nw / w, nh / h
    return img.as_subclass(torch.Tensor), bx.as_subclass(torch.Tensor), Letterbox((sx + sy) / 2, left, top)


def _color_jitter(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    img = F.adjust_brightness(img, float(rng.uniform(0.7, 1.3)))
    img = F.adjust_contrast(img, float(rng.uniform(0.7, 1.3)))
    img = F.adjust_saturation(img, float(rng.uniform(0.6, 1.4)))
    return F.adjust_hue(img, float(rng.uniform(-0.05, 0.05)))


def _random_crop(
    img: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, h, w = img.shape
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out_img = F.crop(img, top, left, ch, cw)
    bx = F.crop(_boxes(boxes, h, w), top, left, ch, cw)  # clamps to the crop
    bx = bx.as_subclass(torch.Tensor)
    before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    after = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
    keep = ((bx[:, 2] - bx[:, 0]) >= MIN_BOX_SIDE) & ((bx[:, 3] - bx[:, 1]) >= MIN_BOX_SIDE)
    keep &= after >= 0.35 * before.clamp(min=1e-6)  # mostly cut away: not that object any more
    return out_img, bx[keep], labels[keep]


def train_transform(
    img: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    random_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment one uint8 CHW image with its xyxy pixel boxes; returns a size x size uint8 image."""
    p = random_ratio
    img = img.clone()
    if rng.random() < p:
        img = _color_jitter(img, rng)
    if rng.random() < p:
        _, _, w = img.shape
        img = F.horizontal_flip(img)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    if rng.random() < p and boxes.shape[0]:
        img, boxes, labels = _random_crop(img, boxes, labels, rng)
    if rng.random() < p:  # RandomPadding: a smaller image placed anywhere on the canvas
        fill, offset = float(rng.uniform(0.6, 1.0)), (float(rng.random()), float(rng.random()))
    else:
        fill, offset = 1.0, (0.5, 0.5)
    img, boxes, _ = letterbox(img, boxes, size, fill, offset)
    if rng.random() < p:
        k = int(rng.choice([3, 5]))
        img = F.gaussian_blur(img, [k, k], [float(rng.uniform(0.1, 1.2))])
    if rng.random() < p:  # RandomNoise, seeded from rng so workers agree with the main process
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        sigma = float(rng.uniform(2.0, 12.0))
        noise = torch.randn(img.shape, generator=gen) * sigma
        img = (img.float() + noise).clamp(0, 255).to(torch.uint8)
    return img, boxes, labels


def test_transform(img: torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """Centred letterbox to size x size; the Letterbox maps predictions back to the original."""
    out, _, lb = letterbox(img, torch.zeros(0, 4), size)
    return out, lb
