"""The official GFGP layouts of torchvision ResNets (docs/method.md section 3), found by generic rules."""


import pytest
import torch
import torchvision
from torch import nn

import graph_passes as gp
from graph_passes.testing import assert_same_function, randomize_norms, skip_pools

BOTTLENECK = ["resnet50", "resnext50_32x4d"]
BOTTLENECK_BIG = ["resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


def _official_layout(final_relu: str) -> dict:
    """Stem pool after the stem ReLU; one pool after each downsampling block's final ReLU."""
    layout = {"pool": ("relu", (2, 2))}
    for layer in (2, 3, 4):
        layout[f"layer{layer}.0.pool"] = (f"layer{layer}_0_{final_relu}", (2, 2))
    return layout


def _convert(name, placement, factory=None, size=64):
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.get_model(name, weights=None)).eval()
    gm, report = gp.pipeline(model, torch.randn(1, 3, size, size), placement, factory)
    return model, gm, report


def _assert_no_strided_conv_left(gm):
    strided = [n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert strided == []
    assert isinstance(gm.get_submodule("maxpool"), nn.MaxPool2d)  # replaced later, by replace_pools


def test_resnet18_paper_layout():
    model, gm, report = _convert("resnet18", "paper")
    assert skip_pools(gm) == _official_layout("relu_1")
    _assert_no_strided_conv_left(gm)
    placed = {p.qualname: p.sources for p in report.placed}
    assert placed["layer2.0.pool"] == ("layer2.0.conv1", "layer2.0.downsample.0")
    x = torch.randn(1, 3, 65, 65)  # odd: shapes kept
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


def test_resnet18_exact_keeps_two_pools_per_downsampling_block():
    model, gm, _ = _convert("resnet18", "exact")
    pools = skip_pools(gm)
    assert len(pools) == 7 and pools["layer2.0.pool"] == ("layer2_0_relu", (2, 2))
    assert pools["layer2.0.downsample.pool"] == ("layer2_0_downsample_1", (2, 2))
    assert_same_function(model, gm, [64, 65])


@pytest.mark.parametrize("placement", ["exact", "paper"])
@pytest.mark.parametrize("name", BOTTLENECK)
def test_bottleneck_layout_is_exact_under_both_placements(name, placement):
    model, gm, _ = _convert(name, placement)
    assert skip_pools(gm) == _official_layout("relu_2")
    _assert_no_strided_conv_left(gm)
    assert_same_function(model, gm, [64, 65], batch=1)


def test_resnet50_five_pooling_layers_reach_the_factory():
    """docs/method.md section 3: 2x2/2 (64 ch) and 3x3/2 pad 1 (64 ch) in the stem, 2x2/2 with 512, 1024, 2048."""
    seen = []
    _convert("resnet50", "paper", factory=lambda site: seen.append(site))
    assert [(s.qualname, s.channels, s.kernel, s.stride, s.padding) for s in seen] == [
        ("pool", 64, (2, 2), (2, 2), (0, 0)),
        ("maxpool", 64, (3, 3), (2, 2), (1, 1)),
        ("layer2.0.pool", 512, (2, 2), (2, 2), (0, 0)),
        ("layer3.0.pool", 1024, (2, 2), (2, 2), (0, 0)),
        ("layer4.0.pool", 2048, (2, 2), (2, 2), (0, 0)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", BOTTLENECK_BIG)
def test_big_bottleneck_layouts(name):
    model, gm, _ = _convert(name, "paper", size=32)
    assert skip_pools(gm) == _official_layout("relu_2")
    _assert_no_strided_conv_left(gm)
    assert_same_function(model, gm, [33], batch=1)


def test_resnet34_paper_layout():
    _, gm, _ = _convert("resnet34", "paper", size=32)
    assert skip_pools(gm) == _official_layout("relu_1")
