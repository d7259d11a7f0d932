"""decompose: strided conv -> stride-1 conv + SkipPool2d, exact for every input size."""

import pytest
import torch
from torch import nn

import graph_passes as gp
from graph_passes.testing import assert_same_function, skip_pools


def _decomposed(model, size=16, channels=3):
    gm = gp.trace(model.eval())
    sites = gp.find_sites(gm, torch.randn(1, channels, size, size))
    return gp.decompose(gm, sites)


CONVS = {
    "3x3 s2 p1": nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "7x7 s2 p3": nn.Conv2d(4, 6, 7, stride=2, padding=3),
    "1x1 s2": nn.Conv2d(4, 6, 1, stride=2, bias=False),
    "3x3 s2 p0": nn.Conv2d(4, 6, 3, stride=2),
    "2x2 s2 (convnext downsample)": nn.Conv2d(4, 6, 2, stride=2),
    "11x11 s4 p2 (alexnet)": nn.Conv2d(4, 6, 11, stride=4, padding=2),
    "grouped": nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
    "depthwise": nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4),
    "dilated": nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    "asymmetric": nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0)),
    "stride 3": nn.Conv2d(4, 6, 3, stride=3, padding=1),
    "reflect": nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
    "circular": nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular"),
    "replicate": nn.Conv2d(4, 6, 4, stride=2, padding=1, padding_mode="replicate"),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_exact_for_even_and_odd_sizes(name):
    model = nn.Sequential(CONVS[name], nn.ReLU())
    gm = _decomposed(model, size=24, channels=4)
    assert len(skip_pools(gm)) == 1
    assert_same_function(model, gm, [24, 23, 17, (16, 13), 12], channels=4)


def test_structure_names_and_shared_parameters():
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)))
    gm = _decomposed(model)
    conv = gm.get_submodule("stem.0")
    assert conv.stride == (1, 1) and conv.padding == (1, 1)
    assert conv.weight is model.stem[0].weight and conv.bias is model.stem[0].bias
    assert model.stem[0].stride == (2, 2), "the traced model must not be modified"
    assert skip_pools(gm) == {"stem.pool": ("stem_0", (2, 2))}
    assert set(gm.state_dict()) == set(model.state_dict())
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert ops == ["stem.0", "stem.pool", "stem.1"]


def test_skipped_and_non_conv_sites_are_ignored():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.MaxPool2d(2))
    gm = _decomposed(model)
    assert skip_pools(gm) == {} and gm.get_submodule("0").stride == (4, 4)


def test_top_level_conv_gets_root_pool_and_names_do_not_collide():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.b(self.a(x))

    gm = _decomposed(M())
    assert list(skip_pools(gm)) == ["pool", "pool1"]


class _SharedStridedConv(nn.Module):
    """One strided conv module called twice in a row."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_shared_conv_called_twice_is_decomposed_at_both_calls():
    model = _SharedStridedConv()
    gm = _decomposed(model)
    assert len(skip_pools(gm)) == 2
    assert_same_function(model, gm, [16, 15, 9])


def test_partial_site_list_for_shared_conv_is_refused():
    gm = gp.trace(_SharedStridedConv())
    sites = gp.find_sites(gm, torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="called 2 times"):
        gp.decompose(gm, sites[:1])


def test_stale_site_is_refused():
    gm = gp.trace(nn.Sequential(nn.Conv2d(3, 3, 3, stride=2)))
    (site,) = gp.find_sites(gm, torch.randn(1, 3, 16, 16))
    other = gp.trace(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2)))
    with pytest.raises(ValueError, match="site '0'"):
        gp.decompose(other, [site])


def test_stride1_conv_copies_everything_but_stride():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="reflect")
    new = gp.stride1_conv(conv)
    assert new is not conv and new.stride == (1, 1) and conv.stride == (2, 2)
    assert (new.padding, new.groups, new.padding_mode) == (conv.padding, conv.groups, conv.padding_mode)
    assert new.weight is conv.weight
    new.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(conv.named_buffers()), "the copy must own its dicts"
