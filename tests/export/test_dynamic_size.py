"""``--dynamic-size``: H and W of the input left dynamic (named ``height`` and ``width``), verified
at two sizes, and the file right at sizes never traced nor verified; refused in one line for a
model whose input size is fixed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gfgp_cli import GFGPPool2d, convert, export_onnx, save
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError
from gfgp_cli.export.runtime import make_session, run_session

SIZE = 20


@pytest.mark.parametrize("inline", [False, True])
def test_dynamic_size_file_runs_at_sizes_never_traced(tiny_model, tmp_path, inline):
    report = export_onnx(tiny_model, tmp_path / "m.onnx", image_size=SIZE, dynamic_size=True, inline=inline)
    assert report.passed and report.dynamic_size and report.input_shape == ["batch", 3, "height", "width"]
    assert set(report.max_abs_diffs) == {f"1@{SIZE}", f"3@{SIZE * 3 // 2}"}  # two batches at two sizes
    dims = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert report.metadata["dynamic_size"] == "true" and json.loads(report.metadata["input_size"]) == [3, SIZE, SIZE]
    session = make_session(report.path, providers=["CPUExecutionProvider"])
    for h, w in ((17, 17), (33, 26), (9, 41)):  # odd, non-square: partial windows and padded taps everywhere
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            want = tiny_model(x).double().numpy()
        got = run_session(session, [x.numpy()])[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_model_with_a_fixed_input_size_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), GFGPPool2d(4, 2), nn.Flatten(), nn.Linear(4 * 7 * 7, 3)).eval()
    with pytest.raises(BadInputError, match="takes no other input size than 16x16.*without --dynamic-size"):
        export_onnx(model, tmp_path / "m.onnx", image_size=16, dynamic_size=True)
    assert not (tmp_path / "m.onnx").exists()
    assert export_onnx(model, tmp_path / "m.onnx", image_size=16).passed  # fixed size: fine


def test_cli_dynamic_size_with_openvino(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'gfgp[export-check]')")
    torch.manual_seed(0)
    save(convert("resnet18", num_classes=10, image_size=16), tmp_path / "r.pt")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "r.pt"), "--onnx", str(tmp_path / "r.onnx"),
                                      "--dynamic-size", "--target", "openvino", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["input_shape"] == ["batch", 3, "height", "width"]
    assert [(c["runtime"], sorted(c["max_abs_diffs"]), c["passed"]) for c in report["checks"]] == [
        ("onnxruntime", ["1@16", "3@24"], True), ("openvino", ["1@16", "3@24"], True)]


def test_same_padded_pools_export_at_a_fixed_size_and_refuse_dynamic_size(tmp_path):
    # A "SAME" pool's GFGP layer computes its padding from the input size; the file fixes it.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), GFGPPool2d(4, 3, 2, padding="same"), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(2, 3, 15, 15))
    converted = convert(model.eval(), pool="skip", image_size=15)
    report = export_onnx(converted, tmp_path / "s.onnx", image_size=15)
    assert report.passed and report.pool_nodes == {"gfgp::MaxEntPool2d": 1}
    with pytest.raises(BadInputError, match=r"--dynamic-size: the pool 1 has 'same' padding.*without --dynamic-size"):
        export_onnx(converted, tmp_path / "d.onnx", image_size=15, dynamic_size=True)
