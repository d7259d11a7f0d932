"""Small networks shared by the export tests (test_export_sizes.py, test_consumers.py, test_verify.py,
test_metadata.py, test_precision.py).

Test modules load this file by its path, as ``_one_node.py`` (pytest's importlib mode puts no
test directory on ``sys.path``).
"""

from __future__ import annotations

import torch
from torch import nn

from gfgp_cli import GFGPPool2d, MaxEntPool2d

__all__ = ["ToOnePixel", "LargeActivations", "ConvPool"]


class ConvPool(nn.Module):
    """A 3x3 conv (3 -> 4 channels) and a GFGP 2x2/2 pool: :meth:`features`; subclasses give
    ``forward`` the output form a test needs (a dict, an output that changes in export)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = GFGPPool2d(4, 2, 2)

    def features(self, x):
        return self.pool(self.conv(x))

    def forward(self, x):
        return self.features(x)


class ToOnePixel(nn.Module):
    """16 px -> 8 -> 4 -> 2 -> 1 by GFGP 2x2/2 pools, then a 2x2/2 ceil-mode pool on the 1x1 map and
    a 3x3/2 padded one: maps of one pixel, a map as large as the kernel; at odd sizes the 2x2 pools
    see odd maps too (ceil mode keeps their last window). Seeded: the same weights every time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pools = nn.ModuleList([GFGPPool2d(4, 2, 2, ceil_mode=True) for _ in range(4)])
        self.at_one = MaxEntPool2d(4, 2, 2, ceil_mode=True, init=1.0)
        self.padded = GFGPPool2d(4, 3, 2, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for pool in self.pools:
            x = pool(x)
        return self.fc(torch.flatten(self.padded(self.at_one(x)), 1))


class LargeActivations(nn.Module):
    """Outputs small next to the activations, as in a trained network whose BatchNorm statistics
    are realistic (issue 18: mobilenet_v3_small, efficientnet_b0): a convolution whose outputs sit
    near ``offset``, a GFGP 2x2/2 pool, and a BatchNorm whose running mean takes them back to O(1).
    float32 rounds the activations to ``offset`` x 6e-8, so PyTorch float32 is itself about 1e-3 of
    the output from float64. Seeded: the same weights every time."""

    def __init__(self, offset: float = 3e4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = GFGPPool2d(8, 2, 2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.bias.add_(offset)
            assert self.bn.running_mean is not None and self.bn.running_var is not None
            self.bn.running_mean.copy_(self.conv.bias)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.bn(self.pool(self.conv(x)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))
