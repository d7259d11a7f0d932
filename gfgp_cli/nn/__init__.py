"""Layers: the GFGP pooling layer, the max-entropy pooling ablation and the comparison modules."""

from .compare import COMPARISON_MODULES, NiNBlock, ResNiNBlock, SEBlock
from .pooling import GFGPPool2d, GFGPPool3d, MaxEntPool2d, MaxEntPool3d

__all__ = ["GFGPPool2d", "MaxEntPool2d", "GFGPPool3d", "MaxEntPool3d", "NiNBlock", "ResNiNBlock", "SEBlock", "COMPARISON_MODULES"]
