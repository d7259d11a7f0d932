"""``gfgp export --ort-kernel`` and the kernel row of ``gfgp bench export``: the file verified in
onnxruntime with gfgp's kernel library registered too, the library copied beside it, and bad
combinations refused in one line. The library itself: tests/export/test_ort_kernel.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from gfgp_cli import export_onnx
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError
from gfgp_cli.export import bench_export, ort_kernel
from gfgp_cli.export.onnx_export import KERNEL_LIBRARY

pytestmark = pytest.mark.skipif(ort_kernel.build_error() is not None,
                                reason=f"the kernel library cannot be built here: {ort_kernel.build_error()}")

SIZE = 20


@pytest.fixture
def registered(monkeypatch):
    """The sessions that registered the kernel library (the real one, counted)."""
    calls = []
    real = ort_kernel.register

    def spy(options):
        calls.append(options)
        return real(options)

    monkeypatch.setattr(ort_kernel, "register", spy)
    return calls


def test_export_verifies_with_the_kernel_and_ships_the_library_beside_the_file(tiny_model, tmp_path, registered):
    report = export_onnx(tiny_model, tmp_path / "m.onnx", image_size=SIZE, ort_kernel=True)
    assert [(c["runtime"], c["passed"]) for c in report.checks] == [("onnxruntime", True), ("onnxruntime-kernel", True)]
    assert len(registered) == 1  # the stock session did not register it, the kernel's did
    assert report.checks[1]["provider"] == "CPUExecutionProvider + gfgp kernel"
    library = tmp_path / KERNEL_LIBRARY
    assert report.kernel_library == str(library) and library.read_bytes() == ort_kernel.library_path().read_bytes()
    # A user's own onnxruntime loads the copy as any custom-op library; the file is the default form.
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(report.path, options, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert report.custom_nodes == 3 and not report.inline


def test_the_kernel_is_a_runtime_of_verify_with_and_refused_for_the_inline_form(tiny_model, tmp_path):
    report = export_onnx(tiny_model, tmp_path / "k.onnx", image_size=SIZE, verify_with=["onnxruntime-kernel"])
    assert [c["runtime"] for c in report.checks] == ["onnxruntime-kernel"] and report.passed
    assert report.kernel_library is None  # only --ort-kernel copies the library
    with pytest.raises(BadInputError, match="the inline form has none: drop --inline"):
        export_onnx(tiny_model, tmp_path / "i.onnx", image_size=SIZE, inline=True, ort_kernel=True)
    assert not (tmp_path / "i.onnx").exists()


def test_cli_ort_kernel_and_its_refusals(tmp_path):
    checkpoint = Path(__file__).parents[2] / "fixtures" / "checkpoint_v1" / "last.pt"  # mobilenet_v3_small, 16 px
    base = ["export", str(checkpoint), "--onnx"]
    result = CliRunner().invoke(cli, [*base, str(tmp_path / "m.onnx"), "--ort-kernel", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kernel_library"] == str(tmp_path / KERNEL_LIBRARY)
    assert [c["runtime"] for c in data["checks"]] == ["onnxruntime", "onnxruntime-kernel"]
    for extra, needle in ((["--target", "openvino"], "the inline form has none"),
                          (["--int8", "--calibration", "digits"], "--int8 and --ort-kernel are not combined")):
        result = CliRunner().invoke(cli, [*base, str(tmp_path / "x.onnx"), "--ort-kernel", *extra])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_bench_times_the_kernel_on_the_same_file_and_says_why_when_it_cannot(tiny_model, monkeypatch, registered):
    result = bench_export(tiny_model, batch=2, image_size=SIZE, repeats=2, warmup=0, original=False)
    assert result.kernel_note is None and len(result.kernel_ort_times_ms) == 2 and len(registered) == 1
    assert result.kernel_max_abs_diff <= 1e-5 and result.max_abs_diff <= 1e-5
    from gfgp_cli.console import out
    from gfgp_cli.export.render import render_bench_export

    with out.capture() as captured:
        render_bench_export(result)
    assert "onnxruntime + gfgp kernel" in captured.get() and f"{result.kernel_ort_ms:.1f}" in captured.get()
    off = bench_export(tiny_model, batch=1, image_size=SIZE, repeats=1, warmup=0, original=False, ort_kernel=False)
    assert off.kernel_ort_ms is None and off.kernel_note == "not asked for (--no-ort-kernel)"
    monkeypatch.setattr(ort_kernel, "build_error", lambda: "the library could not be built: g++ failed: boom")
    broken = bench_export(tiny_model, batch=1, image_size=SIZE, repeats=1, warmup=0, original=False)
    assert broken.kernel_ort_ms is None and broken.kernel_note.endswith("g++ failed: boom")


def _raw_node_model(**attributes):
    """One gfgp::MaxEntPool2d node with the given attributes and no function body (the library's schema)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("MaxEntPool2d", ["x", "lam"], ["y"], domain="gfgp", **attributes)
    graph = helper.make_graph([node], "raw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                              helper.make_tensor_value_info("lam", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("gfgp", 1)])
    model.ir_version = 10
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else model


def _kernel_session(model, library=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(str(library or ort_kernel.library_path()))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_crafted_geometry_is_an_error_not_a_crash():
    # A kernel of 2^32 x 2^32 once wrapped the window size to 0 and wrote past its buffer.
    with pytest.raises(Exception, match="kernel_shape must be between 1 and 1048576"):
        _kernel_session(_raw_node_model(kernel_shape=[2**32, 2**32], strides=[1, 1], pads=[0, 0, 2**32, 2**32]))
    with pytest.raises(Exception, match="the ceil_mode attribute must be an int"):  # not read as absent (0)
        _kernel_session(_raw_node_model(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], ceil_mode=1.0))
    with pytest.raises(Exception, match="strides must have 2 ints"):  # a float list reads as an empty one
        _kernel_session(_raw_node_model(kernel_shape=[2, 2], strides=[2.0, 2.0]))
    with pytest.raises(Exception, match="more than 1048576 positions per window"):
        _kernel_session(_raw_node_model(kernel_shape=[2048, 2048], strides=[1, 1], pads=[0, 0, 0, 0]))
    session = _kernel_session(_raw_node_model(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    lam = np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(Exception, match="has an empty spatial dim"):  # the eager op refuses it too
        session.run(None, {"x": np.zeros((1, 1, 0, 4), np.float32), "lam": lam})
    out = session.run(None, {"x": np.ones((1, 1, 5, 5), np.float32), "lam": lam})[0]
    assert out.shape == (1, 1, 3, 3) and np.allclose(out, 1)  # the session still works after the errors


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif("avx512_fp16" in _cpu_flags() or not _cpu_flags(), reason="needs an x86-64 CPU without AVX512-FP16")
def test_a_library_built_for_another_cpu_refuses_to_register_instead_of_crashing(tmp_path):
    # Built as for a CPU with AVX512-FP16 (which this one lacks): registration reports it in one line.
    from gfgp_cli.ops import cpu

    library = tmp_path / "other_cpu.so"
    cpu._build(library, sources=ort_kernel._sources(),
               extra_flags=["-fvisibility=hidden", '-DGFGP_TEST_REQUIRE_CPU_FEATURE="avx512fp16"'], openmp=False)
    options = ort.SessionOptions()
    with pytest.raises(Exception, match=r"built \(-march=native\) for a CPU with avx512fp16, which this CPU lacks"):
        options.register_custom_ops_library(str(library))
