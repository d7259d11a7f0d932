"""GFGPPool2d and MaxEntPool2d (docs/method.md section 2): structure, parameters, behaviour, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gfgp_cli import GFGPPool2d, MaxEntPool2d, maxent_pool2d


@pytest.mark.parametrize("c", [2, 64, 512])
def test_gfgp_extra_parameters_are_c2_plus_4_5c(c):
    pool = GFGPPool2d(c, 2)
    assert sum(p.numel() for p in pool.parameters()) == c * c + 4.5 * c


def test_gfgp_structure_is_gap_conv_bn_relu_conv_bn_act():
    pool = GFGPPool2d(8, 3, 2, 1, activation="softplus", hidden=5)
    assert (pool.conv1.in_channels, pool.conv1.out_channels, pool.conv1.kernel_size) == (8, 5, (1, 1))
    assert pool.conv1.bias is not None and pool.conv2.bias is not None
    assert (pool.conv2.in_channels, pool.conv2.out_channels) == (5, 8)
    assert isinstance(pool.bn1, nn.BatchNorm2d) and pool.bn1.num_features == 5
    assert isinstance(pool.bn2, nn.BatchNorm2d) and pool.bn2.num_features == 8
    assert isinstance(pool.act, nn.Softplus)


def test_gfgp_forward_equals_formula():
    torch.manual_seed(0)
    pool = GFGPPool2d(6, 3, 2, 1).eval()
    for bn in (pool.bn1, pool.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 6, 9, 9)
    g = F.adaptive_avg_pool2d(x, 1)
    lam = torch.sigmoid(pool.bn2(pool.conv2(torch.relu(pool.bn1(pool.conv1(g))))))
    torch.testing.assert_close(pool(x), maxent_pool2d(x, lam, 3, 2, 1))
    torch.testing.assert_close(pool.lam(x), lam)
    assert lam.shape == (3, 6, 1, 1)


def test_gfgp_lam_range_follows_activation():
    x = torch.randn(4, 8, 6, 6) * 5
    lam_sig = GFGPPool2d(8, 2).train().lam(x)
    lam_sp = GFGPPool2d(8, 2, activation="softplus").train().lam(x)
    assert ((lam_sig > 0) & (lam_sig < 1)).all() and (lam_sp > 0).all() and lam_sp.max() > 1


def test_gfgp_output_shape_and_stride_none():
    x = torch.randn(2, 4, 11, 10)
    assert GFGPPool2d(4, 2).eval()(x).shape == F.avg_pool2d(x, 2).shape
    assert GFGPPool2d(4, 2, ceil_mode=True).eval()(x).shape == F.avg_pool2d(x, 2, ceil_mode=True).shape
    assert GFGPPool2d(4, 3, 2, 1).eval()(x).shape == F.avg_pool2d(x, 3, 2, 1).shape


def test_gfgp_structure_does_not_depend_on_input():
    pool = GFGPPool2d(4, 2)
    names = [n for n, _ in pool.named_parameters()]
    pool.train()(torch.randn(2, 4, 8, 8))
    pool(torch.randn(3, 4, 17, 5))
    assert [n for n, _ in pool.named_parameters()] == names


def test_gfgp_one_sample_in_training_raises_clear_error():
    pool = GFGPPool2d(4, 2).train()
    with pytest.raises(ValueError, match=r"batch of one sample in training mode.*at least 2 samples per device"):
        pool(torch.randn(1, 4, 8, 8))
    assert pool.eval()(torch.randn(1, 4, 8, 8)).shape == (1, 4, 4, 4)  # inference is fine


def test_gfgp_gradients_reach_estimator_and_input():
    pool = GFGPPool2d(4, 2).train()
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    pool(x).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.parameters())


def test_gfgp_half_precision_and_autocast():
    pool = GFGPPool2d(4, 2).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pool(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), pool(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_global_avg_pool_is_the_plane_mean_without_overflow(dtype):
    """GFGP's GAP equals mean((2, 3)) in every dtype, also where a float16 sum would overflow."""
    from gfgp_cli.nn.pooling import global_avg_pool

    x = (torch.rand(2, 3, 64, 64, dtype=torch.float64) * 4 + 28)  # float16 sum ~ 123000 > 65504
    expected = x.mean(dim=(2, 3), keepdim=True)
    got = global_avg_pool(x.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 3, 1, 1)
    torch.testing.assert_close(got.double(), expected, rtol={torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6), atol=0)
    # backward: every position gets 1 / (H W) of the plane's gradient
    xg = x.to(dtype).requires_grad_()
    global_avg_pool(xg).sum().backward()
    torch.testing.assert_close(xg.grad.double(), torch.full_like(x, 1 / 4096))


def test_wrong_channels_is_clear():
    with pytest.raises(ValueError, match=r"GFGPPool2d expects input \[N, 4, H, W\], got \(2, 3, 8, 8\)"):
        GFGPPool2d(4, 2)(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_features=0, kernel_size=2), "num_features must be a positive int"),
        (dict(num_features=4, kernel_size=2, activation="relu"), r"activation must be one of \['sigmoid', 'softplus'\]"),
        (dict(num_features=4, kernel_size=2, hidden=0), "hidden must be a positive int"),
        (dict(num_features=4, kernel_size=2, padding=2), "padding must be between 0 and half the kernel"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GFGPPool2d(**kwargs)


def test_repr_shows_geometry_and_channels():
    assert repr(GFGPPool2d(256, 2)).startswith("GFGPPool2d(\n  256, kernel_size=(2, 2), stride=(2, 2)\n")
    assert "padding=(1, 1), ceil_mode=True" in repr(GFGPPool2d(64, 3, 2, 1, ceil_mode=True))
    assert repr(MaxEntPool2d(8, 2, activation="softplus")).startswith(
        "MaxEntPool2d(\n  8, kernel_size=(2, 2), stride=(2, 2), activation='softplus'"
    )


def test_maxent_layer_learns_per_channel_lam():
    pool = MaxEntPool2d(5, 3, 2, 1)
    assert sum(p.numel() for p in pool.parameters()) == 5
    torch.testing.assert_close(pool.lam(None), torch.full((1, 5, 1, 1), 0.5))
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    y = pool(x)
    torch.testing.assert_close(y, maxent_pool2d(x, torch.full((1, 5, 1, 1), 0.5), 3, 2, 1))
    y.sum().backward()
    assert pool.theta.grad.shape == (1, 5, 1, 1)
    assert pool.train()(torch.randn(1, 5, 8, 8)).shape == (1, 5, 4, 4)  # no BN: batch of one is fine


def test_layers_are_traceable_by_plain_fx():
    """Even a tracer that does not know them as leaves traces them to the same function."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), GFGPPool2d(4, 2), MaxEntPool2d(4, 2)).eval()
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(maxent_pool2d) == 2
    x = torch.randn(2, 3, 13, 13)
    torch.testing.assert_close(gm(x), model(x))


def test_same_padding_is_computed_per_input_and_leaves_the_padding_out():
    # padding="same": TensorFlow's ceil(H / s) outputs at every size; lam -> 0 is the mean of each
    # window's valid positions (the "SAME" average that leaves the padding out).
    from graph_passes import SamePool

    layer = MaxEntPool2d(3, 3, 2, padding="same", activation="softplus", init=-60.0).double()
    for h, w in [(1, 1), (6, 7), (11, 11), (16, 13)]:
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        torch.testing.assert_close(layer(x), SamePool("avg", (3, 3), (2, 2), count_include_pad=False)(x))
    gfgp = GFGPPool2d(4, 3, 2, padding="same").eval()
    assert gfgp(torch.randn(2, 4, 9, 12)).shape == (2, 4, 5, 6)
    assert "padding='same'" in repr(gfgp) and "ceil_mode" not in repr(gfgp)
    with pytest.raises(ValueError, match="padding must be an int, a tuple of ints or 'same', got 'valid'"):
        GFGPPool2d(4, 3, 2, padding="valid")
