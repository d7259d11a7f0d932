"""``--fp16``: float16 weights and computation behind float32 input and outputs, verified at the
stated looser tolerance (FP16_RTOL of the output scale); a true mismatch still fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from gfgp_cli import convert, export_onnx
from gfgp_cli.errors import WorkFailedError
from gfgp_cli.export.runtime import make_session, run_session
from gfgp_cli.export.verify import FLOAT32_ERROR_FACTOR, FP16_RTOL, RTOL

_nets_spec = importlib.util.spec_from_file_location("_nets", Path(__file__).with_name("_nets.py"))
_nets = importlib.util.module_from_spec(_nets_spec)
_nets_spec.loader.exec_module(_nets)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return convert("resnet18", num_classes=10, image_size=32).eval()


def test_fp16_file_computes_in_float16_and_passes_the_looser_tolerance(resnet, tmp_path):
    full = export_onnx(resnet, tmp_path / "f32.onnx", image_size=32, verify=False)
    report = export_onnx(resnet, tmp_path / "f16.onnx", image_size=32, fp16=True)
    assert report.precision == "float16" and report.passed
    model = onnx.load(report.path)
    types = [t.data_type for t in model.graph.initializer if len(t.dims) > 1]  # the weights
    assert types and set(types) == {TensorProto.FLOAT16}
    assert [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]] == [TensorProto.FLOAT] * 2
    assert report.file_bytes < 0.55 * full.file_bytes
    # The oracle: PyTorch float64 on an input never verified.
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = resnet.double()(x.double()).numpy()
        resnet.float()
    got = run_session(make_session(report.path, providers=["CPUExecutionProvider"]), [x.numpy()])[0]
    error, scale = np.abs(got - want).max(), np.abs(want).max()
    assert RTOL * scale < error < FP16_RTOL * scale  # really float16: the float32 rule would fail it
    assert report.tolerance == pytest.approx(max(FP16_RTOL * scale, FLOAT32_ERROR_FACTOR * report.float32_error),
                                             rel=0.5)


class _OffInExport(_nets.ConvPool):
    def forward(self, x):
        y = self.features(x)
        return y * 1.05 if torch.onnx.is_in_onnx_export() else y


def test_a_true_mismatch_fails_in_float16_too(tmp_path):
    with pytest.raises(WorkFailedError, match="differs from PyTorch float64"):
        export_onnx(_OffInExport().eval(), tmp_path / "m.onnx", image_size=8, fp16=True)


# --------------------------------------------------------------------------------------------
# --int8 --calibration SPEC


def _train_steps(model, steps=30):
    """A few SGD steps on the digits training images: a model whose top-1 means something."""
    from gfgp_cli.train.data import load_data

    bundle = load_data("digits", 16)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), bundle


@pytest.mark.slow
def test_int8_keeps_the_pools_float_and_its_top1_matches_an_independent_count(tmp_path):
    from gfgp_cli import save
    from gfgp_cli.export import DOMAIN, export_checkpoint
    from gfgp_cli.export.quantize import top1

    torch.manual_seed(0)
    model, bundle = _train_steps(convert("resnet18", num_classes=10, image_size=16))
    save(model, tmp_path / "m.pt", config={"data": "digits"})
    report = export_checkpoint(tmp_path / "m.pt", tmp_path / "q.onnx", int8="digits")
    q = report.int8
    assert report.precision == "int8" and q["quantized_nodes"] > 0 and q["int8_bytes"] < 0.3 * q["float_bytes"]
    proto = onnx.load(report.path)
    # Every pool is still one gfgp node, its body (the function) free of quantisation
    assert sum(n.domain == DOMAIN for n in proto.graph.node) == report.maxent_layers == 5
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for f in proto.functions for n in f.node)
    # every Conv reads dequantised weights and input: QDQ around the convolutions
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and all(producers[i].op_type == "DequantizeLinear" for n in convs for i in n.input[:2])
    # The float top-1, counted independently in PyTorch on the same validation images
    with torch.no_grad():
        right = sum(int((model(x[None]).argmax(1) == y).sum()) for x, y in bundle.val)
    assert q["top1_float"] == pytest.approx(100 * right / len(bundle.val), abs=0.3)
    assert q["top1_int8"] == pytest.approx(top1(make_session(report.path, providers=["CPUExecutionProvider"]),
                                                bundle.val))
    assert q["drop"] <= 1.0 and q["float_ms"] > 0 and q["int8_ms"] > 0
    assert {p.key for p in proto.metadata_props} >= {"class_names", "gfgp_spec"}  # the quantiser kept the metadata


def test_int8_needs_image_data_and_excludes_fp16(tmp_path):
    from gfgp_cli import save
    from gfgp_cli.errors import BadInputError
    from gfgp_cli.export import export_checkpoint

    save(convert("squeezenet1_1", num_classes=10, image_size=48), tmp_path / "m.pt")
    with pytest.raises(BadInputError, match="exclude each other"):
        export_checkpoint(tmp_path / "m.pt", tmp_path / "q.onnx", int8="digits", fp16=True)
    with pytest.raises(BadInputError, match="video clips"):
        export_checkpoint(tmp_path / "m.pt", tmp_path / "q.onnx", int8="moving-digits", verify=False)
    assert not (tmp_path / "q.onnx").exists()
