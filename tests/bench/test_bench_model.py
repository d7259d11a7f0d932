"""`gfgp bench model`: both models are stepped and reported with consistent ratios (never timing values)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from gfgp_cli.bench.report import print_model_report
from gfgp_cli.cli import cli

ARGS = ["bench", "model", "resnet18", "--batch-size", "2", "--image-size", "32", "--repeats", "1"]


@pytest.fixture(scope="module")
def result():
    run = CliRunner().invoke(cli, [*ARGS, "--json"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    return json.loads(run.output)


def test_bench_model_reports_original_and_converted(result):
    assert (result["model"], result["pool"], result["batch_size"], result["image_size"]) == ("resnet18", "gfgp", 2, 32)
    original, converted, recomputing = result["rows"]
    assert original["model"] == "resnet18" and converted["model"] == "resnet18 (gfgp)"
    assert recomputing["model"] == "resnet18 (gfgp, act-ckpt)" and recomputing["macs"] == converted["macs"]
    assert original["macs_ratio"] == original["time_ratio"] == original["time_per_macs_ratio"] == 1.0
    assert converted["macs_ratio"] == pytest.approx(converted["macs"] / original["macs"])
    assert converted["time_ratio"] == pytest.approx(converted["step_ms"] / original["step_ms"])
    assert converted["time_per_macs_ratio"] == pytest.approx(converted["time_ratio"] / converted["macs_ratio"])
    # GFGP adds its lam estimators; the convolutions at full resolution add MACs (docs/method.md section 3).
    assert converted["params"] > original["params"] and converted["macs_ratio"] > 1.5


def test_bench_model_macs_are_flop_counter_halves(result):
    model = torchvision.models.resnet18().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert result["rows"][0]["macs"] == counter.get_total_flops() // 2
    assert result["rows"][0]["params"] == sum(p.numel() for p in model.parameters())


def test_bench_model_table(result, capsys):
    print_model_report(result, as_json=False)
    out = capsys.readouterr().out
    for text in ("resnet18", "(gfgp)", "MACs", "ratio", "time", "1.00", "converted / original"):
        assert text in out


def test_bench_model_channels_last_runs_every_model_in_that_format(monkeypatch):
    from gfgp_cli.bench import model as bench_model_module

    formats = []
    step = bench_model_module._train_step

    def spy(model, x, y):  # record the layout each model's parameters and the batch are in
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        formats.append((conv.weight.is_contiguous(memory_format=torch.channels_last),
                        x.is_contiguous(memory_format=torch.channels_last)))
        return step(model, x, y)

    monkeypatch.setattr(bench_model_module, "_train_step", spy)
    run = CliRunner().invoke(cli, [*ARGS, "--channels-last", "--json"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["memory_format"] == "channels_last"
    assert formats == [(True, True)] * 3  # original, converted, converted with activation checkpointing


def test_bench_model_default_is_contiguous(result):
    assert result["memory_format"] == "contiguous"


@pytest.mark.parametrize("args,message", [
    (["bench", "model", "resnet5O"], "unknown model 'resnet5O'; did you mean resnet50?"),
    (["bench", "model", "resnet18", "--batch-size", "1"], "--batch-size"),
])
def test_bench_model_bad_input_exits_2_with_one_line(args, message):
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 2
    lines = [line for line in run.output.splitlines() if line.strip()]
    assert message in run.output and (len(lines) == 1 or lines[0].startswith("Usage"))


def test_bench_model_measures_the_peak_memory_of_each_step(result):
    original, converted, recomputing = result["rows"]
    assert all(r["peak_memory_bytes"] > 0 for r in result["rows"])
    assert converted["memory_ratio"] == pytest.approx(converted["peak_memory_bytes"] / original["peak_memory_bytes"])
    assert original["memory_ratio"] == 1.0
