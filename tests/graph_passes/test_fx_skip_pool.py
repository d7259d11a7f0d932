"""SkipPool2d: geometry, repr, input checks, and that tracing keeps it one node."""

import pytest
import torch
from torch import nn

import graph_passes as gp


@pytest.mark.parametrize("size", [1, 2, 5, 6, 7, 224, 225])
@pytest.mark.parametrize("stride", [1, 2, 3, (2, 3)])
def test_output_is_ceil_of_size_over_stride(size, stride):
    x = torch.randn(2, 3, size, size + 1)
    y = gp.SkipPool2d(stride)(x)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    assert y.shape == (2, 3, -(-size // sh), -(-(size + 1) // sw))
    torch.testing.assert_close(y, x[:, :, ::sh, ::sw])


def test_strided_conv_equals_stride1_conv_then_skip_pool_for_every_size():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    for size in range(3, 12):
        x = torch.randn(1, 4, size, size)
        ref = conv(x)
        out = gp.SkipPool2d(2)(nn.functional.conv2d(x, conv.weight, conv.bias, 1, 1))
        torch.testing.assert_close(out, ref)


def test_repr_shows_stride_like_torchvision():
    assert repr(gp.SkipPool2d(2)) == "SkipPool2d(stride=2)"
    assert repr(gp.SkipPool2d((2, 3))) == "SkipPool2d(stride=(2, 3))"


@pytest.mark.parametrize("bad", [0, -1, (2, 0), 1.5])
def test_rejects_bad_stride(bad):
    with pytest.raises(ValueError, match="stride"):
        gp.SkipPool2d(bad)


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match="4-D"):
        gp.SkipPool2d(2)(torch.randn(3, 8, 8))


def test_has_no_state():
    assert gp.SkipPool2d(2).state_dict() == {}


def test_is_one_node_when_traced():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), gp.SkipPool2d(2))
    gm = gp.trace(model)
    ops = [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert ops == [("call_module", "0"), ("call_module", "1")]


@pytest.mark.parametrize("pool, shape, memory_format", [
    (gp.SkipPool2d(2), (2, 6, 9, 8), torch.contiguous_format),
    (gp.SkipPool2d((2, 3)), (2, 6, 9, 8), torch.channels_last),
    (gp.SkipPool3d((1, 2, 2)), (2, 6, 3, 9, 8), torch.channels_last_3d),
])
def test_output_is_contiguous_in_the_input_memory_format(pool, shape, memory_format):
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    y = pool(x)
    assert y.is_contiguous(memory_format=memory_format)
    kept = x[(slice(None), slice(None), *(slice(None, None, s) for s in pool.stride))]
    assert torch.equal(y, kept) and y.data_ptr() != x.data_ptr()  # a copy: in-place ops on it leave x alone


def test_decomposed_model_whose_forward_views_the_pooled_map():
    """A ``.view()`` after a strided conv (timm's EVA flattens its patch embedding so) works after
    decomposition: the skip pool's output is contiguous, as the conv's was."""

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x):
            y = self.proj(x)
            n, c = y.shape[:2]
            return y.view(n, c, -1).transpose(1, 2)

    model = Embed().eval()
    gm, report = gp.pipeline(model, torch.randn(2, 3, 16, 16), include_patch_embed=True)
    assert [s.convert for s in report.sites] == [True]
    for size in (16, 20):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(gm(x), model(x))
