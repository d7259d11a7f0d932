"""pipeline: the four passes composed, and the report it returns."""

import json

import torch
from torch import nn

import graph_passes as gp
from graph_passes.testing import assert_same_function, randomize_norms, skip_pools


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.conv = nn.Conv2d(8, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.aux = nn.Linear(8, 2)  # used in training only

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(self.patch(x)))))
        if self.training:
            return self.aux(x.mean((2, 3)))
        return x


def test_report_lists_sites_pools_and_untraced_keys():
    model = randomize_norms(Small()).eval()
    gm, report = gp.pipeline(model, torch.randn(1, 3, 64, 64), "exact", lambda s: None)
    assert [(s.qualname, s.convert) for s in report.sites] == [("patch", False), ("conv", True), ("pool", True)]
    assert [s.qualname for s in report.converted] == ["conv", "pool"]
    assert [s.qualname for s in report.skipped] == ["patch"]
    assert [(p.qualname, p.after, p.sources) for p in report.placed] == [("pool1", "relu", ("conv",))]
    assert report.replaced == []
    assert report.untraced_state_keys == ["aux.bias", "aux.weight"]
    json.dumps(report.as_dict())  # plain values only
    assert_same_function(model, gm, [64, 68])


def test_factory_results_are_reported():
    model = Small().eval()
    gm, report = gp.pipeline(model, torch.randn(1, 3, 64, 64), "exact", lambda s: nn.Identity() if s.kind == "skip" else None)
    assert [(s.qualname, s.kind, s.channels) for s in report.replaced] == [("pool1", "skip", 8)]
    assert isinstance(gm.get_submodule("pool1"), nn.Identity)


def test_include_patch_embed_converts_the_patch_conv():
    model = randomize_norms(Small()).eval()
    gm, report = gp.pipeline(model, torch.randn(1, 3, 64, 64), "exact", include_patch_embed=True)
    assert all(s.convert for s in report.sites)
    assert gm.get_submodule("patch").stride == (1, 1)
    assert_same_function(model, gm, [64, 65])


def test_model_is_not_modified_and_parameters_are_shared():
    model = Small().eval()
    gm, _ = gp.pipeline(model, torch.randn(1, 3, 64, 64), "paper")
    assert model.conv.stride == (2, 2) and not hasattr(model, "pool1")
    assert gm.get_submodule("conv").weight is model.conv.weight


def test_graph_module_input_is_transformed_in_place():
    gm = gp.trace(Small().eval())
    out, _ = gp.pipeline(gm, torch.randn(1, 3, 64, 64), "exact")
    assert out is gm and list(skip_pools(gm)) == ["pool1"]
