"""Layers: the GFGP pooling layer, the max-entropy pooling ablation and the comparison modules."""

from .compare import COMPARISON_MODULES, NiNBlock, ResNiNBlock, SEBlock
from .pooling import GFGPPool2d, MaxEntPool2d

__all__ = ["GFGPPool2d", "MaxEntPool2d", "NiNBlock", "ResNiNBlock", "SEBlock", "COMPARISON_MODULES"]
