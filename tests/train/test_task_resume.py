"""Crash safety and DDP for the segmentation and detection tasks (their meters in the checkpoint
and in the all-reduce, detection's predictions gathered from every rank): a segmentation run
SIGKILLed mid-epoch then --resume is bit-exact; two gloo processes train and validate like one
process with the same global batch (accumulation 2), for a segmentation model and a detector."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import pytest
import torch

from gfgp_cli.checkpoint import read_checkpoint

# The tests' shared helpers, loaded by path (--import-mode=importlib: no test folder on sys.path).
_spec = importlib.util.spec_from_file_location("gfgp_tests_task_run", Path(__file__).parent / "task_run.py")
task_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_run)

DATA = "scenes:0:train=24:val=8"  # 6 steps of 4 scenes per epoch
DET_DATA = "scenes:0:train=8:val=4"  # 1 step of 8 scenes: 4 per process, or 2 micro-batches of 4


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    return task_run.converted(tmp_path_factory, "lraspp_mobilenet_v3_large", "segmentation", num_classes=11,
                              image_size=32, seed=0)


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory):
    """The detector at 64x64, its RPN and box head sampling every anchor and proposal they label
    (512 per image, more than the 300 anchors of a 64x64 image): their random choice among them
    then only orders the samples, so two processes and one process train on the same samples."""
    return task_run.converted(tmp_path_factory, "fasterrcnn_mobilenet_v3_large_320_fpn", "detection", num_classes=11,
                              min_size=64, max_size=64, image_size=64, seed=0, rpn_batch_size_per_image=512,
                              box_batch_size_per_image=512)


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(seg_checkpoint, tmp_path, subprocess_env):
    from gfgp_cli.train import train

    flags = dict(epochs=2, batch_size=4, lr=0.01, deterministic=True, save_every_steps=2)
    train(str(seg_checkpoint), DATA, str(tmp_path / "whole"), **flags)

    # The 10th training forward is epoch 2, step 4 (0-based 3): after the checkpoint of step 2.
    killed = tmp_path / "killed"
    proc = task_run.run_script(seg_checkpoint, DATA, killed, flags, subprocess_env, kill_at=10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = read_checkpoint(killed / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert state["meters"][0]["count"] == 8 and int(state["meters"][0]["confusion"].sum()) > 0  # the partial sums

    train(None, None, str(killed), resume=True)
    task_run.same_run(tmp_path / "whole", killed)  # the interrupted epoch's mIoU included


def _ddp_and_one(checkpoint, data, flags, tmp_path, env):
    """``(DDP last.pt, the one-process run's result)``: two gloo processes, and one process with
    accumulation 2, of the same global batch from the same checkpoint; their trained parameters
    equal (BatchNorm's running statistics follow rank 0's half alone, so they are not compared)."""
    from gfgp_cli import load
    from gfgp_cli.train import train

    proc = task_run.run_script(checkpoint, data, tmp_path / "ddp", flags, env, ddp=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert len(ddp["rng"]) == 2
    one = train(str(checkpoint), data, str(tmp_path / "one"), accum_steps=2, **flags)
    model = load(tmp_path / "ddp" / "last.pt")
    single = read_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    for name, _ in model.named_parameters():
        torch.testing.assert_close(ddp["state_dict"][name], single[name], rtol=1e-3, atol=1e-4, msg=name)
    return ddp, one


def test_two_gloo_processes_train_and_validate_like_one_process(seg_checkpoint, tmp_path, subprocess_env):
    from gfgp_cli.train import evaluate_checkpoint

    ddp, one = _ddp_and_one(seg_checkpoint, DATA, dict(epochs=1, batch_size=8, lr=0.01), tmp_path, subprocess_env)
    row, ref = ddp["history"][0], one.final
    assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert row["train_miou"] == pytest.approx(ref["train_miou"], rel=1e-5)
    # validation: each process scored half the scenes, and the summed confusion matrix and losses
    # are the whole set's: one process evaluating the same weights gets the same numbers
    metrics = evaluate_checkpoint(str(tmp_path / "ddp" / "last.pt"), DATA, batch_size=3)
    for key in ("loss", "miou", "pixel_acc"):
        assert row[f"val_{key}"] == pytest.approx(metrics[key], rel=1e-5), key


def test_a_detector_in_two_gloo_processes_trains_and_validates_like_one_process(det_checkpoint, tmp_path,
                                                                                  subprocess_env):
    from gfgp_cli.train import evaluate_checkpoint

    flags = dict(epochs=2, batch_size=8, lr=0.01, clip_grad_norm=10.0)
    ddp, one = _ddp_and_one(det_checkpoint, DET_DATA, flags, tmp_path, subprocess_env)
    for row, ref in zip(ddp["history"], read_checkpoint(tmp_path / "one" / "last.pt")["history"]):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)  # the summed loss dict, per image
    # validation: each process predicted for half the scenes; the gathered predictions give the
    # mAP one process computes for the same weights over all of them
    metrics = evaluate_checkpoint(str(tmp_path / "ddp" / "last.pt"), DET_DATA, batch_size=3)
    row = ddp["history"][-1]
    assert metrics["images"] == 4
    assert (row["val_map"], row["val_map50"]) == pytest.approx((metrics["map"], metrics["map50"]), rel=1e-5, abs=1e-9)


def test_two_gloo_processes_gather_every_detection_for_the_map(subprocess_env):
    """A barely trained detector scores about 0 mAP whatever it is shown; boxes moved 3 px give a
    mAP well inside (0, 100) that changes with every image left out, so the two processes' mAP
    equals one process's only if each one's predictions reach the COCO evaluation. Every score
    is 1: pycocotools breaks those ties by image order, so the equality also needs the gathered
    predictions back in the validation set's order."""
    data = "scenes:0:train=8:val=9"  # 5 and 4 scenes in the two shards
    one = task_run.scored(task_run.PerfectDetector(task_run.validation(data, 64, "detection"), 3.0), data, 64,
                          "detection")
    two = task_run.score_in_two_processes(data, 64, 3.0, subprocess_env)
    assert 0 < one["map"] < 100 and one["images"] == 9
    assert (two["map"], two["map50"], two["images"]) == (one["map"], one["map50"], 9)
