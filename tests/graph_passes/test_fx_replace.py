"""replace_pools: pools -> factory(site), names kept, functional calls become modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graph_passes as gp
from graph_passes.testing import assert_same_function, randomize_norms


def equivalent_pool(site: gp.Site) -> nn.Module:
    """A module that computes exactly what the site computes (to check the plumbing)."""
    if site.kind == "skip":
        return gp.SkipPool2d(site.stride)
    if site.kind == "max_pool":
        return nn.MaxPool2d(site.kernel, site.stride, site.padding, site.dilation, ceil_mode=site.ceil_mode)
    return nn.AvgPool2d(site.kernel, site.stride, site.padding, site.ceil_mode, site.count_include_pad)


class TaggedPool(nn.Module):
    """A stand-in for a learned pooling layer: has a parameter and remembers its site."""

    def __init__(self, site):
        super().__init__()
        self.site = site
        self.weight = nn.Parameter(torch.ones(site.channels))

    def forward(self, x):
        return F.avg_pool2d(x, self.site.kernel, self.site.stride, self.site.padding, self.site.ceil_mode) * self.weight.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = F.avg_pool2d(self.block(x), 2, ceil_mode=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.head(x)


def _converted(model, factory, placement="exact", size=32):
    model = randomize_norms(model).eval()
    return gp.pipeline(model, torch.randn(1, 3, size, size), placement, factory)


@pytest.mark.parametrize("size", range(1, 14))
@pytest.mark.parametrize("s", [2, 3])
def test_skip_site_geometry_gives_the_skip_pools_output_size(size, s):
    """kernel = stride = s, padding 0, ceil_mode=True: ceil(H / s) outputs for every H."""
    x = torch.randn(1, 2, size, size + 3)
    site = gp.Site("n", "q", "skip", 2, (s, s), (s, s), (0, 0), True)
    expected = gp.SkipPool2d(s)(x).shape
    assert nn.AvgPool2d(site.kernel, site.stride, site.padding, site.ceil_mode)(x).shape == expected
    assert nn.MaxPool2d(site.kernel, site.stride, site.padding, ceil_mode=site.ceil_mode)(x).shape == expected


def test_equivalent_factory_keeps_the_function_and_the_names():
    model = Net()
    gm, report = _converted(model, equivalent_pool)
    assert [s.qualname for s in report.replaced] == ["pool", "maxpool", "avg_pool2d", "max_pool2d"]
    assert [s.kind for s in report.replaced] == ["skip", "max_pool", "avg_pool", "max_pool"]
    assert_same_function(model, gm, [32, 31, (20, 27)])
    # functional calls are module calls now
    assert not any(n.op == "call_function" and n.target in (F.max_pool2d, F.avg_pool2d) for n in gm.graph.nodes)
    assert isinstance(gm.get_submodule("avg_pool2d"), nn.AvgPool2d)


def test_factory_sees_the_site_and_its_module_lands_at_the_site_name():
    model = Net()
    gm, report = _converted(model, TaggedPool)
    stem = gm.get_submodule("pool")
    assert isinstance(stem, TaggedPool)
    assert (stem.site.kind, stem.site.channels, stem.site.kernel, stem.site.ceil_mode) == ("skip", 8, (2, 2), True)
    mp = gm.get_submodule("maxpool").site
    assert (mp.kernel, mp.stride, mp.padding, mp.ceil_mode) == ((3, 3), (2, 2), (1, 1), True)
    # unchanged layers keep names and Parameters; new ones add keys under the pool names
    assert gm.get_submodule("head").weight is model.head.weight
    new_keys = set(gm.state_dict()) - set(model.state_dict())
    assert new_keys == {"pool.weight", "maxpool.weight", "avg_pool2d.weight", "max_pool2d.weight"}
    assert set(model.state_dict()) <= set(gm.state_dict())
    assert isinstance(model.maxpool, nn.MaxPool2d), "the traced model must not be modified"
    # and the result still runs at odd sizes
    assert gm(torch.randn(2, 3, 31, 29)).shape == model.eval()(torch.randn(2, 3, 31, 29)).shape


def test_factory_returning_none_leaves_the_site():
    model = Net()
    gm, report = _converted(model, lambda site: TaggedPool(site) if site.kind == "max_pool" else None)
    assert [s.qualname for s in report.replaced] == ["maxpool", "max_pool2d"]
    assert isinstance(gm.get_submodule("pool"), gp.SkipPool2d)
    assert any(n.target is F.avg_pool2d for n in gm.graph.nodes)


def test_retracing_shows_one_node_per_registered_pool():
    model = Net()
    gm, _ = _converted(model, TaggedPool)
    assert "pool" not in [n.target for n in gp.trace(gm).graph.nodes], "TaggedPool is traced through until registered"
    try:
        gp.register_leaf_module(TaggedPool)
        retraced = gp.trace(gm)
        targets = [n.target for n in retraced.graph.nodes if n.op == "call_module"]
        assert {"pool", "maxpool", "avg_pool2d", "max_pool2d"} <= set(targets)
        assert_same_function(gm, retraced, [32])
    finally:
        gp.LeafTracer.leaf_types.remove(TaggedPool)


def test_shared_pool_module_gets_one_module_per_call():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2)
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x):
            return self.pool(self.conv(self.pool(x)))

    gm, report = _converted(M(), TaggedPool, placement="local")
    assert [(s.qualname, s.channels) for s in report.replaced] == [("pool", 3), ("pool", 5)]
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "conv"]
    assert calls == ["pool", "pool1"]
    assert gm.get_submodule("pool").weight.shape == (3,) and gm.get_submodule("pool1").weight.shape == (5,)


def test_skipped_sites_and_conv_sites_are_not_handed_to_the_factory():
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.MaxPool2d(2, dilation=2), nn.Conv2d(4, 4, 3, 2))
    seen = []
    gm = gp.trace(model)
    gp.replace_pools(gm, lambda s: seen.append(s.qualname), example_input=torch.randn(1, 3, 64, 64))
    assert seen == []


def test_factory_must_return_a_module():
    gm = gp.trace(nn.Sequential(nn.MaxPool2d(2)))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        gp.replace_pools(gm, lambda s: "pool", example_input=torch.randn(1, 1, 4, 4))


def test_stale_site_list_is_refused():
    gm = gp.trace(nn.Sequential(nn.MaxPool2d(2)))
    site = gp.Site("no_such_node", "0", "max_pool", 1, (2, 2), (2, 2), (0, 0))
    with pytest.raises(ValueError, match="no node 'no_such_node'"):
        gp.replace_pools(gm, equivalent_pool, [site])


def test_replaced_sites_are_returned_with_the_graph():
    gm = gp.trace(nn.Sequential(nn.MaxPool2d(2)))
    result, replaced = gp.replace_pools(gm, equivalent_pool, example_input=torch.randn(1, 1, 4, 4))
    assert result is gm and [s.qualname for s in replaced] == ["0"]
    # a site the factory keeps (returns None for) is not in the record
    gm = gp.trace(nn.Sequential(nn.MaxPool2d(2)))
    assert gp.replace_pools(gm, lambda site: None, example_input=torch.randn(1, 1, 4, 4)).replaced == []
