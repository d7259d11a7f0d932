"""Property: for random small CNNs the pipeline converts every strided conv, and with placements
"exact" and "local" preserves the eval output ("paper" keeps the output shape).

Every generated CNN holds at least one strided block, so an unchanged output is never the whole
story: the test also checks the work done (``tests/_work_done.py``), which a no-op would fail.
"""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import graph_passes as gp
from graph_passes.testing import max_relative_error, randomize_norms

# Loaded by path: --import-mode=importlib puts no test directory on sys.path.
_spec = importlib.util.spec_from_file_location("_work_done", Path(__file__).parents[1] / "_work_done.py")
work_done = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(work_done)

C = 4  # channels everywhere, so blocks chain freely


def _conv(kernel, stride, padding, groups=1):
    return nn.Conv2d(C, C, kernel, stride, padding, groups=groups)


class ConvBnAct(nn.Module):
    def __init__(self, kernel, stride, padding, groups, act):
        super().__init__()
        self.conv, self.bn, self.act = _conv(kernel, stride, padding, groups), nn.BatchNorm2d(C), act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """body(x) + shortcut(x), the shortcut strided when the body is."""

    def __init__(self, body, stride, shortcut_kernel):
        super().__init__()
        self.body = body
        pad = shortcut_kernel // 2
        self.shortcut = nn.Identity() if stride == 1 else nn.Sequential(_conv(shortcut_kernel, stride, pad), nn.BatchNorm2d(C))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Concat(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b, self.mix = a, b, nn.Conv2d(2 * C, C, 1)

    def forward(self, x):
        return self.mix(torch.cat([self.a(x), self.b(x)], 1))


class SE(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body, self.fc = body, nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = self.body(x)
        return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))


activations = st.sampled_from([nn.ReLU(), nn.Hardswish(), nn.SiLU(), nn.Identity(), nn.ReLU6()])
geometry = st.sampled_from([(1, 0), (3, 1), (3, 0), (5, 2), (2, 0), (7, 3)])  # (kernel, padding)


@st.composite
def conv_bn_act(draw, stride=None):
    kernel, padding = draw(geometry)
    stride = draw(st.sampled_from([1, 2, 3])) if stride is None else stride
    groups = draw(st.sampled_from([1, C]))
    return ConvBnAct(kernel, stride, padding, groups, draw(activations))


@st.composite
def block(draw, strided=False):
    """A random block; with ``strided`` one that contains a strided conv."""
    kinds = ["plain", "residual", "concat", "se"] if strided else ["plain", "residual", "concat", "se", "pointwise"]
    kind = draw(st.sampled_from(kinds))
    if kind == "plain":
        return draw(conv_bn_act(draw(st.sampled_from([2, 3]))) if strided else conv_bn_act())
    if kind == "pointwise":
        return nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), draw(activations))
    if kind == "residual":
        stride = 2 if strided else draw(st.sampled_from([1, 2]))
        body = nn.Sequential(
            ConvBnAct(1, 1, 0, 1, nn.ReLU()),
            ConvBnAct(3, stride, 1, draw(st.sampled_from([1, C])), draw(activations)),
            ConvBnAct(draw(st.sampled_from([1, 3])), 1, 0, 1, nn.Identity()) if draw(st.booleans())
            else nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)),
        )
        return Residual(body, stride, draw(st.sampled_from([1, 3])))
    if kind == "concat":
        stride = 2 if strided else draw(st.sampled_from([1, 2]))
        return Concat(draw(conv_bn_act(stride)), draw(conv_bn_act(stride)))
    return SE(draw(conv_bn_act(draw(st.sampled_from([2, 3]))) if strided else conv_bn_act()))


@st.composite
def cnn_blocks(draw):
    """1-4 blocks, one of them (at a random place) strided, so every example has work to do."""
    blocks = draw(st.lists(block(), max_size=3))
    blocks.insert(draw(st.integers(0, len(blocks))), draw(block(strided=True)))
    return blocks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=cnn_blocks(),
    size=st.tuples(st.integers(9, 30), st.integers(9, 30)),
    placement=st.sampled_from(["exact", "local", "paper"]),
)
def test_random_cnns_are_converted_and_stay_exact(blocks, size, placement):
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, C, 1), *blocks)).eval()
    x = torch.randn(2, 3, *size)
    try:
        with torch.no_grad():
            expected = model(x)
    except RuntimeError:  # this architecture does not accept this size (mismatched joins, too small)
        assume(False)
    gm, report = gp.pipeline(model, x, placement)
    # Every strided conv of these models is convertible (4-D input, plain Conv2d, stride < 4 or
    # kernel != stride), so the report must list exactly the model's strided convs as converted.
    strided = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert strided, "cnn_blocks always draws a strided block"
    assert [s.qualname for s in report.converted if s.kind == "conv"] == strided
    assert not report.skipped
    # ... and each of them must have been decomposed into a stride-1 conv and a skip pool.
    work_done.assert_work_done(model, gm, report, placement)
    assert not any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in gm.modules())
    if placement != "local":
        # The pools must also have moved: in these models every BatchNorm is the only user of
        # the conv before it, and BN commutes exactly with a skip pool, so "exact" and "paper"
        # always move a pool past the BN after it (every strided conv here has one).
        for pool in work_done.skip_pool_calls(gm):
            for user in pool.users:
                assert not (user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.BatchNorm2d)), (
                    f"{placement}: {pool.target} was left in front of the BatchNorm {user.target}"
                )
    with torch.no_grad():
        actual = gm.eval()(x)
    assert actual.shape == expected.shape
    if placement != "paper":  # paper deliberately changes the values (pools passing 3x3 convs)
        assert max_relative_error(actual, expected) <= 1e-4
