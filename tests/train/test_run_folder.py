"""The run folder under faults: one training per folder (a lock), stale files of killed runs,
resumed options checked before anything is written, full disks, a Ctrl-C inside a write."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gfgp_cli import _io
from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError, DiskFullError
from gfgp_cli.train.rundir import LOCK

ROOT = Path(__file__).parents[2]


def test_second_training_into_a_busy_folder_is_refused_and_a_killed_runs_lock_is_taken_over(
        tmp_path, converted, train_in_background, wait_for_file):
    run = tmp_path / "run"
    first = train_in_background(run, epochs=50, save_every_steps=1)
    try:
        wait_for_file(run / "last.pt", first)
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["command"].startswith("gfgp train")

        for extra in (["--force"], ["--resume"]):
            second = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(run),
                                              "--epochs", "1", "--batch-size", "16", *extra])
            assert second.exit_code == 2, second.output
            (line,) = second.output.strip().splitlines()
            assert f"is in use by another training run (pid {first.pid} on {holder['host']}" in line
            assert "wait for it to finish or stop it, or choose another --out" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert (run / LOCK).exists()  # a killed run cannot clean up: its lock is stale
    (run / ".last.pt.x8y9z0.tmp").write_bytes(b"\0" * 4096)  # as a SIGKILL during a write leaves it
    (run / ".metrics.csv.q1w2e3.tmp").write_bytes(b"epoch")

    epoch = read_checkpoint(run / "last.pt")["epoch"]
    resumed = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(run), "--resume",
                                       "--epochs", str(epoch + 1)])
    assert resumed.exit_code == 0, resumed.output
    assert f"took over the stale lock of pid {first.pid}" in resumed.output
    assert "removed 2 temporary file(s) (4.0 KiB) left by an interrupted write" in resumed.output
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no lock, no temporary file


def test_resumed_options_are_checked_before_anything_is_written(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run, epochs=1)
    config = (run / "config.json").read_bytes()
    with pytest.raises(BadInputError, match="--threads must be a positive integer, got 0"):
        train_tiny(run, epochs=1, resume=True, threads=0)
    with pytest.raises(BadInputError, match="--workers must be >= 0, got -1"):
        train_tiny(run, epochs=2, resume=True, workers=-1)
    assert (run / "config.json").read_bytes() == config


def test_nothing_to_resume_says_what_to_do(tmp_path, train_tiny):
    with pytest.raises(BadInputError, match="does not exist; start the run without --resume"):
        train_tiny(tmp_path / "never", resume=True)
    assert not (tmp_path / "never").exists()
    crashed = tmp_path / "crashed"  # stopped before its first checkpoint
    crashed.mkdir()
    (crashed / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match=r"has config.json but no last.pt .*; start it again with --force"):
        train_tiny(crashed, resume=True)
    result = train_tiny(crashed, epochs=1, force=True)  # and that way works
    assert result.epochs == 1


def test_a_checkpoint_that_cannot_fit_is_refused_before_the_first_epoch(tmp_path, train_tiny, monkeypatch):
    monkeypatch.setattr(_io, "free_bytes", lambda folder: 1000)
    with pytest.raises(DiskFullError, match=r"for the run's checkpoints in .*: about 1.0 MiB needed, 1000 B free; "
                                            "free some space and start the run again"):
        train_tiny(tmp_path / "run", epochs=2)
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder


def test_the_next_checkpoint_is_foreseen_after_each_epoch(tmp_path, train_tiny, monkeypatch):
    checks = []

    def free(folder):
        checks.append(folder)
        return 1 << 40 if len(checks) == 1 else 1000  # the disk fills up during epoch 1

    monkeypatch.setattr(_io, "free_bytes", free)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as e:
        train_tiny(run, epochs=3)
    message = str(e.value)
    assert message.startswith(f"not enough space left on device for the checkpoint of epoch 2 in {run}")
    assert f"{run / 'last.pt'} (" in message and f"`gfgp train --resume {run}`" in message
    assert read_checkpoint(run / "last.pt")["epoch"] == 1  # epoch 1 is kept, epoch 2 never started
    monkeypatch.setattr(_io, "free_bytes", lambda folder: 1 << 40)  # space freed
    assert train_tiny(run, epochs=3, resume=True).epochs == 3


def test_a_full_disk_during_the_checkpoint_write_keeps_the_previous_one(tmp_path, train_tiny, monkeypatch):
    import errno

    run = tmp_path / "run"
    train_tiny(run, epochs=1)
    before = (run / "last.pt").read_bytes()
    real = torch.save

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as e:
        train_tiny(run, epochs=2, resume=True)
    assert str(e.value).startswith(f"no space left on device writing {run / 'last.pt'}; {run / 'last.pt'} (")
    assert (run / "last.pt").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(torch, "save", real)
    assert train_tiny(run, epochs=2, resume=True).epochs == 2


def test_second_ctrl_c_during_the_checkpoint_write_is_aborted(tmp_path, converted, monkeypatch):
    # The first Ctrl-C asks the loop to stop after the step and save; a second one arrives while
    # torch.save writes, where torch would turn it into "RuntimeError: ... unexpected pos".
    real = torch.save

    class Interrupting:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise KeyboardInterrupt

        def flush(self):
            pass

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, Interrupting(f), *a, **k))
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(run),
                                      "--epochs", "1", "--batch-size", "16"])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == "Aborted!"
    assert "Traceback" not in result.output and "unexpected pos" not in result.output
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # lock released, no .tmp


def test_plot_checks_the_checkpoint_before_writing_any_png(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run, epochs=1)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["plot", str(run), "--data", "digits", "--checkpoint", str(tmp_path / "bad.pt"),
                                      "--out", str(tmp_path / "figs")])
    assert result.exit_code == 2, result.output
    assert "bad.pt" in result.output
    assert not (tmp_path / "figs").exists()
    assert not any(p.suffix == ".png" for p in run.iterdir())


def test_the_lock_is_released_after_every_kind_of_end(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run, epochs=1)
    assert not (run / LOCK).exists()
    with pytest.raises(BadInputError):
        train_tiny(run, epochs=1)  # already holds a run
    assert not (run / LOCK).exists()
    assert os.listdir(run)
