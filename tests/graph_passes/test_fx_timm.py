"""A few timm families through the graph passes, small inputs (the fast suite; all 98: tests/test_timm_zoo.py).

Each covers one way a timm model differed from a torchvision one: a block torch.fx cannot trace
(kept whole, the model around it converted: mobilevit), a strided conv computed by a Conv2d
subclass, untraceable (TensorFlow "SAME" padding: efficientnet with ``pad_type="same"``) or
traced through (weight standardization in nfnet's ``ScaledStdConv2d``), a ``.view()`` of a
decomposed patch embedding (eva), and a root that does not trace reading an attribute of its
converted part (``test_vit``'s ``patch_embed.grid_size``), and pools with "SAME" padding (timm's
``MaxPool2dSame`` / ``AvgPool2dSame``, the hybrid ViT's stem). The oracle is the timm model itself
in eval mode, with random BatchNorm statistics, at two input sizes where it takes them.
"""

import pytest
import torch
import torch.nn.functional as F

import graph_passes as gp
from graph_passes.stride1 import AtStride1
from graph_passes.testing import max_relative_error, randomize_norms

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'gfgp[timm]')")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(name, **kwargs):
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, pretrained=False, **kwargs)).eval()


def _assert_same(model, converted, sizes, rtol=1e-4):
    converted.eval()
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            expected, actual = model(x), converted(x)
        assert actual.shape == expected.shape
        assert max_relative_error(actual, expected) <= rtol, (h, w)


def test_mobilevit_keeps_its_attention_blocks_whole_and_converts_around_them():
    model = _model("mobilevit_xxs")
    with pytest.raises(gp.TraceError, match="MobileVitBlock"):
        gp.trace(model)
    skip, report = gp.pipeline(model, torch.randn(2, 3, 64, 64), placement="exact", partial=True)
    assert report.parts == [""]  # one graph for the whole model
    assert [(u.type, u.reason.startswith("kept whole")) for u in report.untraced] == [("MobileVitBlock", True)] * 3
    assert len(report.converted) == len(report.sites) == 5  # the stem and the four strided blocks
    assert isinstance(skip, torch.fx.GraphModule)
    assert all(type(skip.get_submodule(u.qualname)).__name__ == "MobileVitBlock" for u in report.untraced)
    _assert_same(model, skip, [(64, 64), (96, 96)])


def test_same_padding_convs_are_decomposed_through_their_own_forward():
    model = _model("test_efficientnet", pad_type="same")
    same = [q for q, m in model.named_modules() if type(m).__name__ == "Conv2dSame" and max(m.stride) > 1]
    assert same, "timm builds its strided 'same' convs as Conv2dSame"
    skip, report = gp.pipeline(model, torch.randn(2, 3, 64, 64), placement="exact", partial=True)
    converted = {s.qualname for s in report.converted}
    assert set(same) <= converted
    for q in same:
        new = skip.get_submodule(q)
        assert isinstance(new, AtStride1) and type(new).__name__ == "Conv2dSame"
    # SAME padding differs for even and odd sizes: both are exact.
    _assert_same(model, skip, [(64, 64), (63, 57)])


def test_nfnet_scaled_std_convs_are_traced_through_and_run_at_stride1():
    model = _model("test_nfnet")
    skip, report = gp.pipeline(model, torch.randn(2, 3, 64, 64), placement="exact", partial=True)
    assert report.parts == [""] and report.skipped == []
    owners = {type(model.get_submodule(s.qualname)).__name__ for s in report.converted if s.kind == "conv"}
    assert owners == {"ScaledStdConv2d"}  # F.conv2d calls in its forward, named after the module
    strides = [n.args[3] for n in skip.graph.nodes if n.target is F.conv2d]
    assert strides and all(s == (1, 1) for s in strides)
    assert set(model.state_dict()) == set(skip.state_dict())
    _assert_same(model, skip, [(64, 64), (65, 49)])


def test_eva_views_its_decomposed_patch_embedding():
    model = _model("vit_tiny_patch16_dinov3_qkvb", img_size=64)
    skip, report = gp.pipeline(model, torch.randn(2, 3, 64, 64), placement="exact", include_patch_embed=True,
                               partial=True)
    assert [(s.qualname, s.convert) for s in report.sites] == [("patch_embed.proj", True)]
    _assert_same(model, skip, [(64, 64)])


def test_vit_with_dynamic_size_reads_its_converted_patch_embeddings_grid_size():
    model = _model("test_vit", img_size=64)  # dynamic_img_size=True: the root does not trace
    skip, report = gp.pipeline(model, torch.randn(2, 3, 64, 64), placement="exact", include_patch_embed=True,
                               partial=True)
    assert report.parts == ["patch_embed"]
    assert [(s.qualname, s.convert) for s in report.sites] == [("patch_embed.proj", True)]
    assert isinstance(skip.patch_embed, torch.fx.GraphModule)
    assert skip.patch_embed.grid_size == model.patch_embed.grid_size == (4, 4)
    _assert_same(model, skip, [(64, 64), (96, 80)])


def test_same_pools_of_timm_convert_with_their_padding_per_input():
    # timm's MaxPool2dSame / AvgPool2dSame (as in nasnet, pnasnet and the hybrid ViTs' stems) pad in
    # their forward; the "max"/"avg"-style replacement computes the same pool at every size.
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), MaxPool2dSame(3, 2), torch.nn.ReLU(),
                                AvgPool2dSame(3, 2), torch.nn.Conv2d(8, 4, 1)).eval()
    sites = {}

    def factory(site):
        sites[site.qualname] = site
        return gp.SamePool(site.kind.split("_")[0], site.kernel, site.stride, site.count_include_pad)

    converted, report = gp.pipeline(model, torch.randn(1, 3, 33, 33), placement="exact", factory=factory, partial=True)
    assert [(s.qualname, s.same_padding) for s in report.replaced] == [("1", True), ("3", True)]
    assert sites["3"].count_include_pad  # timm's AvgPool2dSame pads zeros explicitly: they count
    _assert_same(model, converted, [(33, 33), (34, 31), (8, 9), (20, 16)], rtol=1e-6)


def test_hybrid_vit_stem_pool_becomes_a_same_padded_gfgp_layer():
    import gfgp_cli
    from gfgp_cli.nn import GFGPPool2d

    model = _model("vit_tiny_r_s16_p8_224")
    skip, report = gp.pipeline(model, torch.randn(1, 3, 224, 224), placement="exact", partial=True)
    [pool] = [s for s in report.sites if s.kind == "max_pool"]
    assert pool.convert and pool.same_padding and type(model.get_submodule(pool.qualname)).__name__ == "MaxPool2dSame"
    _assert_same(model, skip, [(224, 224)])
    gfgp = gfgp_cli.convert(model, image_size=224)
    layer = gfgp.get_submodule(pool.qualname)
    assert isinstance(layer, GFGPPool2d) and layer.padding == "same"
    with torch.no_grad():
        assert gfgp.eval()(torch.randn(1, 3, 224, 224)).shape == (1, model.num_classes)
