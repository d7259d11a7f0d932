"""The tiny GFGP network, and a script that trains it with gfgp_cli.train.train.

Used by the tests in-process (``tiny_model``) and as a subprocess, alone or under torchrun::

    python tests/train/tiny_run.py OUT '{"epochs": 2, "save_every_steps": 3}' [--resume] [--kill-at N]

``--kill-at N`` makes the process SIGKILL itself during its N-th training forward pass: a crash at
a known point in the middle of a step, with no chance to clean up.

Tiny means: two 3x3 convs, two GFGP pools and dropout (so that resume must restore the RNG), on
8x8 digits, so an epoch of the real digits data takes a fraction of a second on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch import nn

from gfgp_cli.nn import GFGPPool2d
from gfgp_cli.spec import ConversionSpec, ModuleSource

# The tiny network is built here, not by gfgp_cli.convert; this spec stands for "a user's module
# with GFGP pools, at 8x8" (what the training code reads: image size, no weights, no sites).
TINY_SPEC = ConversionSpec(source=ModuleSource("tiny_run.tiny_model"), pool="gfgp", placement="local",
                           activation="sigmoid", image_size=8, sites=(), torchvision_version="none")

# Small, fast runs: 8x8 digits, 64-image batches (22 steps per epoch).
FAST = dict(image_size=8, batch_size=64, lr=0.05, seed=0)


def tiny_model(num_classes: int = 10, seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), GFGPPool2d(8, 2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), GFGPPool2d(16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, num_classes),
    )


def train_tiny(out, model=None, data="digits", dropout: float = 0.2, **flags):
    """gfgp_cli.train.train on the tiny model with the FAST defaults (flags override them)."""
    from gfgp_cli.train import train

    return train("tiny.pt", data, str(out), model=model or tiny_model(dropout=dropout), spec=TINY_SPEC,
                 **{**FAST, **flags})


class FailAt(nn.Module):
    """Identity until training forward number ``at``; from then on ``how``: "kill" SIGKILLs the
    process, "nan" returns NaN (a run that diverges at a known step). No parameters, so the
    model's state_dict is unchanged."""

    def __init__(self, at: int, how: str) -> None:
        super().__init__()
        self.at, self.how, self.calls = at, how, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                return x * float("nan")
        return x


if __name__ == "__main__":
    out, flags, rest = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    model = tiny_model(dropout=flags.pop("dropout", 0.2))
    if "--kill-at" in rest:
        model.append(FailAt(int(rest[rest.index("--kill-at") + 1]), "kill"))
    result = train_tiny(out, model=model, resume="--resume" in rest, **flags)
    print(json.dumps({"epochs": result.epochs, "interrupted": result.interrupted, "final": result.final}))
