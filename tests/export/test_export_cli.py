"""`gfgp export` end to end on a converted resnet18 checkpoint, and its bad-input exits (code 2)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from gfgp_cli import GFGPPool2d, convert, load, save
from gfgp_cli.cli import cli
from gfgp_cli.commands.export import bench_export_command
from gfgp_cli.export import DOMAIN


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name in ("resnet18", "squeezenet1_1"):
        paths[name] = folder / f"{name}.pt"
        save(convert(name, num_classes=10), paths[name])
    return paths


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(
    "name, layers",
    [
        ("squeezenet1_1", 4),  # the three fire max-pools and the stem max-pool
        pytest.param("resnet18", 5, marks=pytest.mark.slow),  # docs/method.md section 3: stem 2x2 + 3x3, one per stage
    ],
)
def test_export_end_to_end_json(checkpoints, tmp_path, name, layers):
    out = tmp_path / "sub" / f"{name}.onnx"
    result = invoke("export", checkpoints[name], "--onnx", out, "--image-size", 64, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gfgp_layers = sum(isinstance(m, GFGPPool2d) for m in load(checkpoints[name]).modules())
    assert gfgp_layers == layers
    assert report["custom_nodes"] == report["maxent_layers"] == gfgp_layers
    assert sum(n.domain == DOMAIN for n in onnx.load(out).graph.node) == gfgp_layers
    assert report["passed"] is True and report["provider"] == "CPUExecutionProvider"
    assert set(report["max_abs_diffs"]) == {"1", "3"}
    assert all(d <= report["tolerance"] for d in report["max_abs_diffs"].values())
    assert report["input_shape"] == ["batch", 3, 64, 64]
    # The weights are stored once and the function body holds none.
    assert abs(report["file_bytes"] / report["param_bytes"] - 1) < 0.03


def test_table_lists_nodes_sizes_diffs_and_verdict(tmp_path):
    from gfgp_cli.console import out
    from gfgp_cli.export import ExportReport
    from gfgp_cli.export.render import render_export

    report = ExportReport(path="m.onnx", data_path=None, file_bytes=2_000_000, param_bytes=1_990_000, buffer_bytes=20_000,
                          custom_nodes=5, maxent_layers=5,
                          opset=20, ir_version=10, inline=False, dynamic_batch=True, input_shape=["batch", 3, 64, 64],
                          max_abs_diffs={1: 1.5e-7, 3: 2.5e-7}, tolerance=3e-5, passed=True, provider="CPUExecutionProvider")
    with out.capture() as captured:
        render_export(report)
    text = captured.get()
    for expected in ("gfgp::MaxEntPool2d nodes", "2.00 MB", "1.99 MB", "1.5e-07", "2.5e-07", "3e-05", "PASS", "20 / 10"):
        assert expected in text


def _assert_bad_input(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def test_missing_checkpoint_exits_2(tmp_path):
    _assert_bad_input(invoke("export", tmp_path / "nope.pt", "--onnx", tmp_path / "m.onnx"), "does not exist")


def test_non_gfgp_checkpoint_exits_2(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    _assert_bad_input(invoke("export", tmp_path / "other.pt", "--onnx", tmp_path / "m.onnx"), "not a gfgp checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    _assert_bad_input(invoke("export", tmp_path / "junk.pt", "--onnx", tmp_path / "m.onnx"), "junk.pt")


def test_existing_output_without_force_exits_2(checkpoints, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"keep me")
    _assert_bad_input(invoke("export", checkpoints["squeezenet1_1"], "--onnx", tmp_path / "m.onnx"), "already exists", "--force")
    assert (tmp_path / "m.onnx").read_bytes() == b"keep me"


def test_unwritable_output_exits_2(checkpoints, tmp_path):
    (tmp_path / "file").write_text("x")
    _assert_bad_input(invoke("export", checkpoints["squeezenet1_1"], "--onnx", tmp_path / "file" / "m.onnx"), "cannot write")


def test_image_size_the_model_cannot_take_exits_2(checkpoints, tmp_path):
    # converted squeezenet1_1 pools down to nothing below 32x32
    _assert_bad_input(invoke("export", checkpoints["squeezenet1_1"], "--onnx", tmp_path / "m.onnx", "--image-size", 8),
                      "cannot take", "--image-size")
    _assert_bad_input(invoke("export", checkpoints["squeezenet1_1"], "--onnx", tmp_path / "m.onnx", "--image-size", 0),
                      "image size")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", [12, 999])
def test_unsupported_opset_exits_2(checkpoints, tmp_path, opset):
    _assert_bad_input(invoke("export", checkpoints["squeezenet1_1"], "--onnx", tmp_path / "m.onnx", "--opset", opset),
                      f"opset {opset} is not supported")


def test_missing_onnx_option_is_a_usage_error(checkpoints):
    result = invoke("export", checkpoints["squeezenet1_1"])
    assert result.exit_code == 2 and "--onnx" in result.output


@pytest.mark.slow
def test_export_inline_static_opset_table(checkpoints, tmp_path):
    out = tmp_path / "s.onnx"
    result = invoke("export", checkpoints["squeezenet1_1"], "--onnx", out, "--image-size", 48, "--inline", "--static",
                    "--opset", 18)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "(inlined)" in result.output and "(1, 3, 48, 48)" in result.output
    model = onnx.load(out)
    assert all(n.domain == "" for n in model.graph.node) and not model.functions
    assert model.opset_import[0].version == 18


@pytest.mark.slow
def test_bench_export_command_prints_both_latencies(checkpoints):
    result = CliRunner().invoke(bench_export_command, [str(checkpoints["squeezenet1_1"]), "--batch-size", "2",
                                                       "--image-size", "64", "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["torch_ms"] > 0 and data["ort_ms"] > 0 and data["ratio"] == pytest.approx(data["ort_ms"] / data["torch_ms"])
    assert data["max_abs_diff"] < 1e-4 and data["batch"] == 2


def test_bench_export_is_a_bench_subcommand():
    from click.testing import CliRunner

    from gfgp_cli.cli import cli

    result = CliRunner().invoke(cli, ["bench", "export", "--help"])
    assert result.exit_code == 0 and "onnxruntime" in result.output


def test_static_export_of_a_model_whose_maps_reach_one_pixel(tmp_path):
    """The format-1 fixture is a mobilenet_v3_small converted at 16 px: its last pools see 1x1
    maps, which a static export once turned into a file onnxruntime refused to load."""
    from pathlib import Path

    checkpoint = Path(__file__).parents[2] / "fixtures" / "checkpoint_v1" / "last.pt"
    result = invoke("export", checkpoint, "--onnx", tmp_path / "s.onnx", "--static", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["input_shape"] == [1, 3, 16, 16]
