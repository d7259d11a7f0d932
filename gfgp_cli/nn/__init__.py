"""Layers: the GFGP pooling layer and the max-entropy pooling ablation."""

from .pooling import GFGPPool2d, MaxEntPool2d

__all__ = ["GFGPPool2d", "MaxEntPool2d"]
