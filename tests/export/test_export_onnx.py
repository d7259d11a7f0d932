"""export_onnx on hand-built models: one custom node per pool, a stock onnxruntime runs the file
in a process without gfgp, inline/static/opset variants, verification that can fail, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from gfgp_cli import GFGPPool2d, MaxEntPool2d, export_onnx
from gfgp_cli.errors import BadInputError, WorkFailedError
from gfgp_cli.export import DOMAIN, OP_TYPE, supported_opsets
from gfgp_cli.export.runtime import make_session, ort_limits, run_session
from gfgp_cli.export.verify import RTOL


def custom_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.domain == DOMAIN]


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    return run_session(make_session(str(path), providers=["CPUExecutionProvider"]), [x.numpy()])[0]


def test_every_maxent_pool_is_one_custom_node_with_a_standard_lam_estimator(tiny_export):
    _, report = tiny_export
    model = onnx.load(report.path)
    nodes = custom_nodes(model)
    assert report.custom_nodes == report.maxent_layers == len(nodes) == 3
    assert {n.op_type for n in nodes} == {OP_TYPE}
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert attrs[0] == {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 0}  # GFGP
    assert attrs[1] == {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "ceil_mode": 1}  # MaxEnt
    assert attrs[2] == {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}
    # Everything else is standard ONNX; the GFGP lam comes out of a plain Sigmoid.
    assert all(n.domain == "" for n in model.graph.node if n not in nodes)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[nodes[0].input[1]].op_type == "Sigmoid"
    # The body ships once, as a model-local function of the gfgp domain, at the model's opset.
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    assert [(o.domain, o.version) for o in model.functions[0].opset_import] == [("", report.opset)]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", report.opset), (DOMAIN, 1)}


def test_file_passes_the_full_checker_with_an_ir_version_onnxruntime_loads(tiny_export):
    _, report = tiny_export
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(report.path).st_mode & 0o777 == 0o666 & ~mask  # a normal file, not mkstemp's 0600
    onnx.checker.check_model(report.path, full_check=True)
    model = onnx.load(report.path)
    assert model.ir_version == report.ir_version <= ort_limits()[1]
    assert model.ir_version >= onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", report.opset)])


def test_report_records_a_passing_verification_at_two_batch_sizes(tiny_export):
    model, report = tiny_export
    assert report.passed is True and report.provider == "CPUExecutionProvider"
    assert sorted(report.max_abs_diffs) == [1, 3]
    assert all(0 <= d <= report.tolerance for d in report.max_abs_diffs.values())
    assert report.dynamic_batch and report.input_shape == ["batch", 3, 20, 20]
    assert report.param_bytes == sum(p.numel() * 4 for p in model.parameters())
    d = report.to_dict()
    assert d["max_abs_diffs"].keys() == {"1", "3"} and d["custom_nodes"] == 3


def test_runs_in_a_fresh_onnxruntime_process_without_gfgp(tiny_export, tmp_path):
    model, report = tiny_export
    x = torch.randn(5, 3, 20, 20, generator=torch.Generator().manual_seed(7))  # a batch never traced
    with torch.no_grad():
        expected = model(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", expected)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        s = ort.InferenceSession({report.path!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{s.get_inputs()[0].name: np.load({str(tmp_path / 'x.npy')!r})}})[0]
        want = np.load({str(tmp_path / 'y.npy')!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("gfgp_cli", "torch", "onnx", "onnxscript"))
        assert not loaded, loaded
        print(float(np.abs(y - want).max()), float(np.abs(want).max()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    diff, scale = map(float, done.stdout.split())
    assert diff <= RTOL * scale


def test_inline_has_no_custom_domain_node_and_gives_the_same_numbers(tiny_export, tiny_export_inline):
    (_model, report), (_, inlined) = tiny_export, tiny_export_inline
    proto = onnx.load(inlined.path)
    assert inlined.custom_nodes == 0 and inlined.maxent_layers == 3 and inlined.passed
    assert all(n.domain == "" for n in proto.graph.node)
    assert not proto.functions and {o.domain for o in proto.opset_import} == {""}
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(ort_run(inlined.path, x), ort_run(report.path, x), rtol=0, atol=1e-6)


def test_static_batch_fixes_the_input_and_verifies_that_batch(tiny_model, tmp_path):
    report = export_onnx(tiny_model, tmp_path / "s.onnx", image_size=20, dynamic_batch=False, batch_size=2)
    dims = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 20, 20]
    assert report.input_shape == [2, 3, 20, 20] and list(report.max_abs_diffs) == [2] and report.passed


def test_dynamic_batch_is_a_named_dimension(tiny_export):
    _, report = tiny_export
    dims = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 20, 20]


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_opset_is_honoured_and_the_body_built_at_it(tiny_model, tmp_path, which):
    opsets = supported_opsets()
    opset = opsets.start if which == "oldest" else opsets.stop - 1
    report = export_onnx(tiny_model, tmp_path / "o.onnx", image_size=20, opset=opset)
    model = onnx.load(report.path)
    assert report.opset == opset and report.passed
    assert {(o.domain, o.version) for o in model.opset_import} == {("", opset), (DOMAIN, 1)}
    assert model.functions[0].opset_import[0].version == opset


@pytest.mark.parametrize("opset", [16, 9999, "20", True])
def test_unsupported_opset_is_bad_input(tiny_model, tmp_path, opset):
    with pytest.raises(BadInputError, match="opset"):
        export_onnx(tiny_model, tmp_path / "o.onnx", image_size=20, opset=opset)
    assert not (tmp_path / "o.onnx").exists()


class _DiffersInExport(nn.Module):
    """Computes something else while being exported: the verification must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = GFGPPool2d(3, 2)

    def forward(self, x):
        y = self.pool(x)
        return y * 1.01 if torch.onnx.is_in_onnx_export() else y


def test_a_mismatch_fails_the_work_and_keeps_the_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(WorkFailedError, match="differs from PyTorch"):
        export_onnx(_DiffersInExport().eval(), path, image_size=8)
    assert path.exists()
    export_onnx(_DiffersInExport().eval(), path, image_size=8, verify=False, force=True)  # no verification, no error


def test_existing_output_needs_force(tiny_model, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(BadInputError, match="already exists"):
        export_onnx(tiny_model, path, image_size=20)
    assert path.read_bytes() == b"old"
    export_onnx(tiny_model, path, image_size=20, force=True, verify=False)
    onnx.checker.check_model(str(path))


def test_unwritable_or_folder_output_is_bad_input(tiny_model, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BadInputError, match="cannot write"):
        export_onnx(tiny_model, tmp_path / "a_file" / "m.onnx", image_size=20)
    with pytest.raises(BadInputError, match="folder"):
        export_onnx(tiny_model, tmp_path, image_size=20)


@pytest.mark.parametrize("size", [4, 5, 0, "big"])
def test_image_size_the_model_cannot_take_is_bad_input(tmp_path, size):
    # 4: smaller than the 5x5 conv; 5: the conv leaves 1x1, too small for the 2x2 pool.
    model = nn.Sequential(nn.Conv2d(3, 4, 5), GFGPPool2d(4, 2)).eval()
    with pytest.raises(BadInputError, match="cannot take a 3x|image size must be"):
        export_onnx(model, tmp_path / "m.onnx", image_size=size)
    assert export_onnx(model, tmp_path / "m.onnx", image_size=6).passed


def test_not_a_module_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="nn.Module"):
        export_onnx("resnet18", tmp_path / "m.onnx")


def test_export_leaves_training_mode_as_it_was(tiny_model, tmp_path):
    tiny_model.train()
    export_onnx(tiny_model, tmp_path / "m.onnx", image_size=20, verify=False)
    assert all(m.training for m in tiny_model.modules())


def test_only_maxent_layers_count_when_pools_are_mixed(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), GFGPPool2d(4, 2), nn.AvgPool2d(2), MaxEntPool2d(4, 2, 1), nn.Flatten()
    ).eval()
    report = export_onnx(model, tmp_path / "m.onnx", image_size=34)
    assert report.custom_nodes == report.maxent_layers == 2 and report.passed


def test_bench_export_times_both_runtimes_on_the_same_input(tiny_model):
    from gfgp_cli.export import bench_export

    result = bench_export(tiny_model, batch=2, image_size=20, repeats=3, warmup=1)
    assert len(result.torch_times_ms) == len(result.ort_times_ms) == 3
    assert result.torch_ms > 0 and result.ort_ms > 0
    assert result.ratio == pytest.approx(result.ort_ms / result.torch_ms)
    assert result.max_abs_diff < 1e-4 and result.maxent_layers == 3
    assert result.to_dict()["ratio"] == result.ratio


def test_weights_over_the_single_file_limit_go_to_a_data_file(tiny_model, tmp_path, monkeypatch):
    from gfgp_cli.export import proto

    monkeypatch.setattr(proto, "SINGLE_FILE_LIMIT", 1000)  # TinyNet has ~10 kB of weights
    for inline in (False, True):
        path = tmp_path / f"big-{inline}.onnx"
        report = export_onnx(tiny_model, path, image_size=20, inline=inline)
        assert report.passed and report.data_path == str(path) + ".data"
        model = onnx.load(str(path), load_external_data=False)
        external = [t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer]
        assert any(external) and all(e or len(t.raw_data) < 1024 for e, t in zip(external, model.graph.initializer))
        assert report.file_bytes == path.stat().st_size + (tmp_path / f"big-{inline}.onnx.data").stat().st_size
        assert report.custom_nodes == (0 if inline else 3)
        onnx.checker.check_model(str(path), full_check=True)
        # The data file is as readable as the .onnx beside it (the umask's mode, not a temp file's 0600).
        mode = path.stat().st_mode & 0o777
        assert (tmp_path / f"big-{inline}.onnx.data").stat().st_mode & 0o777 == mode


def test_a_file_onnxruntime_cannot_load_fails_the_export_in_one_line(tmp_path, monkeypatch):
    """Verification that cannot even open the file is failed work (exit 1) naming the kept file,
    not an onnxruntime traceback."""
    from gfgp_cli.errors import WorkFailedError
    from gfgp_cli.export import runtime
    from gfgp_cli.export.verify import compare_with_pytorch

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node () Op (Reshape)\n[ShapeInferenceError] Invalid position of 0.")

    monkeypatch.setattr(runtime, "make_session", refuse)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    with pytest.raises(WorkFailedError) as info:
        compare_with_pytorch(nn.Identity(), path, (1,), 3, 8, 0, torch.device("cpu"))
    message = str(info.value)
    assert "onnxruntime cannot load the exported model" in message and str(path) in message
    assert "Invalid position of 0" in message and "\n" not in message


class _TwoGFGP(nn.Module):
    """conv -> GFGP 2x2/2 ceil -> GFGP 3x3/2 pad 1 -> GAP -> fc: every lam one per map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = GFGPPool2d(8, 2, 2, ceil_mode=True)
        self.pool2 = GFGPPool2d(8, 3, 2, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool2(self.pool1(torch.relu(self.conv(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _body_ops(path) -> set:
    (function,) = onnx.load(str(path)).functions
    return {n.op_type for n in function.node}


@pytest.mark.parametrize("case, shared", [
    ("one lam per map", True),
    ("a lam per window", False),  # TinyNet's direct call with lam Tensor[N, C, oh, ow]
    ("a map smaller than the kernel", False),  # a 2x2 ceil-mode pool of a 1 px map: OpenVINO refuses its AveragePool
    ("dynamic size", False),
    ("float16", False),  # AveragePool is float32 only in onnxruntime's CPU provider
])
def test_the_body_is_the_shared_shift_one_exactly_where_it_applies(tiny_model, tmp_path, case, shared):
    """The exporter picks the shared-shift body (AveragePool) for a float32 model whose every pool
    has one lam per map and a fixed map holding the kernel, and the windowed body otherwise;
    both verify against PyTorch."""
    model = tiny_model if case == "a lam per window" else _TwoGFGP().eval()
    options = {"image_size": {"a map smaller than the kernel": 1}.get(case, 20), "dynamic_size": case == "dynamic size",
               "fp16": case == "float16"}
    report = export_onnx(model, tmp_path / "m.onnx", **options)
    assert report.passed
    ops = _body_ops(tmp_path / "m.onnx")
    assert ("AveragePool" in ops) is shared and ("Gather" in ops)  # the shared body keeps the windowed form for redos
