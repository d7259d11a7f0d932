"""The onnxruntime custom-op library (gfgp_cli/export/ort_kernel.py, csrc/ort_maxent_op.cpp).

A session that registers the library runs each gfgp::MaxEntPool2d/3d node as the fused CPU
kernel: its outputs are the eager op's (the same kernel), onnxruntime runs the node as one kernel
and none of the function body's ops, and bad attributes or inputs fail with a clear message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import gfgp_cli
from gfgp_cli.export import DOMAIN, maxent_pool_function, ort_kernel
from gfgp_cli.ops import cpu

ort = pytest.importorskip("onnxruntime")

_CXX = os.environ.get("CXX", "g++")
pytestmark = pytest.mark.skipif(shutil.which(_CXX) is None,
                                reason=f"no C++ compiler ({_CXX!r} not found): the kernel library cannot be built")

_spec = importlib.util.spec_from_file_location("_one_node", Path(__file__).with_name("_one_node.py"))
assert _spec is not None and _spec.loader is not None
_one_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_one_node)
one_node_model = _one_node.one_node_model

# The ops of the function bodies (windowed and shared-shift forms): none may run with the library.
BODY_OPS = {"Exp", "AveragePool", "Gather", "ReduceMax", "ReduceSum", "ScatterND", "NonZero", "Div"}


def _session(model, kernel: bool = True, profile_dir=None, threads: int = 2):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if kernel:
        ort_kernel.register(options)
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "prof")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _executed(session) -> list:
    """(op type, node name) of each node the (profiling) session ran."""
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return [(e["args"]["op_name"], e["name"][:-len("_kernel_time")]) for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def _executed_ops(session) -> list:
    return [op for op, _ in _executed(session)]


# onnxruntime names the nodes of an inlined function body after the function.
_INLINED = "_inlfunc_MaxEntPool"


def _eager(x, lam, kernel, stride, padding, ceil_mode):
    op = gfgp_cli.maxent_pool3d if len(kernel) == 3 else gfgp_cli.maxent_pool2d
    return op(x, lam, kernel, stride, padding, ceil_mode)


def _lam_shapes(n, c, out):
    ones = [1] * len(out)
    return {"one": [1, 1, *ones], "per-channel": [1, c, *ones], "per-map": [n, c, *ones],
            "per-sample": [n, 1, *ones], "per-window": [n, c, *out]}


# (kernel, stride, padding, ceil_mode, [x shapes]); the second, larger shape of each runs the
# kernel's tasks on onnxruntime's thread pool (>= 2^14 outputs), the first on the calling thread.
GEOMETRIES = [
    ((2, 2), (2, 2), (0, 0), False, [(2, 3, 8, 10), (2, 16, 64, 66)]),
    ((3, 3), (2, 2), (1, 1), False, [(2, 3, 9, 8), (2, 16, 65, 63)]),
    ((2, 2), (2, 2), (0, 0), True, [(2, 3, 7, 9), (2, 16, 65, 63)]),
    ((3, 3), (2, 2), (1, 1), True, [(2, 3, 10, 7), (2, 16, 66, 63)]),
    ((3, 3), (1, 1), (1, 1), False, [(1, 4, 6, 5)]),
    ((1, 2, 2), (1, 2, 2), (0, 0, 0), False, [(2, 3, 3, 7, 9), (2, 8, 4, 33, 33)]),
    ((2, 2, 2), (2, 2, 2), (0, 0, 0), True, [(2, 3, 5, 7, 9), (2, 8, 9, 32, 31)]),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), True, [(1, 2, 5, 6, 7)]),
]


def _geometry_id(g):
    kernel, stride, padding, ceil_mode, _ = g
    return f"k{'x'.join(map(str, kernel))}-s{'x'.join(map(str, stride))}-p{'x'.join(map(str, padding))}" + (
        "-ceil" if ceil_mode else "")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
def test_kernel_equals_the_eager_op_for_every_lam_shape(geometry):
    kernel, stride, padding, ceil_mode, shapes = geometry
    session = _session(one_node_model(kernel, stride, padding, ceil_mode))
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen) * 3
        n, c = shape[:2]
        out = gfgp_cli.maxent_pool3d(x, 1.0, kernel, stride, padding, ceil_mode).shape[2:] if len(kernel) == 3 else \
            gfgp_cli.maxent_pool2d(x, 1.0, kernel, stride, padding, ceil_mode).shape[2:]
        for name, lam_shape in _lam_shapes(n, c, list(out)).items():
            lam = torch.rand(*lam_shape, generator=gen) * 4 - 0.5  # negative lam too (min-like pooling)
            want = _eager(x, lam, kernel, stride, padding, ceil_mode).numpy()
            got = session.run(None, {"x": x.numpy(), "lam": lam.numpy()})[0]
            assert got.shape == want.shape, (shape, name)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"x {shape}, lam {name}")


def test_float64_runs_natively():
    session = _session(one_node_model((3, 3), (2, 2), (1, 1), True, dtype=torch.float64))
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    lam = torch.rand(2, 4, 1, 1, dtype=torch.float64) * 3
    got = session.run(None, {"x": x.numpy(), "lam": lam.numpy()})[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, gfgp_cli.maxent_pool2d(x, lam, 3, 2, 1, True).numpy(), rtol=1e-12, atol=1e-12)


def test_onnxruntime_runs_the_kernel_not_the_function_body(tmp_path):
    model = one_node_model((3, 3), (2, 2), (1, 1), False)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 16, 40, 40), dtype=np.float32),
             "lam": np.full((1, 16, 1, 1), 2.0, np.float32)}
    with_kernel = _session(model, profile_dir=tmp_path / "kernel")
    with_kernel.run(None, feeds)
    assert _executed_ops(with_kernel) == ["MaxEntPool2d"]
    # The same check sees the body when the library is not registered: it can tell the two apart.
    stock = _session(model, kernel=False, profile_dir=tmp_path / "stock")
    stock.run(None, feeds)
    ops = _executed_ops(stock)
    assert "MaxEntPool2d" not in ops and BODY_OPS & set(ops)


def test_exported_model_runs_every_pool_as_the_kernel(tiny_model, tmp_path):
    report = gfgp_cli.export_onnx(tiny_model, tmp_path / "tiny.onnx", image_size=20, verify=False)
    assert report.custom_nodes == 3
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_model(x).numpy()
    session = _session(report.path, profile_dir=tmp_path / "kernel")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    stock = _session(report.path, kernel=False, profile_dir=tmp_path / "stock")
    body = stock.run(None, {stock.get_inputs()[0].name: x.numpy()})[0]
    # The convolutions are onnxruntime's; the pools are the eager op's kernel.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, body, rtol=1e-4, atol=1e-5)
    ran = _executed(session)
    assert [op for op, _ in ran].count("MaxEntPool2d") == 3
    # none of the bodies' nodes ran (the model's own nodes include AveragePool, ReduceSum, Div)
    assert not [name for _, name in ran if _INLINED in name]
    assert "Exp" not in [op for op, _ in ran]
    assert any(_INLINED in name for _, name in _executed(stock))  # which the stock session runs


def _raw_node_model(attrs, dims=2, ranked=True, elem_type=TensorProto.FLOAT):
    """A gfgp node with arbitrary attributes (not checked by onnx) and its function body; inputs
    of unknown rank unless ``ranked`` (so that onnxruntime leaves the rank check to the kernel)."""
    axes = ["h", "w"] if dims == 2 else ["t", "h", "w"]
    node = helper.make_node("MaxEntPool2d" if dims == 2 else "MaxEntPool3d", ["x", "lam"], ["y"], domain=DOMAIN,
                            **attrs)
    graph = helper.make_graph(
        [node], "raw",
        [helper.make_tensor_value_info("x", elem_type, ["n", "c", *axes] if ranked else None),
         helper.make_tensor_value_info("lam", elem_type, ["a", "b", *"pqr"[:dims]] if ranked else None)],
        [helper.make_tensor_value_info("y", elem_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                             functions=[maxent_pool_function(20, dims)], ir_version=10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kernel, stride, padding", [((3, 3), (2, 2), (1, 1)), ((2, 2, 2), (2, 2, 2), (0, 0, 0))],
                         ids=["2d", "3d"])
def test_half_types_are_computed_in_float32_as_the_eager_op(dtype, kernel, stride, padding):
    # A registered library replaces the function's schema: without these types a --fp16 file would not load.
    elem = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}[dtype]
    attrs = {"kernel_shape": list(kernel), "strides": list(stride), "pads": list(padding) * 2, "ceil_mode": 1}
    session = _session(_raw_node_model(attrs, dims=len(kernel), elem_type=elem))
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 9, 7) if len(kernel) == 2 else (2, 3, 5, 9, 7)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    lam = (torch.rand(2, 3, *[1] * len(kernel), generator=gen) * 3).to(dtype)
    want = _eager(x, lam, kernel, stride, padding, True)
    as_np = (lambda t: t.view(torch.int16).numpy().view(np.uint16)) if dtype == torch.bfloat16 else (lambda t: t.numpy())
    # numpy has no bfloat16: the tensors go in and out as their bits, in OrtValues of the ONNX type
    binding = session.io_binding()
    for name, t in (("x", x), ("lam", lam)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(as_np(t), elem))
    got = np.zeros(want.shape, np.uint16)
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(got, elem))
    session.run_with_iobinding(binding)
    np.testing.assert_array_equal(got, as_np(want).view(np.uint16))  # the same bits


@pytest.mark.parametrize("attrs, message", [
    ({"kernel_shape": [3], "strides": [2, 2]}, "kernel_shape must have 2 ints"),
    ({"strides": [2, 2]}, "kernel_shape attribute (2 ints) is missing"),
    ({"kernel_shape": [2, 2], "strides": [0, 2]}, "strides must be between 1 and 1048576"),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1]}, "pads must have 4 ints"),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [2, 0, 2, 0]}, "must be below kernel_shape"),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, -1, 0]}, "pads must be between 0 and 1048576"),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 2}, "ceil_mode must be 0 or 1"),
], ids=["kernel-length", "no-kernel", "stride-0", "pads-length", "pads-too-large", "negative-pad", "ceil-2"])
def test_bad_attributes_fail_the_session_with_a_clear_message(attrs, message):
    with pytest.raises(Exception, match="gfgp::MaxEntPool2d") as info:
        _session(_raw_node_model(attrs))
    assert message in str(info.value)


@pytest.mark.parametrize("x_shape, lam_shape, message", [
    ((2, 3, 8, 8), (2, 3, 3, 3), "does not broadcast to the output shape [2, 3, 4, 4]"),
    ((2, 3, 8, 8), (2, 3, 1), "LAM must be 4-D like X"),
    ((2, 3, 8), (1, 1, 1, 1), "X must be 4-D"),
    ((2, 3, 1, 8), (1, 1, 1, 1), "no window fits"),
], ids=["lam-shape", "lam-rank", "x-rank", "x-too-small"])
def test_bad_inputs_fail_the_run_with_a_clear_message(x_shape, lam_shape, message):
    session = _session(_raw_node_model({"kernel_shape": [2, 2], "strides": [2, 2]}, ranked=False))
    x = np.ones(x_shape, np.float32)
    lam = np.ones(lam_shape, np.float32)
    with pytest.raises(Exception, match="gfgp::MaxEntPool2d") as info:
        session.run(None, {"x": x, "lam": lam})
    assert message in str(info.value)
    # the session survives a bad run
    good = session.run(None, {"x": np.ones((1, 2, 4, 4), np.float32), "lam": np.ones((1, 1, 1, 1), np.float32)})[0]
    np.testing.assert_allclose(good, np.ones((1, 2, 2, 2), np.float32))


def test_library_is_cached_and_named_by_a_hash():
    path = ort_kernel.library_path()
    assert ort_kernel.build_error() is None
    assert path.exists() and path.parent == cpu._cache_dir()
    assert path.name.startswith("ort_maxent_op-") and path.suffix == ".so"
    assert ort_kernel.library_path() == path
