"""Crash safety and DDP for a segmentation model (the task's meters, a confusion matrix, in the
checkpoint and in the all-reduce): SIGKILL mid-epoch then --resume is bit-exact, and two gloo
processes train and validate like one process with the same global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfgp_cli.checkpoint import read_checkpoint

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
DATA = "scenes:0:train=24:val=8"  # 6 steps of 4 scenes per epoch


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    from gfgp_cli import convert, save

    torch.set_num_threads(1)  # module-scoped: the autouse one_thread fixture has not run yet
    path = tmp_path_factory.mktemp("seg") / "lraspp.pt"
    save(convert("lraspp_mobilenet_v3_large", num_classes=11, image_size=32, seed=0), path)
    return path


def _rows(history):
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "epoch_time_s")} for row in history]


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(seg_checkpoint, tmp_path, subprocess_env):
    from gfgp_cli.train import train

    flags = dict(epochs=2, batch_size=4, lr=0.01, deterministic=True, save_every_steps=2)
    train(str(seg_checkpoint), DATA, str(tmp_path / "whole"), **flags)

    # The 10th training forward is epoch 2, step 4 (0-based 3): after the checkpoint of step 2.
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(HERE / "task_run.py"), str(seg_checkpoint), DATA, str(killed),
                           json.dumps(flags), "--kill-at", "10"],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = read_checkpoint(killed / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert state["meters"][0]["count"] == 8 and int(state["meters"][0]["confusion"].sum()) > 0  # the partial sums

    train(None, None, str(killed), resume=True)
    a, b = read_checkpoint(tmp_path / "whole" / "last.pt"), read_checkpoint(killed / "last.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert _rows(a["history"]) == _rows(b["history"])  # the interrupted epoch's mIoU included


def test_two_gloo_processes_train_and_validate_like_one_process(seg_checkpoint, tmp_path, subprocess_env):
    from gfgp_cli import load
    from gfgp_cli.train import evaluate_checkpoint, train

    flags = dict(epochs=1, batch_size=8, lr=0.01)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "task_run.py"), str(seg_checkpoint), DATA, str(tmp_path / "ddp"), json.dumps(flags)],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert len(ddp["rng"]) == 2
    one = train(str(seg_checkpoint), DATA, str(tmp_path / "one"), accum_steps=2, **flags)
    row, ref = ddp["history"][0], one.final
    assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert row["train_miou"] == pytest.approx(ref["train_miou"], rel=1e-5)
    model = load(tmp_path / "ddp" / "last.pt")
    single = read_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    for name, _ in model.named_parameters():  # (BatchNorm's running statistics follow rank 0's half alone)
        torch.testing.assert_close(ddp["state_dict"][name], single[name], rtol=1e-3, atol=1e-4, msg=name)
    # validation: each process scored half the scenes, and the summed confusion matrix and losses
    # are the whole set's: one process evaluating the same weights gets the same numbers
    metrics = evaluate_checkpoint(str(tmp_path / "ddp" / "last.pt"), DATA, batch_size=3)
    for key in ("loss", "miou", "pixel_acc"):
        assert row[f"val_{key}"] == pytest.approx(metrics[key], rel=1e-5), key
