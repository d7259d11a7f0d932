"""Export and verify torchvision models converted with gfgp (the models named in issue 5).

Small image sizes keep them quick; every model here is in the slow suite because the dynamo
exporter needs 5-60 s per model on two CPU cores (the fast suite exports resnet18 through the CLI).
"""

from __future__ import annotations

import pytest

from gfgp_cli import GFGPPool2d, convert, export_onnx

# Model -> traced image size (inception_v3 needs at least 75 pixels).
MODELS = {
    "resnet18": 64,
    "resnet50": 64,
    "vgg11_bn": 64,
    "densenet121": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "inception_v3": 96,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_exports_and_verifies(name, tmp_path):
    model = convert(name, num_classes=10).eval()
    gfgp_layers = sum(isinstance(m, GFGPPool2d) for m in model.modules())
    assert gfgp_layers > 0
    report = export_onnx(model, tmp_path / f"{name}.onnx", image_size=MODELS[name])
    assert report.passed and report.custom_nodes == report.maxent_layers == gfgp_layers
    assert abs(report.size_ratio - 1) < 0.03, report.size_ratio
