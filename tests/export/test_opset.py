"""``--opset 17``: the exporter's opset-18 graph converted down by onnx.version_converter, the pool
bodies built at 17 (ReduceMax with its axes as an attribute); below 17 a one-line refusal."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gfgp_cli import convert, export_onnx
from gfgp_cli.errors import BadInputError
from gfgp_cli.export import DOMAIN, supported_opsets
from gfgp_cli.export.proto import all_nodes
from gfgp_cli.export.runtime import make_session, run_session

_spec = importlib.util.spec_from_file_location("_one_node", Path(__file__).with_name("_one_node.py"))
_one_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_one_node)


def test_oldest_supported_opset_is_17():
    assert supported_opsets().start == 17


@pytest.mark.parametrize("kernel, stride, padding, ceil", [((3, 3), (2, 2), (1, 1), True), ((2, 2), (2, 2), (0, 0), False),
                                                           ((1, 2, 2), (1, 2, 2), (0, 0, 0), False)])
def test_the_body_at_17_computes_what_the_body_at_20_does(kernel, stride, padding, ceil):
    shape = (2, 3, *([4] if len(kernel) == 3 else []), 9, 7)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    lam = torch.rand(2, 3, *([1] * len(kernel)), generator=torch.Generator().manual_seed(2)) * 3
    at_17 = _one_node.run_onnx(x, lam, kernel, stride, padding, ceil, opset=17)
    at_20 = _one_node.run_onnx(x, lam, kernel, stride, padding, ceil, opset=20)
    np.testing.assert_array_equal(at_17, at_20)
    body = _one_node.one_node_model(kernel, stride, padding, ceil, opset=17).functions[0]
    (reduce_max,) = [n for n in body.node if n.op_type == "ReduceMax"]
    assert len(reduce_max.input) == 1 and [a.name for a in reduce_max.attribute] == ["axes", "keepdims"]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return convert("resnet18", num_classes=10, image_size=32).eval()  # has a global average pool: ReduceMean


@pytest.mark.parametrize("inline", [False, True])
def test_opset_17_file(resnet, tmp_path, inline):
    report = export_onnx(resnet, tmp_path / "m.onnx", image_size=32, opset=17, inline=inline)
    assert report.opset == 17 and report.passed
    model = onnx.load(report.path)
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} == ({("", 17)} if inline else {("", 17), (DOMAIN, 1)})
    assert all(f.opset_import[0].version == 17 for f in model.functions) and len(model.functions) == (0 if inline else 1)
    # ReduceMean-13 has no noop_with_empty_axes: the converter's leftover is gone
    assert not any(a.name == "noop_with_empty_axes" for n in all_nodes(model) for a in n.attribute)
    assert sum(n.domain == DOMAIN for n in model.graph.node) == (0 if inline else report.maxent_layers)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))  # a batch never verified
    with torch.no_grad():
        want = resnet(x).double().numpy()
    got = run_session(make_session(report.path, providers=["CPUExecutionProvider"]), [x.numpy()])[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_opset_17_in_openvino(resnet, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'gfgp[export-check]')")
    report = export_onnx(resnet, tmp_path / "m.onnx", image_size=32, opset=17, target="openvino")
    assert [c["passed"] for c in report.checks] == [True, True]


def test_below_17_is_refused_in_one_line(resnet, tmp_path):
    with pytest.raises(BadInputError, match=r"opset 16 is not supported: choose one of 17\.\.\d+ .*down to 17"):
        export_onnx(resnet, tmp_path / "m.onnx", image_size=32, opset=16)
