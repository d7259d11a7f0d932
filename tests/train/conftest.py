"""Shared fixtures of the training tests: a tiny GFGP network and a fast in-process run.

Tiny means: two 3x3 convs, two GFGP pools, dropout (so that resume must restore the RNG) and
8x8 digits, so an epoch of the real digits data takes a fraction of a second on two cores.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gfgp_cli.nn import GFGPPool2d

TINY_SPEC = {"source": {"kind": "test", "name": "tiny"}}

# Small, fast runs: 8x8 digits, 64-image batches (22 steps per epoch).
FAST = dict(image_size=8, batch_size=64, lr=0.05, seed=0)


def _tiny_model(num_classes: int = 10, seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), GFGPPool2d(8, 2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), GFGPPool2d(16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, num_classes),
    )


@pytest.fixture
def tiny_model():
    """Factory of the tiny network: tiny_model(num_classes=10, seed=0, dropout=0.2)."""
    return _tiny_model


@pytest.fixture
def tiny_spec():
    return dict(TINY_SPEC)


@pytest.fixture
def train_tiny():
    """train_tiny(out, model=None, **flags): gfgp_cli.train.train on the tiny model, FAST defaults."""
    from gfgp_cli.train import train

    def run(out, model=None, data="digits", **flags):
        return train("tiny.pt", data, str(out), model=model or _tiny_model(), spec=dict(TINY_SPEC), **{**FAST, **flags})

    return run
