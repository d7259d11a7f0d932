"""Pools with TensorFlow "SAME" padding (pure torch, no timm; timm's own: tests/graph_passes/test_fx_timm.py).

A pool subclass whose forward pads from the input size (as TensorFlow ports write it) is found
by running it (graph_passes.same_pool.as_same_pool), converted with a padding computed per input,
and checked against independent oracles: TensorFlow's rule written out here (explicit padding,
then a pool without padding), a loop over every window for the average that leaves the padding
out, and the original module at every size (even, odd, smaller than the kernel).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graph_passes as gp
from graph_passes.same_pool import same_geometry


def tf_same_pads(spatial, kernel, stride):
    """TensorFlow's "SAME": ceil(n / s) outputs; the total padding, the smaller half first. F.pad order."""
    pads = []
    for n, k, s in reversed(list(zip(spatial, kernel, stride))):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class TFMaxPool(nn.MaxPool2d):
    def forward(self, x):
        pads = tf_same_pads(x.shape[-2:], (self.kernel_size,) * 2, (self.stride,) * 2)
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), self.kernel_size, self.stride)


class TFAvgPool(nn.AvgPool2d):
    """Pads zeros and counts them (what an explicit F.pad does, whatever count_include_pad says)."""

    def forward(self, x):
        pads = tf_same_pads(x.shape[-2:], (self.kernel_size,) * 2, (self.stride,) * 2)
        return F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride)


class TFMaxPool3d(nn.MaxPool3d):
    def forward(self, x):
        k, s = (self.kernel_size,) * 3, (self.stride,) * 3
        return F.max_pool3d(F.pad(x, tf_same_pads(x.shape[-3:], k, s), value=-math.inf), k, s)


class LeftPadMaxPool(nn.MaxPool2d):
    """All the padding before: the same output sizes as "SAME", other windows."""

    def forward(self, x):
        pads = [sum(tf_same_pads(x.shape[-2:], (self.kernel_size,) * 2, (self.stride,) * 2)[i:i + 2]) for i in (0, 2)]
        return F.max_pool2d(F.pad(x, [pads[0], 0, pads[1], 0], value=-math.inf), self.kernel_size, self.stride)


def test_plain_pool_form_is_tensorflows_same_wherever_it_exists():
    # padding pad // 2 with ceil_mode gives ceil(n / s) windows starting where SAME's start, for
    # every n from 1 up, except at stride 1 with an even kernel (one more after than before), where
    # same_geometry raises.
    g = torch.Generator().manual_seed(0)
    checked = refused = 0
    for k in range(1, 8):
        for s in range(1, 5):
            for n in range(1, 40):
                x = torch.randn(1, 2, n, 3, generator=g, dtype=torch.float64)
                pads = tf_same_pads((n, 3), (k, 1), (s, 1))
                expected = F.max_pool2d(F.pad(x, pads, value=-math.inf), (k, 1), (s, 1))
                assert expected.shape[2] == math.ceil(n / s)
                try:
                    padding, ceil = same_geometry((n, 3), (k, 1), (s, 1))
                except ValueError as e:
                    assert f"of a side of {n} (kernel {k}, stride {s}) has no symmetric form" in str(e)
                    assert s == 1 and k % 2 == 0
                    refused += 1
                    continue
                actual = F.max_pool2d(x, (k, 1), (s, 1), padding, ceil_mode=ceil)
                assert torch.equal(actual, expected), (k, s, n)
                checked += 1
    assert refused == 3 * 39 and checked == 7 * 4 * 39 - refused


def test_same_pool_module_matches_explicit_padding_and_a_window_loop():
    g = torch.Generator().manual_seed(1)
    for h, w in [(1, 1), (5, 8), (7, 7), (10, 13)]:
        x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
        pads = tf_same_pads((h, w), (3, 3), (2, 2))
        assert torch.equal(gp.SamePool("max", (3, 3), (2, 2))(x), F.max_pool2d(F.pad(x, pads, value=-math.inf), 3, 2))
        torch.testing.assert_close(gp.SamePool("avg", (3, 3), (2, 2))(x), F.avg_pool2d(F.pad(x, pads), 3, 2))
        # count_include_pad=False: the mean of each window's valid positions, one window at a time
        out = gp.SamePool("avg", (3, 3), (2, 2), count_include_pad=False)(x)
        assert out.shape[2:] == (math.ceil(h / 2), math.ceil(w / 2))
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                r0, c0 = 2 * i - pads[2], 2 * j - pads[0]
                window = x[:, :, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3]
                torch.testing.assert_close(out[:, :, i, j], window.mean((2, 3)))


def test_as_same_pool_recognises_same_pools_by_running_them():
    shape = (1, 4, 12, 12)
    same = gp.as_same_pool(TFMaxPool(3, 2), shape)
    assert isinstance(same, gp.SamePool) and (same.kind, same.kernel_size, same.stride) == ("max", (3, 3), (2, 2))
    avg = gp.as_same_pool(TFAvgPool(3, 2, count_include_pad=False), shape)
    assert isinstance(avg, gp.SamePool) and avg.kind == "avg" and avg.count_include_pad  # it counts the zeros
    assert isinstance(gp.as_same_pool(TFMaxPool3d(3, 2), (1, 2, 9, 9, 9)), gp.SamePool)
    assert "is no 'SAME' pool" in gp.as_same_pool(LeftPadMaxPool(3, 2), shape)
    assert "is no 'SAME' pool" in gp.as_same_pool(nn.MaxPool2d(3, 2), shape)  # pads nothing: fewer outputs
    assert "padding" in gp.as_same_pool(TFMaxPool(3, 2, padding=1), shape)


class Net(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = pool
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))))


SIZES = [(9, 9), (10, 10), (11, 8), (16, 13), (2, 3)]


@pytest.mark.parametrize("pool", [TFMaxPool(3, 2), TFAvgPool(3, 2), TFMaxPool(2, 2)], ids=["max3", "avg3", "max2"])
def test_same_pool_sites_convert_and_the_replacement_keeps_every_size(pool):
    model = Net(pool).eval()
    gm, report = gp.pipeline(model, torch.randn(1, 3, 12, 12), placement="exact", partial=True,
                             factory=lambda site: gp.SamePool(site.kind.split("_")[0], site.kernel, site.stride,
                                                              site.count_include_pad))
    [site] = report.sites
    assert site.convert and site.same_padding and site.reason == ""
    assert (site.padding, site.ceil_mode) == same_geometry((12, 12), site.kernel, site.stride)
    assert [s.node for s in report.replaced] == [site.node]
    assert isinstance(gm.get_submodule("pool"), gp.SamePool)
    for h, w in SIZES:  # the oracle: the original module, at sizes the example never had
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(gm.double()(x), model.double()(x), rtol=1e-12, atol=1e-12)


def test_a_pool_with_another_padding_rule_is_reported_not_converted():
    gm, report = gp.pipeline(Net(LeftPadMaxPool(3, 2)).eval(), torch.randn(1, 3, 12, 12), placement="exact", partial=True,
                             factory=lambda site: nn.Identity())
    [site] = report.sites
    assert not site.convert and "LeftPadMaxPool overrides MaxPool2d.forward and is no 'SAME' pool" in site.reason
    assert report.replaced == [] and isinstance(gm.get_submodule("pool"), LeftPadMaxPool)
