"""Unreadable images in an ImageFolder data set: one-line errors naming the file (any --workers),
a checkpoint kept so that --resume after the fix is exact, and --skip-bad-images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli

CLASSES = 10  # the `converted` checkpoint's outputs
# 20 training images (5 steps of 4 per epoch), 10 validation images; --recipe paper-vgg (log-linear
# decay), so a resumed run must also land on the right learning rate.
TRAIN = ["--epochs", "2", "--batch-size", "4", "--recipe", "paper-vgg", "--deterministic"]
BAD_TRAIN = ("train", "c3", "1.jpg")
BAD_VAL = ("val", "c7", "0.png")


def _folder(root):
    """CLASSES classes, 2 training JPEGs and 1 validation PNG each, 24x24 noise."""
    rng = np.random.RandomState(0)
    for split, n, ext in (("train", 2, "jpg"), ("val", 1, "png")):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.{ext}")
    return root


@pytest.fixture
def clean(tmp_path):
    return _folder(tmp_path / "clean")


@pytest.fixture
def bad(clean, tmp_path):
    """A copy of `clean` with a truncated training JPEG and an empty validation PNG; bad.fix()
    puts the original files back."""
    root = tmp_path / "bad"
    shutil.copytree(clean, root)
    train_file, val_file = root.joinpath(*BAD_TRAIN), root.joinpath(*BAD_VAL)
    good = {train_file: train_file.read_bytes(), val_file: val_file.read_bytes()}
    train_file.write_bytes(good[train_file][: len(good[train_file]) // 2])
    val_file.write_bytes(b"")

    class Bad:
        path, train, val = root, train_file, val_file

        @staticmethod
        def fix(which=None):
            for f in [which] if which is not None else list(good):
                f.write_bytes(good[f])

    return Bad


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _error_line(result):
    """The one line the CLI printed for the error (and no traceback)."""
    assert "Traceback" not in result.output and "Caught" not in result.output, result.output[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output[-3000:]
    assert len(errors[0]) < 400, errors[0]
    return errors[0]


def _rows(run):
    drop = ("images_per_s", "epoch_time_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    a, b = read_checkpoint(a / "last.pt")["state_dict"], read_checkpoint(b / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _stopped_by(broken, converted, clean, bad, tmp_path, workers):
    """``(whole, run, error line)``: a clean run in tmp/whole, and the run in tmp/run that the one
    ``broken`` file (the other is put back) stops with exit 2."""
    bad.fix(bad.val if broken == bad.train else bad.train)
    whole = tmp_path / "whole"
    assert _invoke("train", converted, "--data", clean, "--out", whole, *TRAIN).exit_code == 0
    run = tmp_path / "run"
    result = _invoke("train", converted, "--data", bad.path, "--out", run, *TRAIN, "--workers", workers)
    assert result.exit_code == 2, result.output[-3000:]
    return whole, run, _error_line(result)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_training_image_stops_at_a_step_then_resume_after_the_fix_is_exact(converted, clean, bad, tmp_path,
                                                                                         workers):
    whole, run, line = _stopped_by(bad.train, converted, clean, bad, tmp_path, workers)
    assert f"cannot read image {bad.train}: the file is truncated; remove or replace it, or pass --skip-bad-images" in line
    state = read_checkpoint(run / "last.pt")
    assert state["epoch"] == 0 and 0 <= state["step"] < 5  # the steps done before the batch holding it
    assert f"last.pt keeps the run at epoch 1 step {state['step']}, and --resume continues it" in line

    bad.fix()
    result = _invoke("train", converted, "--data", bad.path, "--out", run, *TRAIN, "--resume")
    assert result.exit_code == 0, result.output[-3000:]
    _same_weights(whole, run)
    assert _rows(run) == _rows(whole)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_empty_validation_image_keeps_the_epochs_training_and_resume_validates_it(converted, clean, bad, tmp_path,
                                                                                      workers):
    whole, run, line = _stopped_by(bad.val, converted, clean, bad, tmp_path, workers)
    assert f"cannot read image {bad.val}: the file is empty (0 bytes); remove or replace it" in line
    assert "last.pt keeps epoch 1's training, and --resume continues with its validation" in line
    state = read_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 5)  # every step of epoch 1, not yet validated
    assert _rows(run) == [] and not (run / "best.pt").exists()

    bad.fix()
    result = _invoke("train", converted, "--data", bad.path, "--out", run, *TRAIN, "--resume", "--json")
    assert result.exit_code == 0, result.output[-3000:]
    assert "lr_scheduler.step()" not in result.output  # no torch warning for the epoch resumed after its steps
    _same_weights(whole, run)
    assert _rows(run) == _rows(whole)


def test_skip_bad_images_finishes_counts_them_and_is_the_same_for_any_worker_count(converted, bad, tmp_path):
    runs = []
    for workers in (0, 2):
        run = tmp_path / f"run{workers}"
        result = _invoke("train", converted, "--data", bad.path, "--out", run, *TRAIN, "--skip-bad-images",
                         "--workers", workers)
        assert result.exit_code == 0, result.output[-3000:]
        assert (f"skipped 1 unreadable image in {bad.path / 'train'} (each replaced by the next readable image): "
                f"first {bad.train} (the file is truncated)") in result.output
        assert (f"skipped 1 unreadable image in {bad.path / 'val'} (left out of the metrics): "
                f"first {bad.val} (the file is empty (0 bytes))") in result.output
        assert len(_rows(run)) == 2
        runs.append(run)
    _same_weights(*runs)  # the replacement depends on the files only
    assert _rows(runs[0]) == _rows(runs[1])


def test_eval_names_an_unreadable_image_or_leaves_it_out(converted, bad):
    result = _invoke("eval", converted, "--data", bad.path, "--workers", 2)
    assert result.exit_code == 2
    assert f"cannot read image {bad.val}: the file is empty (0 bytes)" in _error_line(result)

    result = _invoke("eval", converted, "--data", bad.path, "--skip-bad-images", "--json")
    assert result.exit_code == 0, result.output[-3000:]
    assert f"skipped 1 unreadable image in {bad.path / 'val'}" in result.stderr
    report = json.loads(result.stdout)
    assert (report["images"], report["skipped_images"]) == (CLASSES - 1, 1)


def test_a_workers_error_is_the_same_one_line_as_in_the_main_process(bad):
    from gfgp_cli.train.data import UnreadableImageError, load_data, loader_batches

    val = load_data(str(bad.path), 16).val
    messages = []
    for workers in (0, 2):
        with pytest.raises(UnreadableImageError) as e:
            with loader_batches(DataLoader(val, batch_size=4, num_workers=workers)) as batches:
                for _ in batches:
                    pass
        messages.append(str(e.value))
    assert messages[0] == messages[1] == (f"cannot read image {bad.val}: the file is empty (0 bytes); "
                                          "remove or replace it, or pass --skip-bad-images")


def test_a_stopped_run_resumes_with_skip_bad_images_as_its_message_suggests(converted, bad, tmp_path):
    run = tmp_path / "run"
    result = _invoke("train", converted, "--data", bad.path, "--out", run, *TRAIN)
    assert "or pass --skip-bad-images" in _error_line(result)
    result = _invoke("train", converted, "--data", bad.path, "--out", run, *TRAIN, "--resume", "--skip-bad-images",
                     "--json")
    assert result.exit_code == 0, result.output[-3000:]
    assert "resumed with skip_bad_images False -> True" in result.output
    assert json.loads(result.stdout)["epochs"] == 2
