"""move_pools: where skip pools land under each placement, and exactness where promised."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graph_passes as gp
from graph_passes.testing import assert_same_function, randomize_norms, skip_pools

EVEN_ODD = [16, 15, (12, 17)]


def _moved_with_record(model, placement, size=16, channels=3) -> gp.Moved:
    model = randomize_norms(model).eval()
    gm = gp.trace(model)
    gm = gp.decompose(gm, gp.find_sites(gm, torch.randn(1, channels, size, size)))
    return gp.move_pools(gm, placement)


def _moved(model, placement, size=16, channels=3):
    return _moved_with_record(model, placement, size, channels).graph_module


def _module_after(gm, pool_name):
    """The qualname (or node name) of what a pool reads."""
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == pool_name]
    src = node.args[0]
    return str(src.target) if src.op == "call_module" else src.name


class Bottleneck(nn.Module):
    """torchvision-style bottleneck: strided 3x3 in the middle, strided 1x1 shortcut."""

    def __init__(self, cin=8, mid=4, cout=12):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, 2, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


class BasicBlock(nn.Module):
    """torchvision-style basic block: strided 3x3, stride-1 3x3, strided 1x1 shortcut."""

    def __init__(self, cin=8, cout=12):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.relu(out)


class Net(nn.Module):
    """stem (stride 1) -> block -> a 3x3 conv that blocks every move."""

    def __init__(self, block, cin=8, cout=12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), nn.ReLU())
        self.block = block
        self.head = nn.Conv2d(cout, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


# --- residual blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["exact", "paper"])
def test_bottleneck_pools_merge_at_the_add_and_land_after_the_final_relu(placement):
    model = Net(Bottleneck())
    gm, (placed,) = _moved_with_record(model, placement)
    assert skip_pools(gm) == {"block.pool": ("block_relu_2", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)
    assert placed == gp.PlacedPool("block.pool", (2, 2), "block.relu", "block_relu_2",
                                   ("block.conv2", "block.downsample.0"), True)


def test_basic_block_exact_stops_at_the_stride1_3x3_conv():
    model = Net(BasicBlock())
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {
        "block.pool": ("block_relu", (2, 2)),  # after bn1 + relu, before conv2
        "block.downsample.pool": ("block_downsample_1", (2, 2)),  # after the shortcut BN
    }
    assert_same_function(model, gm, EVEN_ODD)


def test_basic_block_paper_passes_conv2_and_lands_after_the_final_relu():
    model = Net(BasicBlock())
    gm = _moved(model, "paper")
    assert skip_pools(gm) == {"block.pool": ("block_relu_1", (2, 2))}
    assert gm.get_submodule("block.conv2").stride == (1, 1)
    # deliberately not output-preserving (docs/method.md section 3), but shapes are kept
    for h, w in [(16, 16), (15, 15), (13, 18)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert gm(x).shape == model(x).shape
            assert not torch.allclose(gm(x), model(x))


def test_paper_does_not_pass_a_conv_whose_join_has_the_same_source():
    """MobileNet-like: a stride-2 block, then a residual block. The residual add joins two
    paths from the same pool, which is no strided shortcut: the pool stays at the block end."""

    class InvertedResidual(nn.Module):
        def __init__(self, c, stride):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                nn.Conv2d(2 * c, 2 * c, 3, stride, 1, groups=2 * c), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c),
            )
            self.residual = stride == 1

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), InvertedResidual(6, 2), InvertedResidual(6, 1),
                          nn.Conv2d(6, 4, 3))
    for placement in ["exact", "paper"]:
        gm = _moved(model, placement)
        assert skip_pools(gm) == {"1.conv.pool": ("_1_conv_7", (2, 2))}, placement
        assert_same_function(model, gm, EVEN_ODD)


# --- joins -------------------------------------------------------------------------------------


class ConcatBlock(nn.Module):
    """Inception/ShuffleNet-like: two strided branches concatenated, then a reshape."""

    def __init__(self, shuffle=False):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1, groups=2), nn.ReLU())
        self.shuffle = shuffle

    def forward(self, x):
        out = torch.cat([self.a(x), self.b(x)], dim=1)
        if self.shuffle:  # channel shuffle: size() and view() block
            n, c, h, w = out.size()
            out = out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_concat_of_equal_sized_branches_merges_into_one_pool(shuffle):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ConcatBlock(shuffle), nn.Conv2d(10, 2, 3))
    gm, (placed,) = _moved_with_record(model, "exact")
    assert skip_pools(gm) == {"1.pool": ("cat", (2, 2))}
    assert placed.sources == ("1.a.0", "1.b.2") and placed.after == "1.cat"
    assert_same_function(model, gm, EVEN_ODD)


def test_concat_of_branches_with_different_pre_pool_sizes_does_not_merge():
    """3x3 pad 0 and 2x2 pad 0 at stride 2 agree only for odd sizes, and their stride-1 outputs
    (H - 2 and H - 1) never do: the pools must not merge at the cat."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, 2)
            self.b = nn.Conv2d(3, 4, 2, 2)

        def forward(self, x):
            return torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)

    model = M()
    gm = _moved(model, "exact", size=17)
    assert len(skip_pools(gm)) == 2
    assert_same_function(model, gm, [17, 15, (13, 21)])


def test_concat_along_a_spatial_dim_blocks():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 1, 2)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=2)

    model = M()
    gm = _moved(model, "exact")
    assert len(skip_pools(gm)) == 2
    assert_same_function(model, gm, EVEN_ODD)


def test_pools_of_different_strides_do_not_merge():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, (2, 1), 1), nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x):
            return self.a(x)[..., ::1, ::2] + self.b(x)

    model = M()
    gm = _moved(model, "exact")
    assert len(skip_pools(gm)) == 2
    assert_same_function(model, gm, [16, 15])


# --- broadcasting and SE -----------------------------------------------------------------------


class SEBlock(nn.Module):
    """EfficientNet-like: strided depthwise conv, BN, SiLU, squeeze-excitation, 1x1 project."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.BatchNorm2d(c), nn.SiLU())
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.project = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        x = self.dw(x)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.project(x * scale)


def test_pool_does_not_pass_into_a_squeeze_excitation_branch():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SEBlock(), nn.Conv2d(8, 2, 3))
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"1.dw.pool": ("_1_dw_2", (2, 2))}
    pooled = [n for n in gm.graph.nodes if n.target == "1.dw.pool"][0]
    assert {u.target for u in pooled.users} == {F.adaptive_avg_pool2d, __import__("operator").mul}
    assert_same_function(model, gm, EVEN_ODD)


class ScaledBlock(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.scale = nn.Parameter(torch.rand(shape) + 0.5)
        self.register_buffer("shift", torch.randn(shape))

    def forward(self, x):
        return (self.conv(x) * self.scale - self.shift) * 2.0 + 1


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (1,), ()])
def test_constants_of_spatial_size_one_are_passed(shape):
    model = nn.Sequential(ScaledBlock(shape), nn.Conv2d(4, 2, 3))
    gm, (placed,) = _moved_with_record(model, "exact")
    assert placed.moved and placed.after == "0.add"
    assert_same_function(model, gm, EVEN_ODD)


def test_constant_varying_along_width_blocks():
    model = nn.Sequential(ScaledBlock((8,)), nn.Conv2d(4, 2, 3))  # (8,) broadcasts along W
    gm = _moved(model, "exact")
    assert _module_after(gm, "0.pool") == "0.conv"
    assert_same_function(model, gm, [16])


def test_operand_without_the_pool_blocks():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.gate = nn.Conv2d(3, 4, 3, 2, 1, padding_mode="reflect")
            self.pool = nn.AvgPool2d(2, ceil_mode=True)

        def forward(self, x):
            return torch.relu(self.conv(x)) * self.pool(x).mean(1, keepdim=True)

    model = M()
    gm = _moved(model, "exact")
    assert set(skip_pools(gm)) == {"pool1"}  # "pool" is the AvgPool2d
    assert _module_after(gm, "pool1") == "relu"
    assert_same_function(model, gm, EVEN_ODD)


# --- several users, duplication, chains ---------------------------------------------------------


def test_value_with_a_blocking_user_keeps_its_pool():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4)
            self.spatial = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return torch.relu(y) + self.spatial(y)

    model = M()
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("bn", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)


def test_fork_that_never_joins_does_not_duplicate_the_pool():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return self.a(torch.relu(y)) + self.b(torch.sigmoid(y))

    model = M()
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("conv", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)


def test_fork_that_joins_again_moves_as_one_pool():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.head(y * torch.sigmoid(y))  # SiLU written out

    model = M()
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("mul", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)


def test_chained_strided_convs_each_keep_a_pool():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 1, 2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 2, 3),
    )
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("_2", (2, 2)), "pool1": ("_5", (2, 2))}
    assert_same_function(model, gm, [16, 15, 13, (9, 22)])


def test_in_place_ops_move_exactly():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4)
            self.short = nn.Conv2d(3, 4, 1, 2)

        def forward(self, x):
            out = F.relu(self.bn(self.conv(x)), inplace=True).mul_(2).clamp_(max=3.0)
            out.add_(self.short(x))
            return torch.relu_(out).flatten(1)

    model = M()
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("relu_", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)


def test_pool_whose_input_has_other_users_does_not_move():
    """In-place ops after the pool mutate a view of its input; moving would change that input
    for its other users."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(3, 4, 3, padding=1), gp.SkipPool2d(2)

        def forward(self, x):
            y = self.conv(x)
            z = torch.relu_(self.pool(y))
            return z.sum((2, 3)) + y.sum((2, 3))

    gm = gp.trace(M().eval())
    reference = gp.trace(M().eval())
    reference.load_state_dict(gm.state_dict())
    gm, _ = gp.move_pools(gm, "exact")
    assert skip_pools(gm) == {"pool": ("conv", (2, 2))}
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(gm(x), reference(x))


def test_ops_that_do_not_commute_block():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.norm = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics in eval too
            self.inorm = nn.InstanceNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.inorm(y) + F.dropout(self.norm(y), 0.1, training=True).clamp(max=0) * 0

    model = M()
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("conv", (2, 2))}


def test_functional_dropout_in_eval_is_passed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 2, 3)

        def forward(self, x):
            return self.head(F.dropout(F.hardswish(self.conv(x)), 0.5, training=self.training))

    model = M()
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("dropout", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)


def test_pool_lands_before_the_output_and_reshapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Hardswish(), nn.Flatten())
    gm = _moved(model, "exact")
    assert skip_pools(gm) == {"pool": ("_2", (2, 2))}
    assert_same_function(model, gm, EVEN_ODD)


# --- placements, record, errors ----------------------------------------------------------------


def test_local_moves_nothing_and_records_every_pool():
    model = Net(Bottleneck())
    gm, placed = _moved_with_record(model, "local")
    assert skip_pools(gm) == {
        "block.pool": ("block_conv2", (2, 2)),
        "block.downsample.pool": ("block_downsample_0", (2, 2)),
    }
    assert [p.moved for p in placed] == [False, False]
    assert placed[0].sources == ("block.conv2",)
    assert_same_function(model, gm, EVEN_ODD)


def test_moving_twice_changes_nothing_more():
    model = Net(Bottleneck())
    gm = _moved(model, "exact")
    code = gm.code
    gp.move_pools(gm, "exact")
    assert gm.code == code


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement must be one of"):
        gp.move_pools(gp.trace(nn.ReLU()), "everywhere")


def test_graph_without_pools_is_unchanged():
    gm = gp.trace(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    code = gm.code
    moved, placed = gp.move_pools(gm, "paper")
    assert moved is gm and gm.code == code and placed == []
