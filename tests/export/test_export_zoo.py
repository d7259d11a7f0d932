"""The whole torchvision classification zoo through export: every model that converts with gfgp
must export to ONNX with one gfgp::MaxEntPool2d node per max-entropy pool and match PyTorch in
onnxruntime. A model that does not convert is skipped with the reason (listed by ``-rs`` / ``-ra``);
it is never skipped silently. Marker ``zoo`` (``make test-zoo``): this takes a long time.
"""

from __future__ import annotations

import gc
from pathlib import Path

import onnx
import pytest

from gfgp_cli import GFGPPool2d, MaxEntPool2d, export_onnx
from gfgp_cli.conversion import convert, list_model_names

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", list_model_names("classification"))
def test_every_converted_model_exports_and_verifies(name, tmp_path):
    try:
        model = convert(name).eval()
    except Exception as e:  # noqa: BLE001 - any conversion failure is reported, not hidden
        pytest.skip(f"{name} does not convert: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    layers = sum(isinstance(m, (GFGPPool2d, MaxEntPool2d)) for m in model.modules())
    try:
        # at the size the conversion recorded (224, inception_v3 299)
        report = export_onnx(model, tmp_path / f"{name}.onnx")
        assert report.passed
        assert report.custom_nodes == report.maxent_layers == layers
        # Weights stored once, the rest of the file is small: BN statistics fold away (and BN's
        # affine parameters into the conv bias). The file may exceed the parameters by constants the
        # exporter folds (swin_v2 stores its relative-position MLP's first layer applied to the
        # coordinate table, about 5 %), so the graph's own size is what is bounded here.
        assert report.file_bytes >= 0.95 * report.param_bytes
        proto = onnx.load(report.path, load_external_data=False)
        tensors = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
                      for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        graph_bytes = report.file_bytes - tensors - (Path(report.data_path).stat().st_size if report.data_path else 0)
        assert graph_bytes < 0.02 * report.file_bytes + 1_000_000, graph_bytes
    finally:
        del model
        gc.collect()
