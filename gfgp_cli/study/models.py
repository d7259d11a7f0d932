"""Small native VGG-style and ResNet-style networks for the study (CPU-sized versions of the
paper's VGG-16 and ResNet families).

They are plain ``nn.Module`` s written the torchvision way (``features`` / ``classifier`` for
VGG; ``conv1``/``bn1``/``relu``/``maxpool``, ``layerN`` of basic blocks with a ``downsample``
shortcut, ``fc`` for ResNet), so the study converts them through :func:`gfgp_cli.convert`
exactly as it converts torchvision's own models: VGG's max-pools and ResNet's stem max-pool and
strided convolutions are the downsampling sites.

- :class:`SmallVGG`: conv3x3-BN-ReLU stages separated by 2x2/2 max-pools, then global average
  pooling and one linear layer (torchvision's VGG has a 4096-wide MLP head; a linear head keeps
  the parameter count on the convolutions, as in the CIFAR versions of VGG).
- :class:`SmallResNet`: a 3x3 stem, a 3x3/2 pad 1 max-pool (as torchvision's ResNet), then one
  basic block per stage, the first conv and the 1x1 shortcut of stages 2.. at stride 2.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SmallVGG", "SmallResNet", "BasicBlock", "FAMILIES", "build_family"]


def _conv_bn_relu(in_ch: int, out_ch: int) -> list:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SmallVGG(nn.Module):
    """VGG-style classifier. ``stages[i]`` lists the conv widths of stage i; a 2x2/2 max-pool
    ends every stage. Input ``Tensor[N, 3, H, W]`` -> ``Tensor[N, num_classes]``."""

    def __init__(self, stages: Sequence[Sequence[int]] = ((16,), (32,), (64, 64)), num_classes: int = 10) -> None:
        super().__init__()
        layers: list = []
        channels = 3
        for widths in stages:
            for width in widths:
                layers += _conv_bn_relu(channels, width)
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the input (through
    a strided 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """ResNet-style classifier: stem conv3x3-BN-ReLU, max-pool 3x3/2 pad 1, one basic block per
    entry of ``widths`` (stride 2 from the second on), global average pooling, linear.
    Input ``Tensor[N, 3, H, W]`` -> ``Tensor[N, num_classes]``."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = widths[0]
        for i, width in enumerate(widths):
            setattr(self, f"layer{i + 1}", BasicBlock(channels, width, 1 if i == 0 else 2))
            channels = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Mapping from family name to its network class (default widths).
FAMILIES = {"vgg": SmallVGG, "resnet": SmallResNet}


def build_family(family: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised network of ``family`` (draws from torch's global generator)."""
    return FAMILIES[family](num_classes=num_classes)
