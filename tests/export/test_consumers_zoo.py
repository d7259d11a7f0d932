"""The consumer matrix of issue 18 over torchvision models (``make test-zoo``, marker ``zoo``):
model x runtime x form. Each model is converted at a small size (to fit a 24 GiB machine and a
reasonable time), exported once (the default function form, verified by the export itself) and
inlined; each form then runs in onnxruntime with no and with all graph optimisations (the function
form also with gfgp's kernel library registered), in OpenVINO
(the inline form: it reads no model-local functions, tests/export/test_consumers.py), and after
onnxsim and onnxslim, each output judged against PyTorch by the export's own rule (max |diff| <=
RTOL x output scale). The fast subset is tests/export/test_consumers.py in ``make test``.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
import torch

from gfgp_cli import convert, export_onnx
from gfgp_cli.export import DOMAIN
from gfgp_cli.export.proto import inline_functions

pytestmark = pytest.mark.zoo

# the helpers of the fast subset (loaded by path: pytest's importlib mode puts no test folder on sys.path)
_spec = importlib.util.spec_from_file_location("_consumers", Path(__file__).with_name("test_consumers.py"))
_consumers = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("_consumers", _consumers)  # its dataclasses look their module up there
_spec.loader.exec_module(_consumers)
Case, Exported, run_ort, openvino_matches = _consumers.Case, _consumers.Exported, _consumers._run_ort, _consumers._openvino_matches

# name -> (constructor kwargs, image size): the smallest size each converts and exports at that
# still has every pool see a map larger than one pixel somewhere (demo: the digits demo's resnet18)
MODELS = {
    "resnet18": ({"num_classes": 10}, 64),
    "mobilenet_v3_small": ({"num_classes": 10}, 64),
    "densenet121": ({"num_classes": 10}, 64),
    "vgg11_bn": ({"num_classes": 10}, 64),
    "efficientnet_b0": ({"num_classes": 10}, 64),
    "demo": ({"num_classes": 10}, 16),
}
FORMS = ["function", "inline"]


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory) -> Exported:
    name = request.param
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = convert("resnet18" if name == "demo" else name, image_size=size, **kwargs).eval()
    folder = tmp_path_factory.mktemp(name)
    paths = {"function": folder / "function.onnx", "inline": folder / "inline.onnx"}
    report = export_onnx(model, paths["function"], image_size=size)  # verified: onnxruntime vs PyTorch float64
    assert report.passed and report.custom_nodes == report.maxent_layers > 0
    onnx.save(inline_functions(onnx.load(paths["function"])), paths["inline"])
    case = Case(name, model, size, dynamic_batch=True)
    x = case.input()
    with torch.no_grad():
        want = model(x).double().numpy()
    pools = [n.output[0] for n in onnx.load(paths["function"]).graph.node if n.domain == DOMAIN]
    yield Exported(case, paths, x.numpy(), want, pools)
    del model, case
    gc.collect()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_onnxruntime(exported, form, level):
    exported.matches(run_ort(exported.path[form], exported.x, level))


@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_onnxruntime_with_the_gfgp_kernel_library(exported, level):
    exported.matches(run_ort(exported.path["function"], exported.x, level, kernel=True))


def test_openvino_inline_form(exported):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    openvino_matches(exported, ov.Core().read_model(str(exported.path["inline"])))
    openvino_matches(exported, ov.convert_model(str(exported.path["inline"])))


@pytest.mark.parametrize("form", FORMS)
def test_onnxsim(exported, form):
    onnxsim = pytest.importorskip("onnxsim", reason="onnxsim is not installed (pip install onnxsim)")
    simplified, ok = onnxsim.simplify(onnx.load(exported.path[form]))
    assert ok
    exported.matches(run_ort(simplified, exported.x))


@pytest.mark.parametrize("form", FORMS)
def test_onnxslim(exported, form):
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim is not installed (pip install onnxslim)")
    exported.matches(run_ort(onnxslim.slim(onnx.load(exported.path[form])), exported.x))
