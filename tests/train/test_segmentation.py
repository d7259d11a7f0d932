"""Segmentation models (torchvision's LR-ASPP, FCN, DeepLabV3: ``{"out": Tensor[N, C, H, W]}``)
through ``gfgp train`` / ``gfgp eval`` / ``gfgp plot`` on the digit scenes: a converted
lraspp_mobilenet_v3_large learning for two epochs end to end, eval reproducing its validation,
the evaluation path scoring a perfect segmenter 100, AMP + channels_last + accumulation, the NaN
stop, exact resume, and the one-line refusals of mismatched data."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.errors import WorkFailedError

# The tests' shared helpers, loaded by path (--import-mode=importlib: no test folder on sys.path).
_spec = importlib.util.spec_from_file_location("gfgp_tests_task_run", Path(__file__).parent / "task_run.py")
task_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_run)
_invoke, _one_line_error, _rows = task_run.invoke, task_run.one_line_error, task_run.rows

SIZE = 32
DATA = "scenes:0:train=16:val=8"  # 4 steps of 4 scenes per epoch, 8 validation scenes


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    """lraspp_mobilenet_v3_large (11 classes) converted by gfgp_cli.convert at 32x32, saved."""
    return task_run.converted(tmp_path_factory, "lraspp_mobilenet_v3_large", "segmentation", num_classes=11,
                              image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def seg_run(seg_checkpoint, tmp_path_factory):
    run = tmp_path_factory.mktemp("seg") / "run"
    torch.set_num_threads(1)
    result = _invoke("train", seg_checkpoint, "--data", DATA, "--out", run, "--epochs", 2, "--batch-size", 4,
                     "--lr", 0.01, "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_segmentation_model_learns_on_the_scenes(seg_run):
    run, report = seg_run
    assert (report["task"], report["best_metric"], report["epochs"]) == ("segmentation", "miou", 2)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["epoch", "lr", "train_loss", "train_pixel_acc", "train_miou", "val_loss", "val_pixel_acc",
                      "val_miou", "images_per_s", "epoch_time_s"]
    rows = _rows(run)
    assert len(rows) == 2
    for row in rows:
        for key in ("train_loss", "val_loss", "train_miou", "val_miou", "val_pixel_acc"):
            assert math.isfinite(row[key]), row
        assert 0 <= row["val_miou"] <= 100 and 0 <= row["val_pixel_acc"] <= 100
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # it learns
    best = max(rows, key=lambda r: r["val_miou"])
    assert report["best_value"] == best["val_miou"] and report["best_epoch"] == best["epoch"]
    assert read_checkpoint(run / "best.pt")["best"] == {"epoch": best["epoch"], "miou": best["val_miou"]}


def test_gfgp_eval_reproduces_the_last_validation(seg_run):
    run, _ = seg_run
    result = _invoke("eval", run / "last.pt", "--data", DATA, "--json")
    assert result.exit_code == 0, result.output
    metrics, last = json.loads(result.stdout), _rows(run)[-1]
    assert (metrics["task"], metrics["images"], metrics["image_size"]) == ("segmentation", 8, SIZE)
    for key in ("miou", "pixel_acc", "loss"):
        assert metrics[key] == pytest.approx(last[f"val_{key}"], rel=1e-5, abs=1e-6)
    table = _invoke("eval", run / "last.pt", "--data", DATA).output
    assert "mIoU (%)" in table and "pixel acc (%)" in table and f"{last['val_miou']:.2f}" in table
    assert "top-1" not in table


def test_plot_draws_the_task_metrics(seg_run, tmp_path):
    from gfgp_cli.train.plots import _METRIC_PANELS
    from gfgp_cli.train.tasks import task_of_row

    run, _ = seg_run
    result = _invoke("plot", run, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.iterdir()} == {"loss.png", "accuracy.png", "lr.png"}
    # the metric panel's series are the rows' segmentation metrics
    rows = _rows(run)
    assert all(key in rows[0] for key, _ in _METRIC_PANELS["segmentation"][1])
    assert task_of_row(rows[0]).name == "segmentation"


class PerfectSegmenter(nn.Module):
    """Scores 1 on each pixel's true class (looked up by the image), LR-ASPP's output form."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.masks = {dataset[i][0].numpy().tobytes(): dataset[i][1] for i in range(len(dataset))}
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        masks = torch.stack([self.masks[image.numpy().tobytes()] for image in x])
        scores = nn.functional.one_hot(masks.clamp(max=10), 11).permute(0, 3, 1, 2).float()
        return {"out": scores * 20 + self.weight}


def test_the_evaluation_scores_a_perfect_segmenter_100():
    model = PerfectSegmenter(task_run.validation(DATA, SIZE, "segmentation"))
    metrics = task_run.scored(model, DATA, SIZE, "segmentation")
    assert (metrics["miou"], metrics["pixel_acc"], metrics["images"], metrics["nonfinite"]) == (100.0, 100.0, 8, 0)
    assert metrics["loss"] < 1e-6


def test_amp_channels_last_and_accumulation_train(seg_checkpoint, tmp_path):
    from gfgp_cli.train import train

    result = train(str(seg_checkpoint), DATA, str(tmp_path / "run"), epochs=1, batch_size=4, accum_steps=2, lr=0.01,
                   amp=True, channels_last=True)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["accum_steps"], config["amp"], config["channels_last"]) == (2, True, True)
    assert math.isfinite(result.final["train_loss"]) and math.isfinite(result.final["val_miou"])


def test_a_nan_loss_stops_the_run(seg_checkpoint, tmp_path):
    from gfgp_cli import load
    from gfgp_cli.spec import spec_of
    from gfgp_cli.train import train

    model = load(seg_checkpoint)
    calls = []

    def nan_from_the_third(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) >= 3:
                return {k: v * float("nan") for k, v in output.items()}
        return output

    model.register_forward_hook(nan_from_the_third)
    with pytest.raises(WorkFailedError, match=r"diverged: the loss became nan at epoch 1 step 3"):
        train(str(seg_checkpoint), DATA, str(tmp_path / "run"), model=model, spec=spec_of(model), epochs=1,
              batch_size=4, lr=0.01, memory_limit=1 << 40, accum_steps=1)


def test_resume_continues_exactly(seg_checkpoint, tmp_path):
    from gfgp_cli.train import train

    flags = dict(batch_size=4, lr=0.01, deterministic=True)
    train(str(seg_checkpoint), DATA, str(tmp_path / "whole"), epochs=2, **flags)
    train(str(seg_checkpoint), DATA, str(tmp_path / "split"), epochs=1, save_every_steps=2, **flags)
    train(None, None, str(tmp_path / "split"), resume=True, epochs=2)
    task_run.same_run(tmp_path / "whole", tmp_path / "split")


def test_mismatched_data_is_refused_in_one_line(seg_checkpoint, converted, tmp_path):
    message = _one_line_error(_invoke("train", seg_checkpoint, "--data", "digits", "--out", tmp_path / "a"))
    assert "segmentation model" in message and "--data scenes" in message
    message = _one_line_error(_invoke("eval", converted, "--data", DATA))
    assert "classifier" in message and "segmentation and detection" in message
    message = _one_line_error(_invoke("train", seg_checkpoint, "--data", DATA, "--out", tmp_path / "b", "--mixup", 0.2))
    assert "--mixup" in message
