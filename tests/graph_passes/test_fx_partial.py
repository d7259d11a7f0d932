"""partial: convert the largest traceable parts of a model torch.fx cannot trace whole."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

import graph_passes as gp
from graph_passes.testing import max_relative_error, randomize_norms

NOT_CALLED = "not called in eval mode for the example input"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Encoder(nn.Module):
    """Strided conv -> BN -> ReLU -> max pool: one skip pool to move past BN and ReLU."""

    def __init__(self, cin=3, c=8):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, 2, 1)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(torch.relu(self.bn(self.conv(x))))


class Branchy(nn.Module):
    """An ``if`` on a tensor around two traceable children with sites."""

    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = self.enc(x)
        if f.sum() > 0:
            f = f * 2
        return self.head(self.down(f))


def _inputs(*sizes, channels=3, batch=2, dtype=torch.float32):
    return [torch.randn(batch, channels, h, w, dtype=dtype) for h, w in sizes]


def _assert_same(model, converted, xs, rtol=1e-5):
    model.eval()
    converted.eval()
    for x in xs:
        with torch.no_grad():
            expected, actual = model(x), converted(x)
        assert actual.shape == expected.shape
        assert max_relative_error(actual, expected) <= rtol, tuple(x.shape)


def _tracer_message(model):
    """The first line of what torch.fx itself says about ``model``."""
    with pytest.raises(Exception) as info:
        torch.fx.symbolic_trace(model)
    return str(info.value).strip().splitlines()[0]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_untraceable_root_converts_its_children_exactly_in_a_copy():
    model = randomize_norms(Branchy()).eval()
    before = _state(model)
    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), "exact", None, partial=True)

    assert report.parts == ["enc", "down"]
    assert [(u.qualname, u.type) for u in report.untraced] == [("", "Branchy")]
    assert _tracer_message(Branchy()) in report.untraced[0].reason
    assert [s.qualname for s in report.sites] == ["enc.conv", "enc.pool", "down.0", "down.3"]
    assert [s.node for s in report.sites] == ["enc:conv", "enc:pool", "down:_0", "down:_3"]  # fx names the node of "0" "_0"
    assert all(s.convert for s in report.sites)
    # The skip pools moved past BN and ReLU, inside their parts.
    assert [(p.qualname, p.after, p.after_node, p.sources) for p in report.placed] == [
        ("enc.pool1", "enc.relu", "enc:relu", ("enc.conv",)),
        ("down.pool", "down.2", "down:_2", ("down.0",)),
    ]
    assert report.untraced_state_keys == []

    assert type(out) is Branchy and out is not model
    assert isinstance(out.enc, GraphModule) and isinstance(out.down, GraphModule)
    assert out.head is not model.head and type(out.head) is nn.Conv2d
    assert out.enc.get_submodule("conv").stride == (1, 1)
    assert any(isinstance(m, gp.SkipPool2d) for m in out.modules())
    assert set(model.state_dict()) <= set(out.state_dict())
    _assert_same(model, out, _inputs((16, 16), (17, 15)))

    # The model is left as it was and shares nothing with the result.
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, gp.SkipPool2d) for m in model.modules())
    assert model.enc.conv.stride == (2, 2) and type(model.enc) is Encoder
    ours = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not ours & {id(t) for t in [*out.parameters(), *out.buffers()]}


def test_example_forward_runs_in_eval_mode_and_keeps_training_flags():
    model = randomize_norms(Branchy()).train()
    out, _ = gp.pipeline(model, torch.randn(2, 3, 16, 16), partial=True)
    assert all(m.training for m in model.modules())
    assert out.training and out.head.training
    # BN running statistics were not updated by the example forward.
    assert torch.equal(out.enc.get_submodule("bn").running_mean, model.enc.bn.running_mean)
    assert torch.equal(out.down.get_submodule("1").running_var, model.down[1].running_var)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.grand = Encoder()

    def forward(self, x):
        y = self.grand(x)
        return y if y.mean() > 0 else -y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = Inner()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.amax() > 10:
            x = x / 10
        return self.head(self.child(x))


def test_nested_untraceable_parents_convert_the_grandchild():
    model = randomize_norms(Outer()).eval()
    plan = gp.find_parts(model)
    assert [p.qualname for p in plan.parts] == ["child.grand"]
    assert [(u.qualname, u.type) for u in plan.untraced] == [("", "Outer"), ("child", "Inner")]
    assert all("cannot be used as inputs to control flow" in u.reason for u in plan.untraced)

    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), partial=True)
    assert report.parts == ["child.grand"]
    assert [u.qualname for u in report.untraced] == ["", "child"]
    assert [s.qualname for s in report.sites] == ["child.grand.conv", "child.grand.pool"]
    assert [s.node for s in report.sites] == ["child.grand:conv", "child.grand:pool"]
    assert isinstance(out.child.grand, GraphModule) and type(out.child) is Inner
    _assert_same(model, out, _inputs((16, 16), (17, 15)))


class ModuleListModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Encoder(3, 8), Encoder(8, 8)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            if x.sum() < 0:
                x = -x
        return x


def test_containers_without_forward_are_not_reported():
    model = randomize_norms(ModuleListModel()).eval()
    plan = gp.find_parts(model)
    assert [p.qualname for p in plan.parts] == ["blocks.0", "blocks.1"]
    assert [u.qualname for u in plan.untraced] == [""]
    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), partial=True)
    assert report.parts == ["blocks.0", "blocks.1"]
    _assert_same(model, out, _inputs((16, 16), (17, 15)))


class Twice(nn.Module):
    """One child called on two different tensors."""

    def __init__(self):
        super().__init__()
        self.enc = Encoder()

    def forward(self, x):
        a = self.enc(x)
        b = self.enc(x.flip(-1) * 0.5)
        if a.sum() > b.sum():
            return a - b
        return a + 2 * b


def test_child_called_twice_is_converted_once_and_used_by_both_calls():
    model = randomize_norms(Twice()).eval()
    x = torch.randn(1, 3, 16, 16)
    out, report = gp.pipeline(model, x, partial=True)
    assert report.parts == ["enc"]
    assert [s.qualname for s in report.sites] == ["enc.conv", "enc.pool"]
    assert isinstance(out.enc, GraphModule)

    calls = []
    out.enc.register_forward_hook(lambda m, args, output: calls.append(args[0].shape))
    _assert_same(model, out, _inputs((16, 16)))
    assert len(calls) == 2


def test_capture_inputs_keeps_the_first_call_and_restores_the_model():
    model = Twice().train()
    x = torch.randn(2, 3, 16, 16)
    inputs = gp.capture_inputs(model, x, ["enc", "enc.bn"])
    assert set(inputs) == {"enc", "enc.bn"}
    assert len(inputs["enc"]) == 1 and torch.equal(inputs["enc"][0], x)  # not the flipped call
    assert inputs["enc.bn"][0].shape == (2, 8, 8, 8)
    assert all(m.training for m in model.modules())
    assert not model.enc._forward_pre_hooks and not model.enc.bn._forward_pre_hooks
    assert int(model.enc.bn.num_batches_tracked) == 0  # ran in eval mode


class Split(nn.Module):
    """Returns a dict."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return {"a": self.pool(y), "b": y}


class Merge(nn.Module):
    """Takes a dict."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, feats):
        return torch.relu(self.bn(self.conv(feats["b"]))) + feats["a"]


class Fuse(nn.Module):
    """Two positional arguments and a keyword with a default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x, y, scale=1.0):
        return self.conv(x) * scale + F.max_pool2d(y, 3, 2, 1)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.split = Split()
        self.merge = Merge()
        self.fuse = Fuse()

    def forward(self, x):
        feats = self.split(x)
        if feats["a"].mean() > 0:
            feats = {k: v * 2 for k, v in feats.items()}
        m = self.merge(feats)
        return self.fuse(m, y=m + 1, scale=0.5)


def test_dict_outputs_dict_inputs_and_keyword_arguments():
    model = randomize_norms(DictModel()).eval()
    x = torch.randn(1, 3, 16, 16)
    inputs = gp.capture_inputs(model, x, ["merge", "fuse"])
    assert isinstance(inputs["merge"][0], dict) and set(inputs["merge"][0]) == {"a", "b"}
    assert len(inputs["fuse"]) == 3 and inputs["fuse"][2] == 0.5  # keywords bound as positionals

    out, report = gp.pipeline(model, x, partial=True)
    assert report.parts == ["split", "merge", "fuse"]
    assert [u.qualname for u in report.untraced] == [""]
    assert [s.qualname for s in report.sites] == ["split.conv", "split.pool", "merge.conv", "fuse.conv", "fuse.max_pool2d"]
    assert all(s.convert for s in report.sites)
    assert all(isinstance(out.get_submodule(q), GraphModule) for q in report.parts)
    with torch.no_grad():
        d0, d1 = model.split(x), out.split(x)
    assert set(d1) == {"a", "b"} and all(max_relative_error(d1[k], d0[k]) <= 1e-5 for k in d0)
    _assert_same(model, out, _inputs((16, 16), (17, 15)))


class TrainOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        f = self.enc(x)
        if self.training:
            return self.aux(f)
        if f.sum() > 0:
            return f
        return -f


def test_part_not_called_in_eval_mode_is_left_unconverted():
    model = randomize_norms(TrainOnly()).eval()
    assert [p.qualname for p in gp.find_parts(model).parts] == ["enc", "aux"]
    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), partial=True)
    assert report.parts == ["enc"]
    assert gp.Untraced("aux", "Sequential", NOT_CALLED) in report.untraced
    assert [u.qualname for u in report.untraced] == ["", "aux"]
    assert type(out.aux) is nn.Sequential and out.aux[0].stride == (2, 2)
    assert all(s.qualname.startswith("enc.") for s in report.sites)
    _assert_same(model, out, _inputs((16, 16), (17, 15)))


class NoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())  # no pool, no strided conv
        self.smooth = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.ReLU())  # a pool, but stride 1

    def forward(self, x):
        f = self.mix(self.enc(x))
        if f.sum() > 0:
            f = self.smooth(f)
        return f


def test_traceable_children_without_sites_are_neither_parts_nor_untraced():
    model = randomize_norms(NoSites()).eval()
    plan = gp.find_parts(model)
    assert "mix" not in [p.qualname for p in plan.parts]
    assert [u.qualname for u in plan.untraced] == [""]

    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), partial=True)
    assert report.parts == ["enc"]
    assert [u.qualname for u in report.untraced] == [""]
    assert type(out.mix) is nn.Sequential and type(out.smooth) is nn.Sequential
    _assert_same(model, out, _inputs((16, 16), (17, 15)))


class Caching(nn.Module):
    """Caches a value from its input on the first call, before untraceable control flow."""

    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = x.shape[-1]
        f = self.enc(x) * (self.cache / x.shape[-1])
        if f.sum() > 0:
            return f
        return -f


def test_attributes_written_while_tracing_are_restored():
    model = Caching().eval()
    fresh = copy.deepcopy(model)
    plan = gp.find_parts(model)
    assert [p.qualname for p in plan.parts] == ["enc"]
    assert [u.qualname for u in plan.untraced] == [""]
    assert model.cache is None
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        actual, expected = model(x), fresh(x)
    assert type(actual) is torch.Tensor and torch.equal(actual, expected)
    assert model.cache == 16


def test_convert_parts_of_a_caching_model_runs():
    model = Caching().eval()
    x = torch.randn(1, 3, 16, 16)
    converted = gp.convert_parts(model, x, lambda gm, args: (gm, None))
    assert [q for q, _ in converted.parts] == ["enc"]
    assert model.cache is None and converted.model.cache == 16  # set by the example forward of the copy
    with torch.no_grad():
        assert torch.equal(converted.model(x), copy.deepcopy(model)(x))


def test_pipeline_partial_of_a_caching_model_leaves_it_usable():
    model = Caching().eval()
    fresh = copy.deepcopy(model)
    x = torch.randn(1, 3, 16, 16)
    out, report = gp.pipeline(model, x, partial=True)
    assert model.cache is None
    assert report.parts == ["enc"]
    with torch.no_grad():
        assert torch.equal(out(x), fresh(x))


def test_factory_pools_are_installed_and_train():
    model = randomize_norms(Branchy()).eval()

    def factory(site):
        return nn.AvgPool2d(site.kernel, site.stride, site.padding, site.ceil_mode, count_include_pad=False)

    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), "exact", factory, partial=True)
    assert report.parts == ["enc", "down"]
    assert report.replaced
    assert all(s.qualname.split(".")[0] in ("enc", "down") for s in report.replaced)
    assert all(s.node.split(":")[0] in ("enc", "down") for s in report.replaced)
    assert not any(isinstance(m, gp.SkipPool2d) for m in out.modules())
    # Every pool left is the factory's (down's own AvgPool2d was a site, replaced too).
    assert sum(type(m) is nn.AvgPool2d for m in out.modules()) == len(report.replaced)

    out.train()
    x = torch.randn(2, 3, 17, 15)
    y = out(x)
    assert y.shape == model(x).shape
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in out.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_without_partial_an_untraceable_model_raises():
    with pytest.raises(gp.TraceError):
        gp.pipeline(Branchy().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(gp.TraceError):
        gp.pipeline(Branchy().eval(), torch.randn(1, 3, 16, 16), partial=False)


def test_traceable_model_with_partial_is_converted_whole():
    model = randomize_norms(Encoder()).eval()
    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), partial=True)
    assert isinstance(out, GraphModule)
    assert report.parts == [""] and report.untraced == []
    assert [s.qualname for s in report.sites] == ["conv", "pool"]
    _assert_same(model, out, _inputs((16, 16), (17, 15)))


def test_torchvision_detection_model_converts_its_backbone():
    detection = pytest.importorskip("torchvision.models.detection")
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=160, max_size=160, box_score_thresh=0.0
    )
    model = randomize_norms(model).eval()
    example = ([torch.rand(3, 160, 160), torch.rand(3, 128, 160)],)
    out, report = gp.pipeline(model, example, partial=True)

    assert report.parts == ["backbone"]
    assert report.untraced[0].qualname == "" and report.untraced[0].type == "FasterRCNN"
    assert report.converted and all(s.qualname.startswith("backbone.") for s in report.sites)
    assert isinstance(out.backbone, GraphModule) and not isinstance(model.backbone, GraphModule)
    assert not any(isinstance(m, gp.SkipPool2d) for m in model.modules())

    model.double()
    out.double()
    x = torch.rand(1, 3, 160, 160, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = model.backbone(x), out.backbone(x)
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].shape == expected[k].shape
        assert max_relative_error(actual[k], expected[k]) <= 1e-10, k

    images = [t.double() for t in example[0]]
    with torch.no_grad():
        expected_dets, actual_dets = model(images), out(images)
    assert len(actual_dets) == 2
    for e, a in zip(expected_dets, actual_dets):
        assert e["boxes"].shape[0] > 0
        assert torch.equal(a["labels"], e["labels"])
        assert max_relative_error(a["boxes"], e["boxes"]) <= 1e-10
        assert max_relative_error(a["scores"], e["scores"]) <= 1e-10


class ShapeIf(nn.Module):
    """An attention-like block: an ``if`` on a value, ``len()`` and ``int()`` of traced sizes; no sites."""

    def __init__(self, c=8):
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.mean() > 10:  # data-dependent control flow
            x = x * 0
        n = len(x)  # len() of a proxy
        h = int(x.shape[-2])  # int() of a proxy
        return self.proj(x).reshape(n, -1, h, x.shape[-1])


class WithStridedInside(nn.Module):
    """An untraceable block whose own child downsamples."""

    def __init__(self, c=8):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return self.down(x) if x.shape[-1] > 0 and bool(x.abs().sum() >= 0) else x


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = ShapeIf()
        self.inner = WithStridedInside()
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.pool(self.inner(self.block(self.stem(x)))))


def test_untraceable_blocks_are_kept_whole_and_the_model_around_them_converts():
    model = randomize_norms(Stack()).eval()
    plan = gp.find_parts(model)
    # One graph for the whole model, the two blocks as leaf nodes; the strided conv inside the
    # second block is a part of its own.
    assert [p.qualname for p in plan.parts] == ["", "inner.down"]
    calls = [n.target for n in plan.parts[0].graph_module.graph.nodes if n.op == "call_module"]
    assert calls == ["stem.0", "stem.1", "stem.2", "block", "inner", "pool", "head"]
    assert [(u.qualname, u.type) for u in plan.untraced] == [("block", "ShapeIf"), ("inner", "WithStridedInside")]
    assert all(u.reason.startswith("kept whole: ") for u in plan.untraced)

    out, report = gp.pipeline(model, torch.randn(2, 3, 16, 16), "exact", None, partial=True)
    assert report.parts == ["", "inner.down"]
    assert [(s.qualname, s.convert) for s in report.sites] == [("stem.0", True), ("pool", True), ("inner.down.0", True)]
    assert isinstance(out, GraphModule) and isinstance(out.get_submodule("inner.down"), GraphModule)
    assert type(out.get_submodule("block")) is ShapeIf
    assert out.get_submodule("stem.0").stride == (1, 1) and out.get_submodule("inner.down.0").stride == (1, 1)
    _assert_same(model, out, _inputs((16, 16), (17, 15)))
    assert model.inner.down[0].stride == (2, 2)  # the model is left as it was


def test_blocks_kept_whole_are_found_one_by_one():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.conv = ShapeIf(3), ShapeIf(3), nn.Conv2d(3, 4, 3, 2)

        def forward(self, x):
            return self.conv(self.b(self.a(x)))

    plan = gp.find_parts(Two())
    assert [p.qualname for p in plan.parts] == [""]
    assert [u.qualname for u in plan.untraced] == ["a", "b"]


class GridEmbed(Encoder):
    """An Encoder with a plain attribute that the Python around it reads (timm's ``grid_size``)."""

    def __init__(self):
        super().__init__()
        self.grid_size = (4, 4)
        self.scale = 0.5


class ReadsItsPartsAttributes(nn.Module):
    """An untraceable forward (``if`` on a tensor) that reads a converted part's attributes."""

    def __init__(self):
        super().__init__()
        self.embed = GridEmbed()

    def forward(self, x):
        f = self.embed(x)
        if f.sum() > 0:
            f = f * self.embed.scale
        return f.flatten(2)[..., : self.embed.grid_size[0] * self.embed.grid_size[1]]


def test_converted_parts_keep_the_attributes_the_model_around_them_reads():
    model = randomize_norms(ReadsItsPartsAttributes()).eval()
    out, report = gp.pipeline(model, torch.randn(1, 3, 16, 16), "exact", None, partial=True)
    assert report.parts == ["embed"]
    assert isinstance(out.embed, GraphModule) and out.embed.get_submodule("conv").stride == (1, 1)
    assert (out.embed.grid_size, out.embed.scale) == ((4, 4), 0.5)
    assert not hasattr(torch.fx.symbolic_trace(model.embed), "grid_size")  # a plain trace loses them
    _assert_same(model, out, _inputs((16, 16), (17, 15)))
    # A GraphModule's deepcopy is rebuilt from its graph: the attributes survive it.
    again = copy.deepcopy(out)
    assert (again.embed.grid_size, again.embed.scale) == ((4, 4), 0.5)
    _assert_same(model, again, _inputs((16, 16)))
    # What the GraphModule has of its own (its forward, its training flag) is its own.
    assert out.embed.forward.__func__ is not GridEmbed.forward and out.embed.training is False
