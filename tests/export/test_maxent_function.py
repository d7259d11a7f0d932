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
from gfgp_cli.export import DOMAIN, OP_TYPE, maxent_pool2d_function, supported_opsets
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


def check_against_torch(x, lam, kernel, stride, padding, ceil_mode, opset=20):
    got = run_onnx(x, lam, kernel, stride, padding, ceil_mode, opset)
    want = maxent_pool2d(x.double(), lam.double(), kernel, stride, padding, ceil_mode).numpy()
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    # float32: exp and the division round differently in the two runtimes; scale by |x|.
    tol = 1e-12 if x.dtype == torch.float64 else 2e-6
    scale = max(1.0, float(x.abs().max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


LAM_KINDS = ["1111", "1C11", "NC11", "N111", "NCHW"]
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


@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}{}".format(*g[:3], "c" if g[3] else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_body_matches_torch_on_large_inputs(geometry, lam_kind, dtype):
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(2, 3, 9, 10, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).to(dtype)
    out_hw = tuple(pool_output_size(s, k, st_, p, ceil_mode) for s, k, st_, p in zip((9, 10), kernel, stride, padding))
    lam = make_lam(lam_kind, 2, 3, out_hw, 100.0, g, dtype)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=lambda g: "k{}s{}p{}{}".format(*g[:3], "c" if g[3] else ""))
def test_all_very_negative_windows_stay_finite(geometry):
    # lam * x between -1e6 and -1e4 everywhere: exp without the window shift underflows to 0/0.
    kernel, stride, padding, ceil_mode = geometry
    g = torch.Generator().manual_seed(1)
    x = -1e4 - torch.rand(2, 4, 8, 8, generator=g) * 1e4
    lam = torch.full((1, 4, 1, 1), 100.0)
    check_against_torch(x, lam, kernel, stride, padding, ceil_mode)
    # The padding must not take part: with zeros counted, padded windows would move towards 0.
    got = run_onnx(x, lam, kernel, stride, padding, ceil_mode)
    assert (got <= -1e4 + 1).all()


def test_lam_zero_is_average_over_valid_positions_and_large_lam_is_max():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64)
    avg = torch.nn.functional.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
    np.testing.assert_allclose(run_onnx(x, torch.zeros(1, 1, 1, 1, dtype=torch.float64), (3, 3), (2, 2), (1, 1), True),
                               avg.numpy(), atol=1e-12)
    mx = torch.nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True)
    np.testing.assert_allclose(run_onnx(x, torch.full((1, 1, 1, 1), 1e4, dtype=torch.float64), (3, 3), (2, 2), (1, 1), True),
                               mx.numpy(), atol=1e-9)


@pytest.mark.parametrize("opset", [supported_opsets().start, 20, supported_opsets().stop - 1])
def test_body_is_standard_ops_at_the_model_opset(opset):
    function = maxent_pool2d_function(opset)
    assert (function.domain, function.name) == (DOMAIN, OP_TYPE)
    assert [(o.domain, o.version) for o in function.opset_import] == [("", opset)]
    for node in function.node:
        assert node.domain == ""
        onnx.defs.get_schema(node.op_type, opset, "")  # raises if not a standard op at this opset
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 11, 11, generator=g)
    lam = torch.rand(2, 3, 6, 6, generator=g) * 10
    check_against_torch(x, lam, (3, 3), (2, 2), (1, 1), True, opset=opset)


@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("hw", [(8, 10), (8, 9), (7, 10)], ids=["even", "odd-w", "odd-h"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_2x2_stride_2_space_to_depth_branch_and_its_neighbours(hw, lam_kind, ceil_mode, dtype):
    """2x2/2 with no padding on an even map and lam [., ., 1, 1] runs the body's SpaceToDepth
    branch; an odd side or a per-window lam runs the gather branch: both against torch."""
    g = torch.Generator().manual_seed(1)
    x = ((torch.rand(2, 3, *hw, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).to(dtype)
    out_hw = tuple(pool_output_size(s, 2, 2, 0, ceil_mode) for s in hw)
    lam = make_lam(lam_kind, 2, 3, out_hw, 100.0, g, dtype)
    check_against_torch(x, lam, (2, 2), (2, 2), (0, 0), ceil_mode)


@pytest.mark.parametrize("hw", [(1, 1), (1, 3), (3, 1)])
def test_static_maps_of_one_pixel_load_and_match_torch(hw):
    """With static shapes, shape inference also visits the SpaceToDepth branch for maps it does
    not take; a 1-pixel side makes that branch's H / 2 = 0, which its Reshape once read as "copy
    the input's dimension 4" and onnxruntime refused the whole model (gfgp export --static of a
    model converted at 16 px)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, *hw, generator=g)
    lam = torch.rand(1, 2, 1, 1, generator=g) * 4
    model = one_node_model((2, 2), (2, 2), (0, 0), True, x_shape=x.shape, lam_shape=lam.shape)
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
    h=st.integers(4, 9), w=st.integers(4, 9), lam_kind=st.sampled_from(LAM_KINDS), seed=st.integers(0, 2**16),
)
def test_body_matches_torch_on_random_geometry(kh, kw, sh, sw, ph, pw, ceil_mode, h, w, lam_kind, seed):
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    out_hw = (pool_output_size(h, kh, sh, ph, ceil_mode), pool_output_size(w, kw, sw, pw, ceil_mode))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) * 50
    lam = make_lam(lam_kind, 2, 3, out_hw, 20.0, g, torch.float64)
    check_against_torch(x, lam, (kh, kw), (sh, sw), (ph, pw), ceil_mode)
