"""``gfgp bench export``: PyTorch eager, onnxruntime on the converted model and onnxruntime on the
original model the conversion spec rebuilds, timed together; the ratios come from the medians.

Structure only: no assertion on a speed (the machine is shared). The MACs are checked against
an independent count (forward hooks on every Conv2d and Linear: output elements x inputs per output).
"""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gfgp_cli
from gfgp_cli.commands.export import bench_export_command
from gfgp_cli.export import BenchExportResult, bench_export
from gfgp_cli.export.bench import original_model

FACTORY_CODE = '''
from torch import nn


def small_net(width=8, num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes))
'''


@pytest.fixture
def factory_model(tmp_path, monkeypatch):
    """A converted model whose spec names a factory (``gfgp_bench_models:small_net``) the
    original can be rebuilt from."""
    (tmp_path / "gfgp_bench_models.py").write_text(FACTORY_CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield gfgp_cli.convert("gfgp_bench_models:small_net", width=8, image_size=32, seed=0).eval()
    sys.modules.pop("gfgp_bench_models", None)


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear in one forward pass of ``x`` (batch 1)."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total[0] += output.numel() * per_output

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def test_the_original_is_timed_with_the_converted_model_and_the_ratios_are_the_medians(factory_model):
    result = bench_export(factory_model, batch=2, image_size=32, repeats=3, warmup=1)
    assert result.original == "gfgp_bench_models:small_net (original)" and result.original_note is None
    for times in (result.torch_times_ms, result.ort_times_ms, result.original_ort_times_ms):
        assert times is not None and len(times) == 3 and all(t > 0 for t in times)
    assert result.torch_ms == pytest.approx(statistics.median(result.torch_times_ms), abs=1e-3)
    assert result.ort_ms == pytest.approx(statistics.median(result.ort_times_ms), abs=1e-3)
    assert result.original_ort_ms == pytest.approx(statistics.median(result.original_ort_times_ms), abs=1e-3)
    assert result.time_ratio == pytest.approx(result.ort_ms / result.original_ort_ms)
    one = torch.randn(1, 3, 32, 32)
    original, _ = original_model(factory_model)
    assert result.original_macs == hooked_macs(original.eval(), one)
    assert result.macs == hooked_macs(factory_model, one)
    # the stride-2 convolutions run at stride 1 in the converted model: more MACs
    assert result.macs > result.original_macs
    assert result.macs_ratio == pytest.approx(result.macs / result.original_macs)
    assert result.time_per_macs_ratio == pytest.approx(result.time_ratio / result.macs_ratio)
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["time_ratio"] == result.time_ratio and data["macs_ratio"] == result.macs_ratio
    assert result.original_onnx_bytes > 0 and result.maxent_layers == 3  # 2 strided convs, 1 max pool


def test_the_original_is_an_unconverted_model_with_the_factory_arguments(factory_model):
    original, label = original_model(factory_model)
    assert label == "gfgp_bench_models:small_net (original)"
    assert not any(isinstance(m, gfgp_cli.GFGPPool2d) for m in original.modules())
    assert sum(isinstance(m, nn.MaxPool2d) for m in original.modules()) == 1
    assert original(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_without_a_rebuildable_spec_there_is_no_original_row_and_the_note_says_why(tiny_model):
    result = bench_export(tiny_model, batch=1, image_size=20, repeats=1, warmup=0)
    assert result.original is None and result.original_ort_ms is None and result.time_ratio is None
    assert result.macs_ratio is None and result.time_per_macs_ratio is None and result.macs > 0
    assert "no gfgp conversion spec" in result.original_note and "original=" in result.original_note
    # an original passed in is timed instead
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    given = bench_export(tiny_model, batch=1, image_size=20, repeats=1, warmup=0, original=plain)
    assert given.original == "Sequential (original)" and given.original_macs == hooked_macs(plain, torch.zeros(1, 3, 20, 20))


def test_original_false_times_no_original_and_a_wrong_value_is_bad_input(factory_model):
    from gfgp_cli.errors import BadInputError

    result = bench_export(factory_model, batch=1, image_size=32, repeats=1, warmup=0, original=False)
    assert result.original_ort_ms is None and result.original_note == "not asked for"
    with pytest.raises(BadInputError, match="original must be True, False or an nn.Module"):
        bench_export(factory_model, batch=1, image_size=32, repeats=1, warmup=0, original="resnet18")


def _result(**changes) -> BenchExportResult:
    fields = dict(model="resnet18.pt", batch=8, image_size=224, threads=2, repeats=5, torch_ms=100.0, ort_ms=80.0,
                  torch_times_ms=[100.0], ort_times_ms=[80.0], max_abs_diff=1e-6, onnx_bytes=1, maxent_layers=5,
                  macs=3_000_000_000, original="resnet18 (original)", original_ort_ms=40.0, original_ort_times_ms=[40.0],
                  original_macs=1_500_000_000, original_onnx_bytes=1)
    return BenchExportResult(**{**fields, **changes})


def test_the_table_shows_every_row_and_the_time_ratio_next_to_the_macs_ratio():
    from gfgp_cli.console import out
    from gfgp_cli.export.render import render_bench_export

    with out.capture() as captured:
        render_bench_export(_result())
    text = captured.get()
    for expected in ("PyTorch eager", "100.0", "80.0", "0.80", "40.0", "0.40", "3.000", "1.500",
                     "time ratio 2.00, MACs ratio 2.00, time / MACs ratio 1.00"):
        assert expected in text, expected
    with out.capture() as captured:
        render_bench_export(_result(original=None, original_ort_ms=None, original_ort_times_ms=None, original_macs=None,
                                    original_note="converted from your own module m.Net; pass original= to compare"))
    text = captured.get()
    assert "no original model timed: converted from your own module m.Net" in text and "40.0" not in text


def test_the_command_times_the_checkpoints_original(factory_model, tmp_path):
    gfgp_cli.save(factory_model, tmp_path / "m.pt")
    args = [str(tmp_path / "m.pt"), "--batch-size", "1", "--image-size", "32", "--repeats", "1", "--json"]
    data = json.loads(CliRunner().invoke(bench_export_command, args, catch_exceptions=False).stdout)
    assert data["original"] == "gfgp_bench_models:small_net (original)"
    assert data["time_ratio"] == pytest.approx(data["ort_ms"] / data["original_ort_ms"])
    assert data["macs_ratio"] == pytest.approx(data["macs"] / data["original_macs"])
    data = json.loads(CliRunner().invoke(bench_export_command, [*args, "--no-original"], catch_exceptions=False).stdout)
    assert data["original_ort_ms"] is None and data["time_ratio"] is None
