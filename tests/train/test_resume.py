"""Crash safety: SIGKILL mid-epoch then --resume is bit-exact; Ctrl-C saves and exits cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _rows(run):
    drop = ("images_per_s", "epoch_time_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(tmp_path, train_tiny, tiny_model, subprocess_env):
    flags = dict(epochs=2, batch_size=32, deterministic=True, save_every_steps=5)  # 44 steps per epoch
    train_tiny(tmp_path / "whole", **flags)

    # The crashed run SIGKILLs itself in its 57th training forward: epoch 2, step 13 (0-based 12),
    # after the checkpoint of step 10 and before that of step 15.
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(HERE / "tiny_run.py"), str(killed), json.dumps(flags), "--kill-at", "57"],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = read_checkpoint(killed / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 10)
    assert len(_rows(killed)) == 1

    # Resume (a fresh model: the weights must come from last.pt) and finish.
    train_tiny(killed, model=tiny_model(seed=123), resume=True, **flags)
    a = read_checkpoint(tmp_path / "whole" / "last.pt")
    b = read_checkpoint(killed / "last.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    assert _rows(killed) == _rows(tmp_path / "whole")  # metrics of the interrupted epoch included


def test_ctrl_c_saves_last_pt_and_exits_130_then_resumes(tmp_path, converted, train_in_background, wait_for_file):
    run = tmp_path / "run"
    proc = train_in_background(run, epochs=30, save_every_steps=2)
    try:
        wait_for_file(run / "last.pt", proc)  # training is under way
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    state = read_checkpoint(run / "last.pt")
    assert f"saved {run}/last.pt at epoch {state['epoch'] + 1} step {state['step']}" in stderr
    assert state["epoch"] < 30

    result = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(run), "--resume",
                                      "--epochs", str(state["epoch"] + 1), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == state["epoch"] + 1
