"""Export of the 3-D op (``maxent_pool3d`` on Tensor[N, C, T, H, W]): one ``gfgp::MaxEntPool3d``
node per call, its body a model-local function of standard ops built by the same builder as the
2-D one, run by a stock onnxruntime (CPU provider) and compared with PyTorch.

The first half runs the body alone (a one-node model) against ``gfgp_cli.maxent_pool3d`` computed
in float64 (itself tested against an explicit loop in tests/ops): every geometry kind (the
SpaceToDepth branch of 1x2x2/1x2x2 pools and the gather branch of all others, padding, ceil mode,
odd sizes), every lam shape, adversarial magnitudes. The second half exports small video models
through ``export_onnx`` (the public entry point ``gfgp export`` uses) and checks the file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from torch import nn

from gfgp_cli import GFGPPool2d, GFGPPool3d, MaxEntPool3d, export_onnx, maxent_pool3d
from gfgp_cli.errors import BadInputError, WorkFailedError
from gfgp_cli.export import DOMAIN, OP_TYPE, OP_TYPE_3D, maxent_pool3d_function, maxent_pool_function, supported_opsets
from gfgp_cli.export.checks import DEFAULT_FRAMES, resolve_frames, resolve_in_channels
from gfgp_cli.export.maxent_function import make_maxent_node
from gfgp_cli.export.runtime import make_session, run_session
from gfgp_cli.export.verify import RTOL
from gfgp_cli.ops import pool_output_size

# The one-node models, shared with the 2-D body tests (loaded by path: --import-mode=importlib).
_spec = importlib.util.spec_from_file_location("_one_node", Path(__file__).with_name("_one_node.py"))
_one_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_one_node)
one_node_model, run_onnx = _one_node.one_node_model, _one_node.run_onnx


# --------------------------------------------------------------------------------------------
# the function body alone




LAM_KINDS = ["11111", "1C111", "NC111", "N1111", "NCTHW"]


def make_lam(kind, n, c, out, high, generator, dtype):
    shape = {"11111": (1, 1, 1, 1, 1), "1C111": (1, c, 1, 1, 1), "NC111": (n, c, 1, 1, 1), "N1111": (n, 1, 1, 1, 1),
             "NCTHW": (n, c, *out)}[kind]
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * high).to(dtype)


def out_size(spatial, kernel, stride, padding, ceil_mode):
    return tuple(pool_output_size(*args, ceil_mode) for args in zip(spatial, kernel, stride, padding))


def check_against_torch(x, lam, kernel, stride, padding, ceil_mode, opset=20) -> float:
    """Assert onnxruntime's body == maxent_pool3d (float64 oracle); returns max |diff| / scale."""
    got = run_onnx(x, lam, kernel, stride, padding, ceil_mode, opset)
    want = maxent_pool3d(x.double(), lam.double(), kernel, stride, padding, ceil_mode).numpy()
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    # float32: exp and the division round differently in the two runtimes; scale by |x|.
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    scale = max(1.0, float(x.abs().max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    return float(np.abs(got.astype(np.float64) - want).max()) / scale


GEOMETRIES = [
    # kernel, stride, padding, ceil_mode
    ((2, 2, 2), (2, 2, 2), (0, 0, 0), False),  # the 3-D skip-pool replacement
    ((1, 2, 2), (1, 2, 2), (0, 0, 0), False),  # frame-wise 2x2/2 (the SpaceToDepth branch on even maps)
    ((1, 3, 3), (1, 2, 2), (0, 1, 1), False),  # frame-wise 3x3/2 pad 1 (a video stem pool)
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), True),  # ceil mode with padding, overlap in every dim
    ((2, 3, 1), (1, 2, 1), (1, 1, 0), True),  # a different kernel, stride and padding per dim
    ((3, 2, 2), (3, 2, 2), (0, 1, 0), True),  # ceil mode: partial last windows without padding
    ((1, 1, 1), (2, 1, 2), (0, 0, 0), False),  # subsampling
]


def _geometry_id(g):
    return "k{}s{}p{}{}".format(*("".join(map(str, v)) for v in g[:3]), "c" if g[3] else "")


@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
@pytest.mark.parametrize("size", [(5, 9, 7), (4, 8, 6)], ids=["odd", "even"])
def test_body_matches_torch_on_large_inputs(geometry, lam_kind, size):
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(2, 3, *size, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).float()
    lam = make_lam(lam_kind, 2, 3, out_size(size, kernel, stride, padding, ceil_mode), 100.0, g, torch.float32)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode)


@pytest.mark.parametrize("lam_kind", ["1C111", "NCTHW"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[3]], ids=_geometry_id)
def test_body_matches_torch_in_float64(geometry, lam_kind):
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 3, 5, 8, 7, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    lam = make_lam(lam_kind, 2, 3, out_size((5, 8, 7), kernel, stride, padding, ceil_mode), 100.0, g, torch.float64)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode)


@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("thw", [(3, 8, 10), (1, 8, 10), (4, 8, 9), (2, 7, 10)], ids=["even", "one-frame", "odd-w", "odd-h"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
def test_frame_wise_2x2_space_to_depth_branch_and_its_neighbours(thw, lam_kind, ceil_mode):
    """1x2x2/1x2x2 without padding on even H and W with lam [., ., 1, 1, 1] runs the body's
    SpaceToDepth branch (frames folded into the channels); an odd side or a per-window lam runs
    the gather branch: both against torch."""
    g = torch.Generator().manual_seed(1)
    x = ((torch.rand(2, 3, *thw, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).float()
    geometry = ((1, 2, 2), (1, 2, 2), (0, 0, 0), ceil_mode)
    lam = make_lam(lam_kind, 2, 3, out_size(thw, *geometry), 100.0, g, torch.float32)
    check_against_torch(x, lam, *geometry)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=_geometry_id)
def test_all_very_negative_windows_stay_finite_and_padding_takes_no_part(geometry):
    # lam * x between -1e6 and -1e4 everywhere: exp without the window shift underflows to 0/0.
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(1)
    x = -1e4 - torch.rand(2, 4, 5, 8, 8, generator=g) * 1e4
    lam = torch.full((1, 4, 1, 1, 1), 100.0)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode)
    # With zeros counted, padded windows would move towards 0.
    assert (run_onnx(x, lam, kernel, stride, padding, ceil_mode) <= -1e4 + 1).all()


def test_lam_zero_is_avg_pool3d_over_valid_positions_and_large_lam_is_max_pool3d():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 5, 7, 7, generator=g, dtype=torch.float64)
    geometry = ((3, 3, 3), (2, 2, 2), (1, 1, 1), True)
    avg = F.avg_pool3d(x, *geometry, count_include_pad=False)
    np.testing.assert_allclose(run_onnx(x, torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64), *geometry), avg.numpy(),
                               atol=1e-12)
    mx = F.max_pool3d(x, *geometry[:3], ceil_mode=True)
    np.testing.assert_allclose(run_onnx(x, torch.full((1, 1, 1, 1, 1), 1e4, dtype=torch.float64), *geometry), mx.numpy(),
                               atol=1e-9)


@pytest.mark.parametrize("opset", [supported_opsets().start, 20, supported_opsets().stop - 1])
def test_body_is_standard_ops_at_the_model_opset(opset):
    function = maxent_pool3d_function(opset)
    assert (function.domain, function.name) == (DOMAIN, OP_TYPE_3D) == (DOMAIN, "MaxEntPool3d")
    assert [(o.domain, o.version) for o in function.opset_import] == [("", opset)]
    assert list(function.input) == ["X", "LAM"] and list(function.output) == ["Y"]
    for node in function.node:
        assert node.domain == ""
        onnx.defs.get_schema(node.op_type, opset, "")  # raises if not a standard op at this opset
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 11, 11, generator=g)
    lam = torch.rand(2, 3, 3, 6, 6, generator=g) * 10
    check_against_torch(x, lam, (3, 3, 3), (2, 2, 2), (1, 1, 1), True, opset=opset)


def test_one_builder_makes_both_bodies():
    assert maxent_pool_function(20, 2).name == OP_TYPE and maxent_pool_function(20, 3).name == OP_TYPE_3D
    assert maxent_pool_function(20, 3) == maxent_pool3d_function(20)
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        maxent_pool_function(20, 1)
    with pytest.raises(ValueError, match="opset >= 17"):
        maxent_pool3d_function(16)


def test_node_has_the_3d_op_type_and_three_element_attributes():
    node = make_maxent_node("x", "lam", "y", (1, 3, 3), (1, 2, 2), (0, 1, 1), True, name="pool")
    assert (node.domain, node.op_type, node.name) == (DOMAIN, OP_TYPE_3D, "pool")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # ONNX pads: every dim's begin, then every dim's end
    assert attrs == {"kernel_shape": [1, 3, 3], "strides": [1, 2, 2], "pads": [0, 1, 1, 0, 1, 1], "ceil_mode": 1}
    with pytest.raises(ValueError, match="differ in length"):
        make_maxent_node("x", "lam", "y", (1, 3, 3), (1, 2), (0, 1, 1), False)


@pytest.mark.parametrize("thw", [(1, 1, 1), (3, 1, 2), (2, 2, 1), (4, 2, 2)])
def test_static_shapes_including_one_pixel_maps_load_and_match_torch(thw):
    """With static shapes, shape inference also visits the SpaceToDepth branch for maps it does
    not take; its frames-into-channels fold and a 1-pixel side must not make the model invalid."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, *thw, generator=g)
    lam = torch.rand(1, 2, 1, 1, 1, generator=g) * 4
    for geometry in (((1, 2, 2), (1, 2, 2), (0, 0, 0), True), ((2, 2, 2), (2, 2, 2), (0, 0, 0), True)):
        model = one_node_model(*geometry, x_shape=x.shape, lam_shape=lam.shape)
        session = make_session(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = run_session(session, [x.numpy(), lam.numpy()])[0]
        torch.testing.assert_close(torch.from_numpy(got), maxent_pool3d(x, lam, *geometry), rtol=1e-5, atol=1e-6)


def test_attribute_defaults_no_padding_floor_mode():
    # pads and ceil_mode may be left out of a hand-written node (function attribute defaults).
    node = helper.make_node(OP_TYPE_3D, ["x", "lam"], ["y"], domain=DOMAIN, kernel_shape=[2, 2, 2], strides=[2, 2, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5, 5]),
                                            helper.make_tensor_value_info("lam", TensorProto.FLOAT, [1, 1, 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[maxent_pool3d_function(20)], ir_version=10)
    x, lam = torch.randn(1, 1, 5, 5, 5), torch.full((1, 1, 1, 1, 1), 3.0)
    session = make_session(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(run_session(session, [x.numpy(), lam.numpy()])[0], maxent_pool3d(x, lam, 2).numpy(), atol=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)),
    size=st.tuples(st.integers(3, 6), st.integers(3, 7), st.integers(3, 7)),
    ceil_mode=st.booleans(), lam_kind=st.sampled_from(LAM_KINDS), seed=st.integers(0, 2**16),
)
def test_body_matches_torch_on_random_geometry(kernel, stride, padding, size, ceil_mode, lam_kind, seed):
    padding = tuple(min(p, k // 2) for p, k in zip(padding, kernel))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64) * 50
    lam = make_lam(lam_kind, 2, 3, out_size(size, kernel, stride, padding, ceil_mode), 20.0, g, torch.float64)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode)


# --------------------------------------------------------------------------------------------
# export_onnx on small video models


class GapLamPool(nn.Module):
    """A direct call of maxent_pool3d, lam from a GAP over (T, H, W): Tensor[N, C, 1, 1, 1]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lam_conv = nn.Conv3d(channels, channels, 1)

    def forward(self, x):
        lam = torch.sigmoid(self.lam_conv(x.mean(dim=(2, 3, 4), keepdim=True))) * 4
        return maxent_pool3d(x, lam, (1, 3, 3), (1, 2, 2), (0, 1, 1))


class PerWindowPool(nn.Module):
    """A direct call of maxent_pool3d with one lam per output window (lam Tensor[N, C, ot, oh, ow])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lam_conv = nn.Conv3d(channels, channels, 1)

    def forward(self, x):
        lam = torch.sigmoid(F.avg_pool3d(self.lam_conv(x), 3, 2, 1, ceil_mode=True)) * 4
        return maxent_pool3d(x, lam, 3, 2, 1, ceil_mode=True)


class TinyVideoNet(nn.Module):
    """conv3d -> GAP-lam 1x3x3/1x2x2 -> GFGP3d 2x2x2/2 -> MaxEnt3d 1x2x2 -> per-window 3x3x3/2 ceil -> GAP -> fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.pool1 = GapLamPool(8)
        self.pool2 = GFGPPool3d(8, (2, 2, 2), 2)
        self.pool3 = MaxEntPool3d(8, (1, 2, 2), ceil_mode=True, init=1.0)
        self.pool4 = PerWindowPool(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.pool4(self.pool3(self.pool2(self.pool1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3, 4)))


EXPECTED_ATTRIBUTES = [
    {"kernel_shape": [1, 3, 3], "strides": [1, 2, 2], "pads": [0, 1, 1, 0, 1, 1], "ceil_mode": 0},
    {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2], "pads": [0, 0, 0, 0, 0, 0], "ceil_mode": 0},
    {"kernel_shape": [1, 2, 2], "strides": [1, 2, 2], "pads": [0, 0, 0, 0, 0, 0], "ceil_mode": 1},
    {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2], "pads": [1, 1, 1, 1, 1, 1], "ceil_mode": 1},
]
FRAMES, SIZE = 6, 24


def tiny_video_net(seed: int = 0) -> TinyVideoNet:
    torch.manual_seed(seed)
    model = TinyVideoNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def video_export(tmp_path_factory):
    """(model, ExportReport) of TinyVideoNet exported at 6 x 24 x 24, dynamic batch, verified."""
    model = tiny_video_net()
    report = export_onnx(model, tmp_path_factory.mktemp("video") / "video.onnx", image_size=SIZE, frames=FRAMES)
    return model, report


def test_every_3d_pool_is_one_maxentpool3d_node_with_its_attributes(video_export):
    _, report = video_export
    model = onnx.load(report.path)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert report.custom_nodes == report.maxent_layers == len(nodes) == 4
    assert [(n.domain, n.op_type) for n in nodes] == [(DOMAIN, "MaxEntPool3d")] * 4
    assert report.pool_nodes == {"gfgp::MaxEntPool3d": 4}
    assert [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes] == EXPECTED_ATTRIBUTES
    # Everything else is standard ONNX; the GFGP lam comes out of a plain Sigmoid.
    assert all(n.domain == "" for n in model.graph.node if n not in nodes)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[nodes[1].input[1]].op_type == "Sigmoid"
    # Only the body the graph uses ships, once, at the model's opset.
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "MaxEntPool3d")]
    assert [(o.domain, o.version) for o in model.functions[0].opset_import] == [("", report.opset)]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", report.opset), (DOMAIN, 1)}
    onnx.checker.check_model(report.path, full_check=True)


def test_video_export_verifies_at_two_batch_sizes_with_a_dynamic_batch(video_export):
    model, report = video_export
    assert report.passed is True and report.provider == "CPUExecutionProvider"
    assert sorted(report.max_abs_diffs) == [1, 3] and all(0 <= d <= report.tolerance for d in report.max_abs_diffs.values())
    assert report.dynamic_batch and report.input_shape == ["batch", 3, FRAMES, SIZE, SIZE]
    dims = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, FRAMES, SIZE, SIZE]
    # a batch never traced or verified, in a plain CPU session
    x = torch.randn(5, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(x).numpy()
    got = run_session(make_session(report.path, providers=["CPUExecutionProvider"]), [x.numpy()])[0]
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
    d = report.to_dict()
    assert d["pool_nodes"] == {"gfgp::MaxEntPool3d": 4} and d["input_shape"] == ["batch", 3, FRAMES, SIZE, SIZE]


def test_video_export_inlined_and_static(tmp_path):
    model = tiny_video_net()
    inlined = export_onnx(model, tmp_path / "i.onnx", image_size=SIZE, frames=FRAMES, inline=True,
                          dynamic_batch=False, batch_size=2)
    proto = onnx.load(inlined.path)
    assert inlined.passed and inlined.custom_nodes == 0 and inlined.maxent_layers == 4
    assert all(n.domain == "" for n in proto.graph.node) and not proto.functions
    assert inlined.input_shape == [2, 3, FRAMES, SIZE, SIZE] and list(inlined.max_abs_diffs) == [2]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 3, FRAMES, SIZE, SIZE]


class MixedNet(nn.Module):
    """A 3-D pool, then the frames folded into the channels and a 2-D pool: both node types."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.pool3d = GFGPPool3d(4, (1, 2, 2))
        self.pool2d = GFGPPool2d(4 * 4, 3, 2, 1)

    def forward(self, x):
        x = self.pool3d(self.conv(x))
        return self.pool2d(x.flatten(1, 2))


def test_a_model_with_2d_and_3d_pools_gets_both_bodies_and_counts(tmp_path):
    from gfgp_cli.console import out
    from gfgp_cli.export.render import render_export

    report = export_onnx(MixedNet().eval(), tmp_path / "mixed.onnx", image_size=12, frames=4)
    assert report.passed and report.custom_nodes == report.maxent_layers == 2
    assert report.pool_nodes == {"gfgp::MaxEntPool2d": 1, "gfgp::MaxEntPool3d": 1}
    model = onnx.load(report.path)
    assert [n.op_type for n in model.graph.node if n.domain == DOMAIN] == ["MaxEntPool3d", "MaxEntPool2d"]
    assert [f.name for f in model.functions] == ["MaxEntPool2d", "MaxEntPool3d"]
    with out.capture() as captured:
        render_export(report)
    text = captured.get()
    for expected in ("gfgp::MaxEntPool2d nodes", "gfgp::MaxEntPool3d nodes", "(batch, 3, 4, 12, 12)", "PASS"):
        assert expected in text


def test_frames_default_for_a_video_model_and_checks(tmp_path):
    video, image = tiny_video_net(), nn.Sequential(nn.Conv2d(3, 4, 3), GFGPPool2d(4, 2))
    assert resolve_frames(video, None) == DEFAULT_FRAMES == 16 and resolve_frames(image, None) is None
    assert resolve_frames(image, 4) == 4  # the caller says it takes clips
    assert resolve_in_channels(video, 16) == 3 and resolve_in_channels(nn.Conv3d(5, 2, 1), 4) == 5
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(BadInputError, match="frames must be a positive int"):
            export_onnx(video, tmp_path / "m.onnx", image_size=SIZE, frames=bad)
    # 1 frame: the stem keeps T = 1, and the 2x2x2 pool cannot take it
    with pytest.raises(BadInputError, match="cannot take a 3x1x24x24 input.*number of frames"):
        export_onnx(video, tmp_path / "m.onnx", image_size=SIZE, frames=1)
    assert not (tmp_path / "m.onnx").exists()


class _DiffersInExport(nn.Module):
    """Computes something else while being exported: the verification must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = GFGPPool3d(3, (1, 2, 2))

    def forward(self, x):
        y = self.pool(x)
        return y * 1.01 if torch.onnx.is_in_onnx_export() else y


def test_a_mismatch_of_a_video_model_fails_the_work_and_keeps_the_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(WorkFailedError, match="differs from PyTorch"):
        export_onnx(_DiffersInExport().eval(), path, image_size=8, frames=2)
    assert path.exists()


def test_bench_export_of_a_video_model():
    from gfgp_cli.export import bench_export

    result = bench_export(MixedNet().eval(), batch=2, image_size=12, repeats=2, warmup=1, frames=4)
    assert result.torch_ms > 0 and result.ort_ms > 0
    assert result.max_abs_diff < 1e-4 and result.maxent_layers == 2


def test_default_frames_are_the_zoo_clip_length():
    from gfgp_cli.zoo import VIDEO_FRAMES

    assert DEFAULT_FRAMES == VIDEO_FRAMES


@pytest.mark.slow
def test_converted_r3d_18_checkpoint_exports_through_the_cli_at_its_spec_clip(tmp_path):
    """``gfgp export`` of a converted torchvision video model: the clip (T, size) comes from the
    checkpoint's spec, every GFGP layer is one gfgp::MaxEntPool3d node, and it verifies."""
    import json

    from click.testing import CliRunner

    from gfgp_cli import convert, save
    from gfgp_cli.cli import cli

    model = convert("r3d_18", num_classes=10, image_size=32, frames=4)
    layers = sum(isinstance(m, GFGPPool3d) for m in model.modules())
    assert layers > 0
    save(model, tmp_path / "r3d.pt")
    out = tmp_path / "r3d.onnx"
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "r3d.pt"), "--onnx", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["input_shape"] == ["batch", 3, 4, 32, 32]
    assert report["custom_nodes"] == report["maxent_layers"] == layers
    assert report["pool_nodes"] == {"gfgp::MaxEntPool3d": layers}
    assert sum(n.op_type == "MaxEntPool3d" and n.domain == DOMAIN for n in onnx.load(out).graph.node) == layers
