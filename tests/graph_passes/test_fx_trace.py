"""trace: qualnames preserved, eval-mode control flow, leaf registry, errors naming the module."""

import pytest
import torch
import torchvision
from torch import nn

import graph_passes as gp
from graph_passes.testing import assert_same_function


def test_resnet18_keeps_qualnames_and_state_dict_keys():
    model = torchvision.models.resnet18(weights=None).eval()
    gm = gp.trace(model)
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    assert gp.untraced_state_keys(model, gm) == []
    assert_same_function(model, gm, [64])


def test_leaves_are_shared_not_copied():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    gm = gp.trace(model)
    assert gm.get_submodule("0") is model[0]


class _Conditional(nn.Module):
    """A training-only branch, like GoogLeNet's auxiliary classifier."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.aux = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.body(x)
        if self.training:
            return x + self.aux(x)
        return x


def test_traces_eval_mode_control_flow_and_restores_training_flags():
    model = _Conditional().train()
    model.body.eval()  # a mixed state that a recursive .train() would lose
    gm = gp.trace(model)
    assert model.training and not model.body.training and model.aux.training
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body"]
    assert gp.untraced_state_keys(model, gm) == ["aux.bias", "aux.weight"]


class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


class _UsesCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.custom = _Custom()

    def forward(self, x):
        return self.custom(x) + 1


def test_leaf_modules_argument_and_registry():
    model = _UsesCustom()
    assert "custom" not in [n.target for n in gp.trace(model).graph.nodes]
    assert "custom" in [n.target for n in gp.trace(model, leaf_modules=(_Custom,)).graph.nodes]
    try:
        gp.register_leaf_module(_Custom)
        assert "custom" in [n.target for n in gp.trace(model).graph.nodes]
    finally:
        gp.LeafTracer.leaf_types.remove(_Custom)


def test_register_leaf_module_rejects_non_modules():
    with pytest.raises(TypeError):
        gp.register_leaf_module(int)


class _Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.ReLU(), _Untraceable())

    def forward(self, x):
        return self.block(self.stem(x))


def test_trace_error_names_the_failing_module():
    with pytest.raises(gp.TraceError, match=r"block\.1.*_Untraceable") as info:
        gp.trace(_Outer())
    assert info.value.qualname == "block.1"
    assert isinstance(info.value, ValueError)


def test_trace_error_in_root_forward():
    with pytest.raises(gp.TraceError, match="<root>"):
        gp.trace(_Untraceable())


def test_trace_rejects_non_modules():
    with pytest.raises(TypeError):
        gp.trace(lambda x: x)


def test_frozen_batchnorm_and_stochastic_depth_are_leaves():
    from torchvision.ops import StochasticDepth
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(FrozenBatchNorm2d(3), StochasticDepth(0.5, "row"))
    gm = gp.trace(model.train())
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    # traced through, StochasticDepth would have frozen training=False into the graph
    gm.train()
    x = torch.ones(64, 3, 2, 2)
    assert (gm(x) == 0).any()
