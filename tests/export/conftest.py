"""Small models with every kind of max-entropy pool, shared by the export tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gfgp_cli import GFGPPool2d, MaxEntPool2d, maxent_pool2d


class PerPositionPool(nn.Module):
    """A direct call of maxent_pool2d with one lam per output window (lam Tensor[N, C, oh, ow])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lam_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        lam = torch.sigmoid(F.avg_pool2d(self.lam_conv(x), 3, 2, 1, ceil_mode=True)) * 4
        return maxent_pool2d(x, lam, 3, 2, 1, ceil_mode=True)


class TinyNet(nn.Module):
    """conv -> GFGP 3x3/2 pad 1 -> conv -> MaxEnt 2x2/2 ceil -> per-position maxent 3x3/2 -> GAP -> fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool1 = GFGPPool2d(8, 3, 2, 1)
        self.conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool2 = MaxEntPool2d(16, 2, 2, ceil_mode=True, init=1.0)
        self.pool3 = PerPositionPool(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pool3(self.pool2(self.conv(self.pool1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MAXENT_LAYERS_IN_TINYNET = 3


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    # Non-trivial BN statistics, so that folding them is exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# --------------------------------------------------------------------------------------------
# fixtures (pytest's importlib mode: tests take these, they do not import this file)

import pytest  # noqa: E402


@pytest.fixture
def tiny_model() -> TinyNet:
    """A fresh TinyNet in eval mode with 3 max-entropy pools (GFGP, MaxEnt, per-position call)."""
    return tiny_net()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model, ExportReport) of TinyNet exported once at 20x20 with the defaults (dynamic, verified)."""
    from gfgp_cli import export_onnx

    model = tiny_net()
    report = export_onnx(model, tmp_path_factory.mktemp("tiny") / "tiny.onnx", image_size=20)
    return model, report


@pytest.fixture(scope="session")
def tiny_export_inline(tmp_path_factory):
    from gfgp_cli import export_onnx

    model = tiny_net()
    report = export_onnx(model, tmp_path_factory.mktemp("tiny-inline") / "tiny.onnx", image_size=20, inline=True)
    return model, report
