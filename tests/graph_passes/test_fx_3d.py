"""The passes on 3-D models (video): sites, decomposition, moves and the paper's composition of
consecutive pools, each checked against the original model's own outputs at odd clip sizes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graph_passes as gp
from graph_passes.testing import randomize_norms, skip_pools

CLIPS = [(5, 9, 8), (4, 7, 7)]  # (T, H, W): odd sizes exercise the skip pools' ceil rounding


def _clip(size, channels=3, batch=2, seed=0):
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def _moved(model, placement, size=CLIPS[0]):
    gm = gp.trace(randomize_norms(model).eval())
    gm = gp.decompose(gm, gp.find_sites(gm, _clip(size)))
    return gp.move_pools(gm, placement)


def _assert_same(model, gm, sizes=CLIPS):
    model.eval()
    gm.eval()
    for size in sizes:
        x = _clip(size, seed=sum(size))
        with torch.no_grad():
            expected, actual = model(x), gm(x)
        assert actual.shape == expected.shape
        assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


class Functional3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1)

    def forward(self, x):
        x = F.max_pool3d(self.conv(x), (1, 3, 3), (1, 2, 2), (0, 1, 1))
        x = F.avg_pool3d(x, 2, 2, ceil_mode=True)
        return F.conv3d(x, torch.ones(2, 4, 1, 1, 1), stride=2)


def test_sites_of_3d_ops_have_t_h_w_geometry():
    model = nn.Sequential(nn.Conv3d(3, 4, (3, 7, 7), (1, 2, 2), (1, 3, 3)), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
                          nn.AvgPool3d(2), nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 8, (2, 4, 4), (2, 4, 4)))
    sites = gp.find_sites(gp.trace(model), _clip((8, 33, 33)))
    assert [(s.qualname, s.kind, s.kernel, s.stride, s.padding, s.convert) for s in sites] == [
        ("0", "conv", (3, 7, 7), (1, 2, 2), (1, 3, 3), True),
        ("1", "max_pool", (1, 3, 3), (1, 2, 2), (0, 1, 1), True),
        ("2", "avg_pool", (2, 2, 2), (2, 2, 2), (0, 0, 0), True),
        ("4", "conv", (2, 4, 4), (2, 4, 4), (0, 0, 0), False),  # a patch embedding: kernel == stride, >= 4 in H, W
    ]
    assert sites[0].channels == 4 and sites[0].out_shape == (2, 4, 8, 17, 17)
    functional = gp.find_sites(gp.trace(Functional3d()), _clip((5, 9, 9)))
    assert [(s.qualname, s.kind, s.stride, s.convert) for s in functional] == [
        ("conv", "conv", (1, 2, 2), True), ("max_pool3d", "max_pool", (1, 2, 2), True),
        ("avg_pool3d", "avg_pool", (2, 2, 2), True), ("conv3d", "conv", (2, 2, 2), True),
    ]
    # The functional conv3d runs at stride 1 and a SkipPool3d follows it: the same output.
    model = Functional3d().eval()
    gm = gp.decompose(gp.trace(model), functional)
    assert [n.kwargs["stride"] for n in gm.graph.nodes if n.target is F.conv3d] == [(1, 1, 1)]
    assert [type(m).__name__ for m in gm.modules() if isinstance(m, gp.SkipPool)] == ["SkipPool3d", "SkipPool3d"]
    for shape in ((5, 9, 9), (4, 8, 10)):
        x = _clip(shape)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_conv3d_subclass_with_the_plain_forward_is_one_node():
    class Conv3DSimple(nn.Conv3d):  # torchvision's video ResNets build their convs like this
        pass

    gm = gp.trace(nn.Sequential(Conv3DSimple(3, 4, 3, (2, 2, 2), 1), nn.ReLU()))
    sites = gp.find_sites(gm, _clip((5, 7, 7)))
    assert [(s.qualname, s.convert) for s in sites] == [("0", True)]


@pytest.mark.parametrize("placement", ["local", "exact"])
def test_decompose_and_exact_moves_keep_the_output(placement):
    model = nn.Sequential(
        nn.Conv3d(3, 6, 3, (2, 2, 2), 1, bias=False), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 6, 1), nn.Dropout3d(), nn.Conv3d(6, 4, (1, 3, 3), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(4),
    )
    gm, placed = _moved(model, placement)
    assert [p.stride for p in placed] == [(2, 2, 2), (1, 2, 2)]
    if placement == "exact":  # past BN, ReLU, the 1x1x1 conv and dropout; the second past its BN
        assert [p.after for p in placed] == ["4", "6"]
    assert all(type(gm.get_submodule(q)) is gp.SkipPool3d for q in skip_pools(gm))
    _assert_same(model, gm)


class Join3d(nn.Module):
    """Two strided branches joined by add, cat along channels, or cat along T."""

    def __init__(self, join):
        super().__init__()
        self.join = join
        self.a = nn.Sequential(nn.Conv3d(3, 4, 3, 2, 1), nn.BatchNorm3d(4))
        self.b = nn.Sequential(nn.Conv3d(3, 4, 1, 2), nn.BatchNorm3d(4))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.join == "add":
            return torch.relu(a + b)
        return torch.relu(torch.cat([a, b], dim=1 if self.join == "cat_c" else -3))


@pytest.mark.parametrize("join, merged", [("add", True), ("cat_c", True), ("cat_t", False)])
def test_joins_of_clips_merge_pools_only_where_exact(join, merged):
    model = Join3d(join)
    gm, placed = _moved(model, "exact")
    # cat along dim -3 of a clip is along T: pooling after it is not pooling each operand
    assert len(placed) == (1 if merged else 2)
    if merged:
        assert placed[0].after == "relu" and placed[0].stride == (2, 2, 2)
    _assert_same(model, gm)


class R2Plus1D(nn.Module):
    """R(2+1)D's downsampling: a (1, 3, 3) spatial conv at stride (1, 2, 2), BN, ReLU, then a
    (3, 1, 1) temporal conv at stride (2, 1, 1), BN, ReLU."""

    def __init__(self, temporal_kernel=(3, 1, 1)):
        super().__init__()
        pad = tuple(k // 2 for k in temporal_kernel)
        self.spatial = nn.Conv3d(3, 6, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(6)
        self.temporal = nn.Conv3d(6, 4, temporal_kernel, (2, 1, 1), pad, bias=False)
        self.bn2 = nn.BatchNorm3d(4)

    def forward(self, x):
        return torch.relu(self.bn2(self.temporal(torch.relu(self.bn1(self.spatial(x))))))


def test_paper_placement_composes_consecutive_pools_exactly():
    model = R2Plus1D()
    gm, placed = _moved(model, "paper")
    (pool,) = placed
    assert pool.stride == (2, 2, 2) and pool.after_node == "relu_1", pool  # after the final ReLU
    assert pool.sources == ("spatial", "temporal") and pool.moved
    _assert_same(model, gm)  # only exact moves and x[::a][::b] == x[::ab]: the output is unchanged
    # exact keeps the two pools (each next to its own conv, past the BN/ReLU that follow)
    _, exact = _moved(R2Plus1D(), "exact")
    assert [p.stride for p in exact] == [(1, 2, 2), (2, 1, 1)]


def test_composition_stops_at_a_conv_that_mixes_the_pooled_dims():
    model = R2Plus1D(temporal_kernel=(3, 3, 1))  # kernel 3 along H: a (1, 2, 2) pool cannot pass it
    gm, placed = _moved(model, "paper")
    assert sorted(p.stride for p in placed) == [(1, 2, 2), (2, 1, 1)]
    _assert_same(model, gm)


def test_composition_applies_to_2d_pools_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, (1, 2), 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, (3, 1), (2, 1), (1, 0)), nn.ReLU())
    gm = gp.trace(randomize_norms(model).eval())
    gm = gp.decompose(gm, gp.find_sites(gm, torch.randn(2, 3, 9, 11)))
    gm, placed = gp.move_pools(gm, "paper")
    assert [(p.stride, p.sources) for p in placed] == [((2, 2), ("0", "3"))]
    with torch.no_grad():
        for size in [(9, 11), (8, 8)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
