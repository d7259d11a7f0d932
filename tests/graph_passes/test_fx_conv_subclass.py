"""Strided convs computed inside Conv2d subclasses and other modules (pure torch, no timm).

Two ways a conv hides in a module's own forward: a subclass that torch.fx cannot trace (its
"SAME" padding is computed from the input size with ``math.ceil``) stays one leaf node and is
decomposed through its own forward (graph_passes.stride1); a forward that traces (a
standardized weight, a blur filter) leaves an ``F.conv2d`` call in the graph, which decompose
runs at stride 1. The oracle is the original module at every size, even and odd.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graph_passes as gp
import graph_passes.testing
from graph_passes.stride1 import AtStride1, at_stride1, conv_at_own_stride

SIZES = [(9, 9), (10, 10), (11, 8), (16, 13)]


class SameConv(nn.Conv2d):
    """TensorFlow "SAME" padding, computed from the input size and the stride (as timm's Conv2dSame)."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.weight.shape[-2:]), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight standardization in the forward (as timm's StdConv2d / ScaledStdConv2d): it traces."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Blur(nn.Module):
    """A fixed binomial filter at stride 2 after reflect padding (as timm's BlurPool2d)."""

    def __init__(self, channels):
        super().__init__()
        f = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (f[:, None] * f[None, :] / 16).expand(channels, 1, 3, 3).clone(), persistent=False)
        self.channels = channels

    def forward(self, x):
        return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), self.filt, stride=2, groups=self.channels)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SameConv(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.std = StdConv(8, 8, 3, stride=2, padding=1)
        self.blur = Blur(8)
        self.head = SameConv(8, 4, 1, stride=2)

    def forward(self, x):
        return self.head(self.blur(self.std(torch.relu(self.bn(self.stem(x))))))


def _check_same(model, converted, sizes=SIZES):
    model.eval()
    converted.eval()
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected, actual = model(x), converted(x)
        assert actual.shape == expected.shape, (h, w)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_same_padding_conv_converts_through_its_own_forward_exactly():
    model = nn.Sequential(SameConv(3, 6, 3, stride=2), nn.ReLU())
    gm = gp.trace(model, leaf_modules=(SameConv,))
    (site,) = gp.find_sites(gm, torch.randn(2, 3, 10, 10))
    assert (site.qualname, site.kind, site.stride, site.convert, site.reason) == ("0", "conv", (2, 2), True, "")
    gm = gp.decompose(gm, [site])
    new = gm.get_submodule("0")
    # The same class and state, its conv at stride 1; the stride attribute (read by the padding) is kept.
    assert isinstance(new, SameConv) and isinstance(new, AtStride1) and new.stride == (2, 2)
    assert new.weight is model[0].weight and list(new.state_dict()) == list(model[0].state_dict())
    assert type(model[0]) is SameConv  # the original is not modified
    assert [type(m).__name__ for m in gm.modules() if isinstance(m, gp.SkipPool)] == ["SkipPool2d"]
    _check_same(model, gm)
    # Traced again, the copy is one node with no strided site left.
    again = gp.trace(gm)
    assert [s.qualname for s in gp.find_sites(again, torch.randn(2, 3, 10, 10))] == ["pool"]


def test_a_plain_stride1_copy_would_not_be_exact():
    """Why the copy runs the class's forward with the real stride: SAME padding depends on it."""
    conv = SameConv(3, 4, 3, stride=2).eval()
    x = torch.randn(1, 3, 10, 10)
    naive = SameConv(3, 4, 3, stride=1)
    naive.load_state_dict(conv.state_dict())
    with torch.no_grad():
        assert not torch.allclose(naive(x)[..., ::2, ::2], conv(x), atol=1e-4)
        torch.testing.assert_close(at_stride1(conv)(x)[..., ::2, ::2], conv(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(gp.stride1_conv(conv)(x)[..., ::2, ::2], conv(x), rtol=0, atol=1e-6)


def test_forward_check_says_why_not():
    class TwoConvs(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(super().forward(x), self.weight.new_ones(self.out_channels, self.out_channels, 1, 1))

    class OtherStride(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, 1, self.padding)

    assert conv_at_own_stride(SameConv(3, 4, 3, 2), (1, 3, 8, 8)) == ""
    assert conv_at_own_stride(TwoConvs(3, 4, 3, 2), (1, 3, 8, 8)) == "its forward makes 2 conv calls, not one"
    assert conv_at_own_stride(OtherStride(3, 4, 3, 2), (1, 3, 8, 8)) == "its conv runs at stride (1, 1), not at its stride (2, 2)"


def test_copy_refuses_an_input_that_takes_another_path():
    class SizeDependent(nn.Conv2d):
        def forward(self, x):
            y = super().forward(x)
            return y if x.shape[-1] < 20 else y + 1

    conv = SizeDependent(3, 4, 3, 2)
    assert conv_at_own_stride(conv, (1, 3, 8, 8)) == ""
    new = at_stride1(conv)
    assert new(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
    with pytest.raises(RuntimeError, match="does not return its conv's output"):
        new(torch.randn(1, 3, 24, 24))


def test_traced_through_convs_become_stride1_calls_and_skip_pools():
    model = Net()
    gm = gp.trace(model, leaf_modules=(SameConv,))
    sites = gp.find_sites(gm, torch.randn(2, 3, 16, 16))
    assert [(s.qualname, s.kind, s.kernel, s.stride, s.padding, s.convert) for s in sites] == [
        ("stem", "conv", (3, 3), (2, 2), (0, 0), True),
        ("std", "conv", (3, 3), (2, 2), (1, 1), True),   # F.conv2d in StdConv.forward: the owner's name
        ("blur", "conv", (3, 3), (2, 2), (0, 0), True),  # F.conv2d in Blur.forward
        ("head", "conv", (1, 1), (2, 2), (0, 0), True),
    ]
    keys = list(gp.trace(model, leaf_modules=(SameConv,)).state_dict())
    gm = gp.decompose(gm, sites)
    strides = [n.args[3] if len(n.args) > 3 else n.kwargs["stride"] for n in gm.graph.nodes if n.target is F.conv2d]
    assert strides == [(1, 1), (1, 1)]
    # Each skip pool follows its conv; the functional convs' pools go in their owner modules' containers.
    assert gp.testing.skip_pools(gm) == {"pool": ("stem", (2, 2)), "std.pool": ("conv2d", (2, 2)),
                                         "blur.pool": ("conv2d_1", (2, 2)), "pool1": ("head", (2, 2))}
    assert list(gm.state_dict()) == keys  # skip pools have no state
    _check_same(model, gm)


@pytest.mark.parametrize("placement", ["local", "exact"])
def test_pipeline_with_conv_subclasses_is_exact(placement):
    model = Net()
    gp.testing.randomize_norms(model)
    skip, report = gp.pipeline(model, torch.randn(2, 3, 16, 16), placement=placement, partial=True)
    assert [s.convert for s in report.sites] == [True] * 4
    assert report.untraced and report.untraced[0].type == "SameConv"  # kept whole: math.ceil of a size
    _check_same(model, skip)


def test_pool_subclass_with_own_forward_is_not_converted():
    class MaxPoolSame(nn.MaxPool2d):
        def forward(self, x):  # its padding is not the module's padding attribute
            return super().forward(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), value=-math.inf))

    gm = gp.trace(nn.Sequential(MaxPoolSame(3, 2)), leaf_modules=(MaxPoolSame,))
    (site,) = gp.find_sites(gm, torch.randn(1, 3, 9, 9))
    assert not site.convert and site.reason.startswith("MaxPoolSame overrides MaxPool2d.forward and is no 'SAME' pool")
