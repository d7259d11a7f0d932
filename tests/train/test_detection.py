"""Detection models (torchvision's Faster R-CNN & co: a list of images in, the loss dict in train
mode, a list of {"boxes", "scores", "labels"} in eval mode) through ``gfgp train`` / ``gfgp eval``
on the digit scenes: a converted fasterrcnn_mobilenet_v3_large_320_fpn learning for two epochs on
tiny images, eval reproducing its validation mAP, the evaluation path scoring a perfect detector
100, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

# The tests' shared helpers, loaded by path (--import-mode=importlib: no test folder on sys.path).
_spec = importlib.util.spec_from_file_location("gfgp_tests_task_run", Path(__file__).parent / "task_run.py")
task_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_run)
_invoke, _rows = task_run.invoke, task_run.rows

SIZE = 64
DATA = "scenes:0:train=8:val=4"  # 2 steps of 4 scenes per epoch, 4 validation scenes


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory):
    """fasterrcnn_mobilenet_v3_large_320_fpn (11 classes, background included) converted for 64x64
    images (min_size = max_size = 64, so its transform keeps them at 64), saved."""
    return task_run.converted(tmp_path_factory, "fasterrcnn_mobilenet_v3_large_320_fpn", "detection", num_classes=11,
                              min_size=SIZE, max_size=SIZE, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def det_run(det_checkpoint, tmp_path_factory):
    run = tmp_path_factory.mktemp("det") / "run"
    torch.set_num_threads(1)
    result = _invoke("train", det_checkpoint, "--data", DATA, "--out", run, "--epochs", 2, "--batch-size", 4,
                     "--lr", 0.01, "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_detection_model_trains_on_its_own_losses(det_run):
    run, report = det_run
    assert (report["task"], report["best_metric"], report["epochs"]) == ("detection", "map", 2)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["epoch", "lr", "train_loss", "val_map", "val_map50", "images_per_s", "epoch_time_s"]
    rows = _rows(run)
    for row in rows:
        assert math.isfinite(row["train_loss"]) and 0 <= row["val_map"] <= row["val_map50"] <= 100, row
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # the summed loss dict goes down


def test_gfgp_eval_reproduces_the_last_validation(det_run):
    run, _ = det_run
    result = _invoke("eval", run / "last.pt", "--data", DATA, "--json")
    assert result.exit_code == 0, result.output
    metrics, last = json.loads(result.stdout), _rows(run)[-1]
    assert (metrics["task"], metrics["images"]) == ("detection", 4)
    assert metrics["map"] == pytest.approx(last["val_map"]) and metrics["map50"] == pytest.approx(last["val_map50"])
    table = _invoke("eval", run / "last.pt", "--data", DATA).output
    assert "mAP@[.5:.95] (%)" in table and "mAP@.5 (%)" in table


def test_the_evaluation_scores_a_perfect_detector_100_and_a_shifted_one_less():
    data = "scenes:0:train=8:val=20"
    model = task_run.PerfectDetector(task_run.validation(data, SIZE, "detection"))
    metrics = task_run.scored(model, data, SIZE, "detection")
    assert (metrics["map"], metrics["map50"], metrics["images"], metrics["nonfinite"]) == (100.0, 100.0, 20, 0)
    with torch.no_grad():
        model.weight.fill_(3.0)  # every box moved 3 px right and down: IoU < 1, most still above 0.5
    shifted = task_run.scored(model, data, SIZE, "detection")
    assert 0 < shifted["map"] < shifted["map50"] <= 100.0


def test_detection_refuses_label_smoothing_and_names_pycocotools_when_missing(det_checkpoint, tmp_path, monkeypatch):
    result = _invoke("train", det_checkpoint, "--data", DATA, "--out", tmp_path / "a", "--label-smoothing", 0.1)
    assert result.exit_code == 2 and "--label-smoothing" in result.output, result.output
    import gfgp_cli.train.tasks as tasks

    def missing():
        from gfgp_cli.errors import BadInputError

        raise BadInputError("detection metrics need pycocotools: pip install 'gfgp[detection]'")

    monkeypatch.setattr(tasks, "_pycocotools", missing)
    result = _invoke("train", det_checkpoint, "--data", DATA, "--out", tmp_path / "b", "--epochs", 1)
    assert result.exit_code == 2 and "pip install 'gfgp[detection]'" in result.output, result.output
    assert not (tmp_path / "b").exists()  # refused before anything was written
