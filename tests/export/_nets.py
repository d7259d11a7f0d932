"""Small networks shared by the export tests (test_export_sizes.py, test_consumers.py).

Test modules load this file by its path, as ``_one_node.py`` (pytest's importlib mode puts no
test directory on ``sys.path``).
"""

from __future__ import annotations

import torch
from torch import nn

from gfgp_cli import GFGPPool2d, MaxEntPool2d

__all__ = ["ToOnePixel"]


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
