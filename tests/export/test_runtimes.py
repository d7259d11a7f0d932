"""``gfgp export --verify-with onnxruntime,openvino`` and ``--target openvino``: each chosen runtime
runs the written file and is judged and reported on its own; a mismatch in any exits 1; OpenVINO
gets the inline form (it reads no model-local functions), and its absence is one line naming the
extra that installs it."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from gfgp_cli import convert, export_onnx, save
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError, WorkFailedError
from gfgp_cli.export import DOMAIN
from gfgp_cli.export import runtime as runtime_module

SIZE = 20


def _openvino():
    return pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'gfgp[export-check]')")


def test_target_openvino_writes_the_inline_form_and_verifies_in_both(tiny_model, tmp_path):
    ov = _openvino()
    report = export_onnx(tiny_model, tmp_path / "m.onnx", image_size=SIZE, target="openvino")
    assert report.inline and report.custom_nodes == 0 and report.target == "openvino"
    assert "OpenVINO reads no model-local functions" in report.form_note
    assert [(c["runtime"], c["provider"], c["passed"]) for c in report.checks] == [
        ("onnxruntime", "CPUExecutionProvider", True), ("openvino", "CPU", True)]
    assert all(n.domain != DOMAIN for n in onnx.load(report.path).graph.node)
    # The oracle: OpenVINO compiled here, on an input no verification used, against PyTorch.
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = tiny_model(x).double().numpy()
    compiled = ov.Core().compile_model(ov.Core().read_model(report.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled([x.numpy()])[compiled.outputs[0]]
    assert np.abs(got - want).max() <= report.tolerance


def test_a_mismatch_in_one_runtime_fails_and_names_it(tiny_model, tmp_path, monkeypatch):
    _openvino()
    real = runtime_module.openvino_runner

    def off_by_a_tenth(path):
        run, device = real(path)
        return (lambda xs: [y + 0.1 for y in run(xs)]), device

    monkeypatch.setattr(runtime_module, "openvino_runner", off_by_a_tenth)
    with pytest.raises(WorkFailedError) as info:
        export_onnx(tiny_model, tmp_path / "m.onnx", image_size=SIZE, inline=True,
                    verify_with=["onnxruntime", "openvino"])
    message = str(info.value)
    assert "openvino (CPU) differs from PyTorch float64" in message and "onnxruntime" not in message.split(";")[0]
    assert "kept at" in message


def test_openvino_on_the_default_form_is_refused_before_any_work(tiny_model, tmp_path):
    with pytest.raises(BadInputError, match="--target openvino"):
        export_onnx(tiny_model, tmp_path / "m.onnx", image_size=SIZE, verify_with=["openvino"])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("names, needle", [(["tensorrt"], "'tensorrt' is not a runtime"), ([" "], "names no runtime")])
def test_unknown_runtimes_are_bad_input(tiny_model, tmp_path, names, needle):
    with pytest.raises(BadInputError, match=needle):
        export_onnx(tiny_model, tmp_path / "m.onnx", image_size=SIZE, verify_with=names)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "sq.pt"
    save(convert("squeezenet1_1", num_classes=10, image_size=48), path)
    return path


def test_missing_openvino_is_one_line_naming_the_extra(checkpoint, tmp_path, monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else found(name, *a))
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--target",
                                      "openvino"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'gfgp[export-check]'" in lines[0] and "OpenVINO" in lines[0]


def test_cli_target_openvino_reports_each_runtime(checkpoint, tmp_path):
    _openvino()
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--target",
                                      "openvino", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [c["runtime"] for c in report["checks"]] == ["onnxruntime", "openvino"]
    assert all(c["passed"] and set(c["max_abs_diffs"]) == {"1", "3"} for c in report["checks"])
    assert report["inline"] is True and report["custom_nodes"] == 0


def test_cli_openvino_mismatch_exits_1(checkpoint, tmp_path, monkeypatch):
    _openvino()
    real = runtime_module.openvino_runner

    def negated(path):
        run, device = real(path)
        return (lambda xs: [-y for y in run(xs)]), device

    monkeypatch.setattr(runtime_module, "openvino_runner", negated)
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--inline",
                                      "--verify-with", "onnxruntime,openvino"])
    assert result.exit_code == 1, result.output
    assert "openvino (CPU) differs" in result.output
