"""The ONNX body of gfgp::MaxEntPool2d (a model-local function of standard ops) against torch's op.

Each case builds a one-node ONNX model (the custom node plus its function) and runs it in a stock
onnxruntime; the oracle is ``gfgp_cli.maxent_pool2d``, computed in float64 (itself tested against
an explicit loop in tests/ops). Inputs are adversarial: |x| up to 1e4, lam up to 100, windows
whose lam*x are all far below zero, padding, ceil mode, overlapping windows, every lam shape.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from gfgp_cli import maxent_pool2d
from gfgp_cli.export import DOMAIN, OP_TYPE, maxent_pool2d_function, maxent_pool_function, supported_opsets
from gfgp_cli.export.runtime import make_session, run_session
from gfgp_cli.ops import pool_output_size

# The one-node models, shared with the 3-D body tests (loaded by path: --import-mode=importlib).
_spec = importlib.util.spec_from_file_location("_one_node", Path(__file__).with_name("_one_node.py"))
_one_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_one_node)
one_node_model, run_onnx = _one_node.one_node_model, _one_node.run_onnx




def make_lam(kind, n, c, out_hw, high, generator, dtype):
    shape = {"1111": (1, 1, 1, 1), "1C11": (1, c, 1, 1), "NC11": (n, c, 1, 1), "N111": (n, 1, 1, 1),
             "NCHW": (n, c, *out_hw)}[kind]
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * high).to(dtype)


def check_against_torch(x, lam, kernel, stride, padding, ceil_mode, opset=20, shared_lam=False):
    if shared_lam and x.dtype != torch.float32:  # its AveragePool is float32 only in onnxruntime
        x, lam = x.float(), lam.float()
    got = run_onnx(x, lam, kernel, stride, padding, ceil_mode, opset, shared_lam)
    want = maxent_pool2d(x.double(), lam.double(), kernel, stride, padding, ceil_mode).numpy()
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    # float32: exp and the division round differently in the two runtimes; scale by |x|.
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    scale = max(1.0, float(x.abs().max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


LAM_KINDS = ["1111", "1C11", "NC11", "N111", "NCHW"]
# (lam kind, shared_lam): the windowed body takes every lam shape, the shared-shift body one lam per map
BODIES = [(kind, False) for kind in LAM_KINDS] + [(kind, True) for kind in LAM_KINDS if kind != "NCHW"]
BODY_IDS = [f"{kind}-{'shared' if shared else 'windowed'}" for kind, shared in BODIES]
SHARED = pytest.mark.parametrize("shared_lam", [False, True], ids=["windowed", "shared"])
GEOMETRIES = [
    # kernel, stride, padding, ceil_mode
    ((2, 2), (2, 2), (0, 0), False),  # GFGP's skip-pool replacement
    ((3, 3), (2, 2), (1, 1), False),  # the ResNet stem pool: padding, overlap
    ((3, 3), (2, 2), (1, 1), True),  # ceil mode with padding
    ((3, 3), (1, 1), (1, 1), False),  # heavy overlap
    ((2, 3), (1, 2), (1, 0), True),  # rectangular everything
    ((3, 2), (3, 2), (0, 1), True),  # ceil mode: a partial last window without padding
    ((1, 1), (2, 2), (0, 0), False),  # subsampling
]


@pytest.mark.parametrize("lam_kind, shared_lam", BODIES, ids=BODY_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}{}".format(*g[:3], "c" if g[3] else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1e4, 1.0], ids=["x1e4", "x1"])
def test_body_matches_torch_on_large_inputs(geometry, lam_kind, shared_lam, dtype, scale):
    """|x| up to 1e4 and lam up to 100: the shared-shift body recomputes every map by windows;
    |x| up to 1 and lam up to 1: it pools them all by AveragePool."""
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(2, 3, 9, 10, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype)
    out_hw = tuple(pool_output_size(s, k, st_, p, ceil_mode) for s, k, st_, p in zip((9, 10), kernel, stride, padding))
    lam = make_lam(lam_kind, 2, 3, out_hw, 100.0 if scale > 1 else 1.0, g, dtype)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode, shared_lam=shared_lam)


@SHARED
@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=lambda g: "k{}s{}p{}{}".format(*g[:3], "c" if g[3] else ""))
def test_all_very_negative_windows_stay_finite(geometry, shared_lam):
    # lam * x between -1e6 and -1e4 everywhere: exp without the window shift underflows to 0/0.
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(1)
    x = -1e4 - torch.rand(2, 4, 8, 8, generator=g) * 1e4
    lam = torch.full((1, 4, 1, 1), 100.0)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode, shared_lam=shared_lam)
    # The padding must not take part: with zeros counted, padded windows would move towards 0.
    got = run_onnx(x, lam, kernel, stride, padding, ceil_mode, shared_lam=shared_lam)
    assert (got <= -1e4 + 1).all()


@SHARED
def test_lam_zero_is_average_over_valid_positions_and_large_lam_is_max(shared_lam):
    g = torch.Generator().manual_seed(2)
    dtype = torch.float32 if shared_lam else torch.float64
    x = torch.randn(1, 2, 7, 7, generator=g, dtype=dtype)
    atol = 1e-6 if shared_lam else 1e-12
    geometry = ((3, 3), (2, 2), (1, 1), True)
    avg = torch.nn.functional.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
    np.testing.assert_allclose(run_onnx(x, torch.zeros(1, 1, 1, 1, dtype=dtype), *geometry, shared_lam=shared_lam),
                               avg.numpy(), atol=atol)
    mx = torch.nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True)
    np.testing.assert_allclose(run_onnx(x, torch.full((1, 1, 1, 1), 1e4, dtype=dtype), *geometry,
                                        shared_lam=shared_lam), mx.numpy(), atol=atol * 1e3)


@SHARED
@pytest.mark.parametrize("opset", [supported_opsets().start, 20, supported_opsets().stop - 1])
def test_body_is_standard_ops_at_the_model_opset(opset, shared_lam):
    function = maxent_pool_function(opset, 2, shared_lam=shared_lam)
    assert (function.domain, function.name) == (DOMAIN, OP_TYPE)
    assert [(o.domain, o.version) for o in function.opset_import] == [("", opset)]
    for node in function.node:
        assert node.domain == ""
        onnx.defs.get_schema(node.op_type, opset, "")  # raises if not a standard op at this opset
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 11, 11, generator=g)
    lam = torch.rand(2, 3, *((1, 1) if shared_lam else (6, 6)), generator=g) * 10
    check_against_torch(x, lam, (3, 3), (2, 2), (1, 1), True, opset=opset, shared_lam=shared_lam)


@pytest.mark.parametrize("lam_kind, shared_lam", BODIES, ids=BODY_IDS)
@pytest.mark.parametrize("hw", [(8, 10), (8, 9), (7, 10)], ids=["even", "odd-w", "odd-h"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_2x2_stride_2_space_to_depth_branch_and_its_neighbours(hw, lam_kind, shared_lam, ceil_mode, dtype):
    """2x2/2 with no padding on an even map and lam [., ., 1, 1] runs the body's SpaceToDepth
    branch; an odd side or a per-window lam runs the gather branch: both against torch."""
    g = torch.Generator().manual_seed(1)
    x = ((torch.rand(2, 3, *hw, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).to(dtype)
    out_hw = tuple(pool_output_size(s, 2, 2, 0, ceil_mode) for s in hw)
    lam = make_lam(lam_kind, 2, 3, out_hw, 100.0, g, dtype)
    check_against_torch(x, lam, (2, 2), (2, 2), (0, 0), ceil_mode, shared_lam=shared_lam)
    check_against_torch(x / 1e4, lam / 100, (2, 2), (2, 2), (0, 0), ceil_mode, shared_lam=shared_lam)


@SHARED
@pytest.mark.parametrize("hw", [(1, 1), (1, 3), (3, 1)])
def test_static_maps_of_one_pixel_load_and_match_torch(hw, shared_lam):
    """With static shapes, shape inference also visits the SpaceToDepth branch for maps it does
    not take; a 1-pixel side makes that branch's H / 2 = 0, which its Reshape once read as "copy
    the input's dimension 4" and onnxruntime refused the whole model (gfgp export --static of a
    model converted at 16 px)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, *hw, generator=g)
    lam = torch.rand(1, 2, 1, 1, generator=g) * 4
    model = one_node_model((2, 2), (2, 2), (0, 0), True, x_shape=x.shape, lam_shape=lam.shape, shared_lam=shared_lam)
    session = make_session(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = run_session(session, [x.numpy(), lam.numpy()])[0]
    torch.testing.assert_close(torch.from_numpy(got), maxent_pool2d(x, lam, 2, 2, 0, True), rtol=1e-5, atol=1e-6)


def test_attribute_defaults_no_padding_floor_mode():
    # pads and ceil_mode may be left out of a hand-written node (function attribute defaults).
    node = helper.make_node(OP_TYPE, ["x", "lam"], ["y"], domain=DOMAIN, kernel_shape=[2, 2], strides=[2, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5]),
                                            helper.make_tensor_value_info("lam", TensorProto.FLOAT, [1, 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[maxent_pool2d_function(20)], ir_version=10)
    x, lam = torch.randn(1, 1, 5, 5), torch.full((1, 1, 1, 1), 3.0)
    got = run_session(make_session(model.SerializeToString(), providers=["CPUExecutionProvider"]), [x.numpy(), lam.numpy()])[0]
    np.testing.assert_allclose(got, maxent_pool2d(x, lam, 2).numpy(), atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
    ph=st.integers(0, 2), pw=st.integers(0, 2), ceil_mode=st.booleans(),
    h=st.integers(4, 9), w=st.integers(4, 9), body=st.sampled_from(BODIES), seed=st.integers(0, 2**16),
    scale=st.sampled_from([50.0, 0.5]),
)
def test_body_matches_torch_on_random_geometry(kh, kw, sh, sw, ph, pw, ceil_mode, h, w, body, seed, scale):
    """Both bodies; x * 50 (the shared-shift body recomputes most maps by windows) or x * 0.5 (few)."""
    lam_kind, shared_lam = body
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    out_hw = (pool_output_size(h, kh, sh, ph, ceil_mode), pool_output_size(w, kw, sw, pw, ceil_mode))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) * scale
    lam = make_lam(lam_kind, 2, 3, out_hw, 20.0, g, torch.float64)
    check_against_torch(x, lam, (kh, kw), (sh, sw), (ph, pw), ceil_mode, shared_lam=shared_lam)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=lambda g: "k{}s{}p{}{}".format(*g[:3], "c" if g[3] else ""))
def test_shared_shift_body_on_maps_each_side_of_its_threshold(geometry):
    """One batch whose maps put one window d below the map's largest lam x, for d from 5 to 5000:
    small d is pooled by AveragePool with the map's shift, large d (whose weights there would
    underflow: 0/0) is recomputed by windows; near the threshold (ln 1e20 = 46) both sides occur.
    Every map must match torch, which shifts each window by its own maximum."""
    kernel, stride, padding, ceil_mode = geometry
    gaps = [5.0, 20.0, 40.0, 44.0, 46.0, 48.0, 60.0, 85.0, 100.0, 200.0, 5000.0]
    g = torch.Generator().manual_seed(5)
    x = torch.rand(len(gaps), 2, 8, 8, generator=g, dtype=torch.float64)  # lam x in [0, 1] ...
    for i, gap in enumerate(gaps):
        x[i, 0, 6:, 6:] -= gap  # ... except one corner window of channel 0, d below the map's maximum
    x = x.float()
    lam = torch.ones(1, 1, 1, 1)
    got = run_onnx(x, lam, kernel, stride, padding, ceil_mode, shared_lam=True)
    want = maxent_pool2d(x.double(), lam.double(), kernel, stride, padding, ceil_mode).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * 5000)
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=0, atol=2e-6)
    corner = (slice(None), 0, -1, -1)  # the far window: its own softmax, not 0/0 or the map's shift
    np.testing.assert_allclose(got[corner], want[corner], rtol=1e-6, atol=2e-6)


def test_the_bodies_differ_and_the_shared_one_pools_by_average_pool():
    windowed, shared = maxent_pool_function(20, 2), maxent_pool_function(20, 2, shared_lam=True)
    assert (windowed.domain, windowed.name) == (shared.domain, shared.name) == (DOMAIN, OP_TYPE)
    ops = [n.op_type for n in shared.node]
    assert ops.count("AveragePool") == 2 and "ScatterND" in ops and "NonZero" in ops
    assert "AveragePool" not in [n.op_type for n in windowed.node]
    assert "one per map" in shared.doc_string and "broadcastable" in windowed.doc_string
