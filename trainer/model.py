"""The detector: torchvision ResNet18 features at strides 8/16/32, a YOLOv3-style neck, three heads.

`Detector(x)` takes images as floats in [0, 1] (B, 3, H, W), H and W multiples of 32, and returns
three raw outputs ordered stride 32, 16, 8 (the log's scale 1, 2, 4), each shaped
(B, 3, H/s, W/s, 5 + C): tx, ty, tw, th, objectness logit, C class logits.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops.misc import Conv2dNormActivation

log = logging.getLogger(__name__)

# YOLOv3's COCO anchors (pixels at 416), as fractions of the input side; ordered small to large.
YOLOV3_ANCHORS: tuple[tuple[float, float], ...] = tuple(
    (w / 416.0, h / 416.0)
    for w, h in (
        (10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)
    )
)  # fmt: skip
STRIDES = (32, 16, 8)
ANCHORS_PER_LEVEL = 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def level_anchors(anchors: tuple[tuple[float, float], ...] | None = None) -> torch.Tensor:
    """(3 levels, 3, 2) anchor sizes as fractions of the input; level 0 = stride 32 = largest."""
    a = torch.tensor(anchors or YOLOV3_ANCHORS, dtype=torch.float32).reshape(3, ANCHORS_PER_LEVEL, 2)
    return a.flip(0).contiguous()


def _conv(cin: int, cout: int, k: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, kernel_size=k, activation_layer=nn.LeakyReLU, inplace=True)


def _conv_set(cin: int, c: int) -> nn.Sequential:
    """YOLOv3's five alternating 1x1 / 3x3 convolutions."""
    return nn.Sequential(
        _conv(cin, c, 1), _conv(c, 2 * c, 3), _conv(2 * c, c, 1), _conv(c, 2 * c, 3), _conv(2 * c, c, 1)
    )


class _Head(nn.Sequential):
    def __init__(self, c: int, num_outputs: int) -> None:
        super().__init__(_conv(c, 2 * c, 3), nn.Conv2d(2 * c, num_outputs, kernel_size=1))


def build_backbone(pretrained: bool) -> nn.Module:
    """ResNet18 truncated to layer2/3/4 (strides 8/16/32, 128/256/512 channels).

    With `pretrained`, the ImageNet weights are used when torchvision can load them (cached or
    downloadable); otherwise one warning line says so and training starts from random init.
    """
    weights = None
    if pretrained:
        try:
            net = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
            weights = "imagenet"
        except Exception as exc:  # noqa: BLE001 - any download/cache failure means "no weights"
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            log.warning(
                "pretrained=true but the ImageNet ResNet18 weights cannot be loaded (%s): "
                "continuing from random init; put resnet18-f37072fd.pth in $TORCH_HOME/hub/checkpoints "
                "to use them",
                reason,
            )
    if weights is None:
        net = resnet18(weights=None)
    else:
        log.info("backbone: ResNet18 with ImageNet weights")
    return create_feature_extractor(net, return_nodes={"layer2": "c3", "layer3": "c4", "layer4": "c5"})


class Detector(nn.Module):
    """ResNet18 + YOLOv3-style neck; `neck_channels` is the width of the stride-32 conv set."""

    def __init__(self, num_classes: int, neck_channels: int = 256, pretrained: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        no = ANCHORS_PER_LEVEL * (5 + num_classes)
        c5, c4, c3 = neck_channels, max(8, neck_channels // 2), max(8, neck_channels // 4)
        self.backbone = build_backbone(pretrained)
        self.set5 = _conv_set(512, c5)
        self.head5 = _Head(c5, no)
        self.lat5 = _conv(c5, c4, 1)
        self.set4 = _conv_set(256 + c4, c4)
        self.head4 = _Head(c4, no)
        self.lat4 = _conv(c4, c3, 1)
        self.set3 = _conv_set(128 + c3, c3)
        self.head3 = _Head(c3, no)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_heads()

    def _init_heads(self) -> None:
        # Start with low objectness and class probabilities so the first steps are not swamped by
        # thousands of confident negatives (as in RetinaNet / YOLOv5).
        for head in (self.head5, self.head4, self.head3):
            conv = head[-1]
            assert isinstance(conv, nn.Conv2d)
            with torch.no_grad():
                b = conv.bias.view(ANCHORS_PER_LEVEL, -1)
                b.zero_()
                b[:, 4] = math.log(0.01 / 0.99)
                b[:, 5:] = math.log(0.6 / max(self.num_classes - 0.99, 0.01))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        feats = self.backbone(x)
        p5 = self.set5(feats["c5"])
        p4 = self.set4(torch.cat([self.up(self.lat5(p5)), feats["c4"]], 1))
        p3 = self.set3(torch.cat([self.up(self.lat4(p4)), feats["c3"]], 1))
        outs = []
        for head, p in ((self.head5, p5), (self.head4, p4), (self.head3, p3)):
            o = head(p)
            b, _, h, w = o.shape
            outs.append(o.reshape(b, ANCHORS_PER_LEVEL, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2))
        return outs
