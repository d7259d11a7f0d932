"""Export at every size a model takes: maps that reach 1x1 (a model converted at 16 px, the demo's
size) and odd sizes, with a static and a dynamic batch, inlined or not; and a file onnxruntime
cannot load (or run) never left at the output path (issue 17, case 2).

With a static shape, shape inference also visits the SpaceToDepth branch of the pool's body for
maps that take the gather branch; on a 1-pixel map its Reshape once had a target ``[N, 4, -1, 0,
0]`` whose 0 meant "copy the input's dimension 4", which a rank-4 input has not: onnx's strict
data-propagating shape inference and onnxruntime (with constant folding) refused the whole file,
and the export left it at the output path.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gfgp_cli import convert, export_onnx, save
from gfgp_cli.cli import cli
from gfgp_cli.errors import WorkFailedError
from gfgp_cli.export import proto as proto_module
from gfgp_cli.export import runtime
from gfgp_cli.export.runtime import make_session, run_session

_spec = importlib.util.spec_from_file_location("_one_node", Path(__file__).with_name("_one_node.py"))
_one_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_one_node)

# What onnxruntime said about the file of issue 17 (its reason is on the second line).
_ORT_REFUSAL = "[ONNXRuntimeError] : 1 : FAIL : Node () Op (Reshape)\n[ShapeInferenceError] Invalid position of 0."


_nets_spec = importlib.util.spec_from_file_location("_nets", Path(__file__).with_name("_nets.py"))
_nets = importlib.util.module_from_spec(_nets_spec)
_nets_spec.loader.exec_module(_nets)
ToOnePixel = _nets.ToOnePixel


def _model() -> ToOnePixel:
    return ToOnePixel().eval()


def _strict_shape_inference(path) -> None:
    onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True, data_prop=True)


def _ort_matches_torch(model: nn.Module, path, batches, size: int) -> None:
    session = make_session(str(path), providers=["CPUExecutionProvider"])
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        got = run_session(session, [x.numpy()])[0]
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def _leftovers(folder: Path, name: str):
    """Temporary files and folders of a write of ``name`` left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}"))


# --------------------------------------------------------------------------------------------
# every size, every form


FORMS = [
    pytest.param(True, False, id="static"),
    pytest.param(False, False, id="dynamic"),
    pytest.param(True, True, id="static-inline"),
    pytest.param(False, True, id="dynamic-inline"),
]


@pytest.mark.parametrize("static, inline", FORMS)
def test_maps_reaching_one_pixel_export_load_and_match_torch(tmp_path, static, inline):
    model = _model()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, image_size=16, dynamic_batch=not static, inline=inline)
    assert report.passed is True and report.maxent_layers == 6
    assert report.custom_nodes == (0 if inline else 6)
    _strict_shape_inference(path)
    _ort_matches_torch(model, path, (1,) if static else (1, 2, 3), 16)


@pytest.mark.parametrize("size", [9, 15, 17])
@pytest.mark.parametrize("static, inline", FORMS[:2] + FORMS[2:3])
def test_odd_sizes_export_load_and_match_torch(tmp_path, size, static, inline):
    model = _model()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, image_size=size, dynamic_batch=not static, inline=inline)
    assert report.passed is True
    _strict_shape_inference(path)
    _ort_matches_torch(model, path, (1,) if static else (1, 3), size)


@pytest.mark.parametrize("dims, x_shape", [
    (2, (1, 2, 1, 1)), (2, (2, 3, 1, 2)), (2, (1, 2, 3, 1)), (2, (1, 2, 5, 3)), (2, (1, 2, 2, 2)),
    (3, (1, 2, 1, 1, 1)), (3, (1, 2, 2, 1, 3)), (3, (2, 1, 3, 2, 2)),
])
@pytest.mark.parametrize("lam_kind", ["channel", "window"])
def test_static_one_node_models_pass_strict_data_propagating_shape_inference(dims, x_shape, lam_kind):
    """The 2x2/2 ceil-mode node at fixed shapes, inlined or not: strict inference with data
    propagation sees the SpaceToDepth branch's Reshape target; onnxruntime loads and matches."""
    from gfgp_cli import maxent_pool2d, maxent_pool3d
    from gfgp_cli.ops import pool_output_size

    kernel = (1, 2, 2) if dims == 3 else (2, 2)
    out = [pool_output_size(n, k, k, 0, True) for n, k in zip(x_shape[2:], kernel)]
    lam_shape = (x_shape[0], x_shape[1], *out) if lam_kind == "window" else (1, x_shape[1], *[1] * dims)
    g = torch.Generator().manual_seed(3)
    x, lam = torch.randn(*x_shape, generator=g), torch.rand(*lam_shape, generator=g) * 4
    model = _one_node.one_node_model(kernel, kernel, (0,) * dims, True, x_shape=x.shape, lam_shape=lam.shape)
    want = (maxent_pool3d if dims == 3 else maxent_pool2d)(x, lam, kernel, kernel, 0, True)
    for form in (model, onnx.inliner.inline_local_functions(model)):
        onnx.shape_inference.infer_shapes(form, check_type=True, strict_mode=True, data_prop=True)
        session = make_session(form.SerializeToString(), providers=["CPUExecutionProvider"])
        got = run_session(session, [x.numpy(), lam.numpy()])[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def resnet18_at_16px(tmp_path_factory):
    """The demo's model: resnet18 converted at 16 px (no weights downloaded)."""
    path = tmp_path_factory.mktemp("r18") / "m.pt"
    save(convert("resnet18", num_classes=10, image_size=16), path)
    return path


@pytest.mark.parametrize("flags", [["--static"], [], ["--inline"]], ids=["static", "dynamic", "inline"])
def test_cli_exports_resnet18_converted_at_16px(resnet18_at_16px, tmp_path, flags):
    """Issue 17, case 2: ``gfgp export m.pt --onnx s.onnx --static`` of the demo's model."""
    out = tmp_path / "s.onnx"
    result = CliRunner().invoke(cli, ["export", str(resnet18_at_16px), "--onnx", str(out), "--json", *flags])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["input_shape"] == [1 if "--static" in flags else "batch", 3, 16, 16]
    _strict_shape_inference(out)
    make_session(str(out), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# a file onnxruntime cannot load or run is never left at the output path


def _refuse(*args, **kwargs):
    raise RuntimeError(_ORT_REFUSAL)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_a_file_onnxruntime_cannot_load_is_not_written(tmp_path, monkeypatch, verify):
    monkeypatch.setattr(runtime, "make_session", _refuse)
    path = tmp_path / "m.onnx"
    with pytest.raises(WorkFailedError) as info:
        export_onnx(_model(), path, image_size=16, dynamic_batch=False, verify=verify)
    message = str(info.value)
    assert "onnxruntime cannot load the exported model" in message and "Invalid position of 0" in message
    assert f"nothing was written to {path}" in message and "\n" not in message
    assert not path.exists() and _leftovers(tmp_path, path.name) == []


def test_a_file_onnxruntime_cannot_load_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    monkeypatch.setattr(runtime, "make_session", _refuse)
    with pytest.raises(WorkFailedError, match=f"the previous {path} is unchanged"):
        export_onnx(_model(), path, image_size=16, force=True)
    assert path.read_bytes() == b"previous export" and _leftovers(tmp_path, path.name) == []


def test_a_file_onnxruntime_cannot_run_is_not_written(tmp_path, monkeypatch):
    def fail(session, inputs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code\nReshape failed")

    monkeypatch.setattr(runtime, "run_session", fail)
    path = tmp_path / "m.onnx"
    with pytest.raises(WorkFailedError, match="fails to run the exported model at batch 1") as info:
        export_onnx(_model(), path, image_size=16)
    assert "\n" not in str(info.value) and not path.exists() and _leftovers(tmp_path, path.name) == []


def test_external_data_is_not_moved_in_when_the_file_fails_to_load(tmp_path, monkeypatch):
    monkeypatch.setattr(proto_module, "SINGLE_FILE_LIMIT", 1000)  # the model's weights go to m.onnx.data
    monkeypatch.setattr(runtime, "make_session", _refuse)
    with pytest.raises(WorkFailedError, match="nothing was written"):
        export_onnx(_model(), tmp_path / "m.onnx", image_size=16)
    assert os.listdir(tmp_path) == []


def test_a_numeric_mismatch_keeps_the_loadable_file_and_says_so(tmp_path, monkeypatch):
    """As documented (export_onnx's Raises): a file that loads and runs but differs from PyTorch
    is kept for inspection, and the message says where."""
    real = runtime.run_session
    monkeypatch.setattr(runtime, "run_session", lambda session, inputs: [o + 1.0 for o in real(session, inputs)])
    path = tmp_path / "m.onnx"
    with pytest.raises(WorkFailedError, match="differs from PyTorch") as info:
        export_onnx(_model(), path, image_size=16)
    assert f"the file was kept at {path}" in str(info.value)
    session = make_session(str(path), providers=["CPUExecutionProvider"])
    assert np.isfinite(run_session(session, [np.zeros((1, 3, 16, 16), np.float32)])[0]).all()


def test_cli_reports_an_unloadable_file_in_one_line_and_writes_nothing(resnet18_at_16px, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "make_session", _refuse)
    out = tmp_path / "s.onnx"
    result = CliRunner().invoke(cli, ["export", str(resnet18_at_16px), "--onnx", str(out), "--static"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: onnxruntime cannot load the exported model"), result.output
    assert "Traceback" not in result.output and not out.exists()
