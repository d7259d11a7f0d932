"""The verification rule (gfgp_cli.export.verify): a runtime is judged against PyTorch float64,
with a tolerance of max(RTOL x output scale, FLOAT32_ERROR_FACTOR x PyTorch's own float32 error).

float32 noise on a model whose outputs are small next to its activations passes (the fixed 1e-4
rule of earlier releases failed such valid files); a true mismatch still fails, on that model too.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gfgp_cli import GFGPPool2d, export_onnx
from gfgp_cli.errors import WorkFailedError
from gfgp_cli.export.runtime import make_session, run_session
from gfgp_cli.export.verify import FLOAT32_ERROR_FACTOR, RTOL, Reference, judge, reference_outputs

_nets_spec = importlib.util.spec_from_file_location("_nets", Path(__file__).with_name("_nets.py"))
_nets = importlib.util.module_from_spec(_nets_spec)
_nets_spec.loader.exec_module(_nets)
LargeActivations = _nets.LargeActivations

SIZE = 8


def test_float32_noise_on_large_activations_passes_where_the_fixed_rule_failed(tmp_path):
    model = LargeActivations().eval()
    report = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE)
    assert report.passed and report.reference == "float64"
    # The oracle, computed here independently: PyTorch float32 and a float64 copy on a new input.
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want32 = model(x).double().numpy()
        want64 = copy.deepcopy(model).double()(x.double()).numpy()
    got = run_session(make_session(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]), [x.numpy()])[0]
    scale = np.abs(want64).max()
    own_error = np.abs(want32 - want64).max()
    assert own_error > 3 * RTOL * scale  # PyTorch float32 itself misses the fixed rule
    assert np.abs(got - want32).max() > RTOL * scale  # so the old rule (vs float32, 1e-4) failed this valid file
    assert np.abs(got - want64).max() < FLOAT32_ERROR_FACTOR * own_error  # and the runtime is as close as float32 is
    # The report's own numbers agree with the oracle's order of magnitude.
    assert report.float32_error == pytest.approx(own_error, rel=1.0)
    assert report.tolerance == pytest.approx(FLOAT32_ERROR_FACTOR * report.float32_error)
    assert all(d <= report.tolerance for d in report.max_abs_diffs.values())


class _OffInExport(nn.Module):
    """LargeActivations whose exported file adds 1% of the output's size: a true mismatch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = LargeActivations()

    def forward(self, x):
        y = self.net(x)
        return y + 0.01 * y.abs().max() if torch.onnx.is_in_onnx_export() else y


def test_a_true_mismatch_still_fails_on_the_same_model(tmp_path):
    with pytest.raises(WorkFailedError, match=r"differs from PyTorch float64: .* PyTorch's own float32 error"):
        export_onnx(_OffInExport().eval(), tmp_path / "bad.onnx", image_size=SIZE)


def _reference(error, scale=1.0) -> Reference:
    want = np.array([[scale, -scale / 2]])
    return Reference(cases=[(1, SIZE)], inputs=[[np.zeros((1, 3, SIZE, SIZE), np.float32)]], outputs=[[want]],
                     float32_error=error, scale=scale)


@pytest.mark.parametrize("error", [None, 0.0, 1e-3])
def test_judge_applies_the_larger_of_the_two_bounds(error):
    reference = _reference(error)
    tolerance = max(RTOL, FLOAT32_ERROR_FACTOR * (error or 0.0))
    for offset, passes in ((0.99 * tolerance, True), (1.01 * tolerance, False)):
        out = reference.outputs[0][0] + offset
        comparison = judge(reference, lambda xs, out=out: [out], "onnxruntime", "CPUExecutionProvider")
        assert comparison.passed is passes and comparison.tolerance == pytest.approx(tolerance)
        assert comparison.reference == ("float32" if error is None else "float64")


def test_judge_fails_nan_and_wrong_shapes():
    reference = _reference(1e-3)
    assert not judge(reference, lambda xs: [np.full((1, 2), np.nan)], "openvino", "CPU").passed
    wrong = judge(reference, lambda xs: [np.zeros((1, 3))], "openvino", "CPU")
    assert not wrong.passed and "openvino (CPU) returned outputs of shapes" in wrong.failure


class _Float32Only(nn.Module):
    """A model that refuses float64 (an op without a double kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = GFGPPool2d(3, 2)

    def forward(self, x):
        if x.dtype != torch.float32:
            raise RuntimeError("no float64 kernel")
        return self.pool(x)


def test_a_model_without_float64_is_judged_by_the_fixed_rule():
    reference = reference_outputs(_Float32Only().eval(), [(1, SIZE), (3, SIZE)], 3, 0, torch.device("cpu"))
    assert reference.float32_error is None and reference.kind == "float32"
    assert reference.tolerance() == pytest.approx(RTOL * reference.scale)
    assert all(o.dtype == np.float64 for outs in reference.outputs for o in outs)
