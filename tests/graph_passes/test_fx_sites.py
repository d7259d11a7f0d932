"""find_sites: which ops are downsampling sites, their geometry, channels and skip reasons."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graph_passes as gp


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)  # patch embedding: skipped
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=(2, 1), padding=1, groups=16)
        self.plain = nn.Conv2d(16, 16, 3, padding=1)  # stride 1: not a site
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(2, count_include_pad=False)  # stride defaults to kernel
        self.same_size_pool = nn.MaxPool2d(3, 1, 1)  # stride 1: not a site
        self.dilated = nn.MaxPool2d(2, 2, dilation=2)
        self.gap = nn.AdaptiveAvgPool2d(1)  # global: not a site

    def forward(self, x):
        x = self.plain(self.dw(self.conv(self.patch(x))))
        x = self.same_size_pool(self.maxpool(x))
        x = F.max_pool2d(x, 2)
        x = F.avg_pool2d(x, 3, stride=1, padding=1)  # stride 1: not a site
        x = self.avgpool(x)
        x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        y = self.dilated(x)
        return self.gap(x) + self.gap(y)


@pytest.fixture
def zoo_sites():
    gm = gp.trace(_Zoo())
    return gm, {s.qualname: s for s in gp.find_sites(gm, torch.randn(1, 3, 1024, 1024))}


def test_finds_exactly_the_downsampling_sites(zoo_sites):
    _, sites = zoo_sites
    assert list(sites) == ["patch", "conv", "dw", "maxpool", "max_pool2d", "avgpool", "avg_pool2d", "dilated"]


def test_conv_geometry_and_channels_from_shapeprop(zoo_sites):
    _, sites = zoo_sites
    conv, dw = sites["conv"], sites["dw"]
    assert (conv.kind, conv.channels, conv.kernel, conv.stride, conv.padding) == ("conv", 16, (3, 3), (2, 2), (1, 1))
    assert conv.convert and conv.reason == ""
    assert conv.in_shape == (1, 8, 256, 256) and conv.out_shape == (1, 16, 128, 128)
    assert (dw.stride, dw.channels, dw.convert) == ((2, 1), 16, True)


def test_patch_embedding_is_skipped_with_reason(zoo_sites):
    _, sites = zoo_sites
    assert not sites["patch"].convert
    assert "patch embedding" in sites["patch"].reason


def test_patch_embedding_included_on_request():
    gm = gp.trace(_Zoo())
    sites = gp.find_sites(gm, torch.randn(1, 3, 1024, 1024), include_patch_embed=True)
    assert next(s for s in sites if s.qualname == "patch").convert


def test_pool_geometry(zoo_sites):
    _, sites = zoo_sites
    mp, ap = sites["maxpool"], sites["avgpool"]
    assert (mp.kind, mp.kernel, mp.stride, mp.padding, mp.ceil_mode) == ("max_pool", (3, 3), (2, 2), (1, 1), True)
    assert (ap.kind, ap.kernel, ap.stride, ap.count_include_pad) == ("avg_pool", (2, 2), (2, 2), False)
    assert sites["dilated"].convert is False and "dilation" in sites["dilated"].reason


def test_functional_pools_get_readable_names_and_geometry(zoo_sites):
    gm, sites = zoo_sites
    fmax, favg = sites["max_pool2d"], sites["avg_pool2d"]
    assert (fmax.kind, fmax.kernel, fmax.stride, fmax.convert) == ("max_pool", (2, 2), (2, 2), True)
    assert (favg.kind, favg.stride, favg.ceil_mode) == ("avg_pool", (2, 2), True)
    assert {n.name for n in gm.graph.nodes} >= {fmax.node, favg.node}


def test_return_indices_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            y, idx = self.pool(x)
            return y

    (site,) = gp.find_sites(gp.trace(M()), torch.randn(1, 2, 8, 8))
    assert not site.convert and "return_indices" in site.reason


def test_functional_pool_inside_submodule_is_named_after_its_owner():
    class Block(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 3, stride=2) + F.max_pool2d(x, 3, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    sites = gp.find_sites(gp.trace(Net()), torch.randn(1, 2, 9, 9))
    assert [s.qualname for s in sites] == ["block.max_pool2d", "block.max_pool2d_1"]


def test_skip_pool_site_is_the_equivalent_ceil_mode_pool():
    gm = gp.trace(nn.Sequential(nn.Conv2d(3, 5, 1), gp.SkipPool2d(2)))
    (site,) = gp.find_sites(gm, torch.randn(1, 3, 7, 7))
    assert (site.kind, site.channels, site.kernel, site.stride, site.padding, site.ceil_mode) == (
        "skip", 5, (2, 2), (2, 2), (0, 0), True)
    assert site.out_shape == (1, 5, 4, 4)


def test_unbatched_input_is_not_converted():
    gm = gp.trace(nn.Sequential(nn.Conv2d(3, 5, 3, stride=2)))
    (site,) = gp.find_sites(gm, torch.randn(3, 9, 9))
    assert not site.convert and "4-D" in site.reason


def test_conv_subclass_whose_forward_does_more_after_its_conv_is_not_converted():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):  # the conv's output is not the module's: a skip pool after it would not be exact
            return super().forward(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))) * 2

    gm = gp.trace(nn.Sequential(ScaledConv(3, 5, 3, stride=2)), leaf_modules=(ScaledConv,))
    (site,) = gp.find_sites(gm, torch.randn(1, 3, 9, 9))
    assert not site.convert
    assert site.reason == "ScaledConv overrides Conv2d.forward and its forward does not return its conv's output"


def test_find_sites_does_not_modify_the_graph_and_as_dict_is_plain():
    gm = gp.trace(_Zoo())
    before = str(gm.graph)
    sites = gp.find_sites(gm, torch.randn(1, 3, 1024, 1024))
    assert str(gm.graph) == before
    d = sites[0].as_dict()
    assert d["qualname"] == "patch" and isinstance(d["kernel"], tuple)


def test_find_sites_without_input_needs_shapes():
    gm = gp.trace(_Zoo())
    with pytest.raises(ValueError, match="no tensor shape"):
        gp.find_sites(gm, None)
