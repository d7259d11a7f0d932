"""The default export (one ``gfgp::MaxEntPool2d`` / ``MaxEntPool3d`` node per pool, its body a
model-local function) and the ``--inline`` form in the runtimes and tools deployment engineers use
(issue 18): onnxruntime at every graph-optimisation level, OpenVINO, onnxsim, onnxslim, onnx's
strict shape inference and version converter, onnxruntime's quantisation pre-processing.

Each consumer is checked only where its package is installed (``pip install gfgp[export-check]``);
otherwise its tests skip and say which package is missing. Every output is compared with PyTorch
by the export's own rule: max |diff| <= RTOL x output scale. Where a consumer cannot take a form
for a reason outside the pool's body, the test asserts that exact failure, so it notices when the
consumer changes:

- OpenVINO's ONNX frontend reads no model-local functions at all (it only expands functions of
  ops in onnx's schema registry), whatever their body: the function form fails with "No
  conversion rule found for operations: gfgp.MaxEntPool2d"; inlined (``--inline``, or
  ``onnx.inliner.inline_local_functions`` on the default file) it runs;
- ``onnx.version_converter`` drops a model's local functions, so the function form comes out with
  nodes nothing defines; the inline form converts to opset 17 (the body then has ReduceMax with
  axes as an attribute), unless the exporter's ``ReduceMean`` of a global average pool is in the
  graph: its adapter keeps ``noop_with_empty_axes``, which ReduceMean-13 does not have;
- ``quant_pre_process`` runs onnxruntime's symbolic shape inference, which reads a Constant only
  through its ``value`` attribute (inlining turns the body's attribute references into
  ``Constant(value_ints=...)``) and cannot size the shared-shift body's ``NonZero``, so the
  inline form fails there. The function form runs, and so
  does the inline form with ``skip_symbolic_shape=True``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import onnx.inliner
import pytest
import torch
from torch import nn

from gfgp_cli import GFGPPool3d, convert, export_onnx
from gfgp_cli.export import DOMAIN
from gfgp_cli.export.proto import inline_functions
from gfgp_cli.export.verify import RTOL

BATCH = 2  # of the static exports (every shape in the file known); a dynamic-batch file runs at 3


_nets_spec = importlib.util.spec_from_file_location("_nets", Path(__file__).with_name("_nets.py"))
_nets = importlib.util.module_from_spec(_nets_spec)
_nets_spec.loader.exec_module(_nets)
ToOnePixel = _nets.ToOnePixel


class OnePool3d(nn.Module):
    """A Conv3d and one frame-wise 2x2/2 max-entropy pool (a gfgp::MaxEntPool3d node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.pool = GFGPPool3d(4, (1, 2, 2), (1, 2, 2))

    def forward(self, x):
        return self.pool(self.conv(x))


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    image_size: int
    frames: int = 0
    global_mean: bool = False  # the exporter writes a ReduceMean (adaptive average pool)
    dynamic_batch: bool = False  # the default export's dynamic batch (else the batch is BATCH)

    def input(self) -> torch.Tensor:
        batch = 3 if self.dynamic_batch else BATCH  # not the batch of the trace (2)
        shape = (batch, 3, *([self.frames] if self.frames else []), self.image_size, self.image_size)
        return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _case(name: str) -> Case:
    torch.manual_seed(0)
    if name == "resnet18":
        return Case(name, convert("resnet18", num_classes=10, image_size=32).eval(), 32, global_mean=True)
    if name == "mobilenet_v3_small":
        model = convert("mobilenet_v3_small", num_classes=10, image_size=32, width_mult=0.25)
        return Case(name, model.eval(), 32, global_mean=True)
    if name.startswith("to_one_pixel"):
        return Case(name, ToOnePixel().eval(), 16, dynamic_batch=name.endswith("dynamic-batch"))
    return Case(name, OnePool3d().eval(), 8, frames=4)


@dataclasses.dataclass
class Exported:
    case: Case
    path: Dict[str, Path]  # "function" / "inline" -> file
    x: np.ndarray
    want: np.ndarray
    pool_outputs: List[str]  # the values the gfgp nodes write (the same names in the inline form)

    def matches(self, got: np.ndarray) -> None:
        assert got.shape == self.want.shape
        tolerance = RTOL * max(float(np.abs(self.want).max()), 1e-6)
        assert float(np.abs(got.astype(np.float64) - self.want).max()) <= tolerance


@pytest.fixture(scope="module",
                params=["resnet18", "mobilenet_v3_small", "to_one_pixel", "to_one_pixel-dynamic-batch", "pool3d"])
def exported(request, tmp_path_factory) -> Exported:
    case = _case(request.param)
    folder = tmp_path_factory.mktemp(case.name)
    paths = {"function": folder / "function.onnx", "inline": folder / "inline.onnx"}
    export_onnx(case.model, paths["function"], image_size=case.image_size, frames=case.frames or None,
                dynamic_batch=case.dynamic_batch, batch_size=BATCH, verify=False)
    # What export_onnx(inline=True) writes, without a second trace: the same proto, inlined.
    onnx.save(inline_functions(onnx.load(paths["function"])), paths["inline"])
    x = case.input()
    with torch.no_grad():
        want = case.model(x).double().numpy()
    pools = [n.output[0] for n in onnx.load(paths["function"]).graph.node if n.domain == DOMAIN]
    assert pools
    return Exported(case, paths, x.numpy(), want, pools)


FORMS = ["function", "inline"]


def _ort(model, level: str = "ORT_ENABLE_ALL", kernel: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if kernel:  # gfgp's kernel library: every gfgp node runs as the fused kernel (gfgp_cli/export/ort_kernel.py)
        from gfgp_cli.export import ort_kernel

        if ort_kernel.build_error():
            pytest.skip(f"the kernel library cannot be built here: {ort_kernel.build_error()}")
        ort_kernel.register(options)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run_ort(model, x: np.ndarray, level: str = "ORT_ENABLE_ALL", kernel: bool = False) -> np.ndarray:
    session = _ort(model, level, kernel)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# --------------------------------------------------------------------------------------------
# onnxruntime


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_onnxruntime_at_every_optimisation_level(exported, form, level):
    exported.matches(_run_ort(exported.path[form], exported.x, level))


@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_onnxruntime_with_the_gfgp_kernel_library(exported, level):
    exported.matches(_run_ort(exported.path["function"], exported.x, level, kernel=True))


# --------------------------------------------------------------------------------------------
# OpenVINO


def _openvino_matches(exported: Exported, model) -> None:
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    # f32: the CPU plugin may otherwise compute in bf16 / f16 on CPUs that have it.
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    exported.matches(compiled(exported.x)[0])


def test_openvino_reads_and_converts_the_inline_form(exported):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    path = str(exported.path["inline"])
    _openvino_matches(exported, ov.Core().read_model(path))
    _openvino_matches(exported, ov.convert_model(path))


def test_openvino_takes_the_function_form_once_its_functions_are_inlined(exported):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    op = "MaxEntPool3d" if exported.case.frames else "MaxEntPool2d"
    # OpenVINO's ONNX frontend has no model-local functions: the custom node has no converter.
    with pytest.raises(Exception, match=rf"No conversion rule found for operations: {DOMAIN}\.{op}"):
        ov.Core().read_model(str(exported.path["function"]))
    inlined = onnx.inliner.inline_local_functions(onnx.load(exported.path["function"]))
    _openvino_matches(exported, ov.Core().read_model(inlined.SerializeToString(), b""))


# --------------------------------------------------------------------------------------------
# simplifiers


@pytest.mark.parametrize("form", FORMS)
def test_onnxsim_output_loads_and_matches(exported, form):
    onnxsim = pytest.importorskip("onnxsim", reason="onnxsim is not installed (pip install onnxsim)")
    simplified, ok = onnxsim.simplify(onnx.load(exported.path[form]))
    assert ok
    exported.matches(_run_ort(simplified, exported.x))


@pytest.mark.parametrize("form", FORMS)
def test_onnxslim_output_loads_and_matches(exported, form):
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim is not installed (pip install onnxslim)")
    exported.matches(_run_ort(onnxslim.slim(onnx.load(exported.path[form])), exported.x))


# --------------------------------------------------------------------------------------------
# onnx's own tools


def _static(value: onnx.ValueInfoProto, dynamic_batch: bool = False) -> bool:
    """Every dim known (with a dynamic batch: every dim but the first, which is a named symbol)."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return False
    dims = list(tensor.shape.dim)
    if dynamic_batch:
        if not dims or not dims[0].dim_param:
            return False
        dims = dims[1:]
    return all(d.HasField("dim_value") for d in dims)


@pytest.mark.parametrize("form", FORMS)
def test_strict_data_propagating_shape_inference_keeps_the_pool_outputs_static(exported, form):
    model = onnx.shape_inference.infer_shapes(onnx.load(exported.path[form]), check_type=True, strict_mode=True,
                                              data_prop=True)
    values = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    assert any(n.domain == DOMAIN for n in model.graph.node) == (form == "function")
    dynamic = exported.case.dynamic_batch
    for name in exported.pool_outputs:  # in the inline form: the output of each pool's last op
        assert name in values and _static(values[name], dynamic), name
    assert all(_static(v, dynamic) for v in model.graph.output)


def test_version_converter_to_opset_17_takes_the_inline_form(exported):
    import onnx.version_converter

    model = onnx.load(exported.path["inline"])
    if exported.case.global_mean:
        # onnx's ReduceMean 18 -> 17 adapter keeps the exporter's noop_with_empty_axes.
        with pytest.raises(onnx.checker.ValidationError, match="noop_with_empty_axes for operator ReduceMean"):
            onnx.checker.check_model(onnx.version_converter.convert_version(model, 17))
        return
    converted = onnx.version_converter.convert_version(model, 17)
    onnx.checker.check_model(converted, full_check=True)
    assert {(o.domain, o.version) for o in converted.opset_import if o.domain in ("", "ai.onnx")} == {("", 17)}
    exported.matches(_run_ort(converted, exported.x))


def test_version_converter_drops_the_function_form_s_functions(exported):
    import onnx.version_converter

    model = onnx.load(exported.path["function"])
    assert len(model.functions) == 1
    if exported.case.global_mean:
        with pytest.raises(onnx.checker.ValidationError, match="noop_with_empty_axes for operator ReduceMean"):
            onnx.checker.check_model(onnx.version_converter.convert_version(model, 17))
        return
    converted = onnx.version_converter.convert_version(model, 17)
    assert len(converted.functions) == 0 and any(n.domain == DOMAIN for n in converted.graph.node)


# --------------------------------------------------------------------------------------------
# onnxruntime's quantisation pre-processing


def test_quant_pre_process_runs_on_the_function_form(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a failed pre-processing leaves its temporary .data files in the working folder
    shape_inference = pytest.importorskip("onnxruntime.quantization.shape_inference",
                                          reason="onnxruntime.quantization needs sympy")
    out = tmp_path / "pre.onnx"
    shape_inference.quant_pre_process(str(exported.path["function"]), str(out))
    exported.matches(_run_ort(out, exported.x))


def test_quant_pre_process_takes_the_inline_form_only_without_symbolic_shape_inference(exported, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # the failed pre-processing below leaves temporary .data files in the working folder
    shape_inference = pytest.importorskip("onnxruntime.quantization.shape_inference",
                                          reason="onnxruntime.quantization needs sympy")
    model = onnx.load(exported.path["inline"])
    spelled = [n.attribute[0].name for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name != "value"]
    # Only the pools' attributes are not plain tensors: kernel_shape, strides, pads, ceil_mode.
    pools = len(exported.pool_outputs)
    assert len(spelled) == 4 * pools and spelled.count("value_int") == pools and set(spelled) == {"value_ints", "value_int"}
    # symbolic shape inference fails on the value_int(s) spelling or, first, on the shared-shift
    # body's NonZero (how many maps it recomputes is known only at run time); which one it meets
    # first, and so its message ("... has no attribute 'HasField'", "Incomplete symbolic shape
    # inference", "object of type 'NoneType' has no len()"), depends on the model
    with pytest.raises((AttributeError, TypeError, Exception)):
        shape_inference.quant_pre_process(str(exported.path["inline"]), str(tmp_path / "pre.onnx"))
    out = tmp_path / "pre.onnx"
    shape_inference.quant_pre_process(str(exported.path["inline"]), str(out), skip_symbolic_shape=True)
    exported.matches(_run_ort(out, exported.x))
