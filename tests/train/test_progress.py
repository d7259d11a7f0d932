"""The training progress (metrics.Progress): ETA of the epoch and of the run, plain lines when stderr is
not a terminal, rich bars when it is, nothing on ranks other than 0."""

from __future__ import annotations

import io
import re

import pytest
from click.testing import CliRunner
from rich.console import Console

import gfgp_cli.train.metrics as metrics
from gfgp_cli.cli import cli
from gfgp_cli.train.metrics import Progress

SUMMARY = re.compile(r"^epoch (\d+)/(\d+)  lr \S+  train loss \S+ top1 \S+%  val loss \S+ top1 \S+% top5 \S+%  "
                     r"\d+ img/s  \S+ s$")


class Clock:
    """A stand-in for time.perf_counter: seconds advance only by ``tick``."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", c)
    return c


def _plain(**kwargs):
    buf = io.StringIO()
    return Progress(console=Console(file=buf, width=200), **kwargs), buf


def _epoch(progress, clock, epoch, epochs, steps=20, val_batches=4, step_s=1.0, batch_s=0.5):
    progress.start(f"epoch {epoch + 1}/{epochs}", steps, epoch=epoch, epochs=epochs)
    for step in range(steps):
        clock.tick(step_s)
        progress.update(step + 1, 32, {"loss": 2.0})
    progress.stop()
    progress.start_validation(val_batches)
    for batch in range(val_batches):
        clock.tick(batch_s)
        progress.update(batch + 1, 16, {})
    progress.stop()


def test_plain_lines_every_tenth_of_the_epoch_with_the_epoch_and_run_eta(clock):
    progress, buf = _plain(min_interval_s=0)
    assert not progress.rich
    _epoch(progress, clock, 0, 3)
    lines = buf.getvalue().splitlines()
    train = [line for line in lines if " val " not in line]
    assert [line.split()[2] for line in train] == [f"{n}/20" for n in range(2, 21, 2)]
    # halfway through epoch 1 of 3 (1 s a step, no validation measured yet): 10 s, then 2 more epochs of 20
    assert train[4] == "epoch 1/3 10/20  loss 2  32 img/s  ETA epoch 0:00:10 run 0:00:50"
    assert lines[-1].startswith("epoch 1/3 val 4/4  32 img/s")
    buf.truncate(0), buf.seek(0)
    _epoch(progress, clock, 1, 3)
    # the last validation took 2 s (4 batches of 0.5 s): it counts in the epoch's and the run's time left
    assert "epoch 2/3 10/20  loss 2  32 img/s  ETA epoch 0:00:12 run 0:00:34" in buf.getvalue().splitlines()


def test_plain_lines_are_at_least_min_interval_apart_but_every_epoch_ends_with_one(clock):
    progress, buf = _plain(min_interval_s=5)
    _epoch(progress, clock, 0, 2)
    shown = [line.split()[2] for line in buf.getvalue().splitlines() if " val " not in line]
    assert shown == ["6/20", "12/20", "18/20", "20/20"]
    assert [line for line in buf.getvalue().splitlines() if " val " in line] == []  # 2 s of validation


def test_resumed_epoch_paces_from_its_own_steps(clock):
    progress, buf = _plain(min_interval_s=0, lines_per_epoch=1)
    progress.start("epoch 2/2", 10, done=6, epoch=1, epochs=2)  # 6 of 10 steps done before the resume
    assert progress.eta() == (None, None)  # before its first step
    for step in range(6, 10):
        clock.tick(2.0)
        progress.update(step + 1, 8, {})
        assert progress.eta() == (pytest.approx((9 - step) * 2.0),) * 2  # the last epoch: run = epoch
    assert buf.getvalue().splitlines() == ["epoch 2/2 10/10  4 img/s  ETA epoch 0:00:00 run 0:00:00"]


def test_other_ranks_print_nothing(clock):
    progress, buf = _plain(enabled=False, min_interval_s=0)
    _epoch(progress, clock, 0, 2)
    progress.log("note: something")
    assert buf.getvalue() == "" and not progress.rich
    assert progress.images_per_s() == pytest.approx(32.0)  # still measured, for the metrics


def test_terminal_shows_a_bar_for_the_epoch_its_validation_and_the_run():
    buf = io.StringIO()
    progress = Progress(console=Console(file=buf, force_terminal=True, width=100, soft_wrap=True))
    assert progress.rich
    progress.start("epoch 1/3", 4, epoch=0, epochs=3)
    for step in range(4):
        progress.update(step + 1, 8, {"loss": 1.5})
    progress.stop()
    progress.start_validation(2)
    progress.update(1, 8, {})
    progress.update(2, 8, {})
    progress.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # the frames rich drew, without escapes
    assert re.search(r"epoch 1/3 .*4/4 .*loss 1\.5 .*img/s ETA \d:\d\d:\d\d", text), text
    assert re.search(r"epoch 1/3 val .*2/2 .*ETA \d:\d\d:\d\d", text), text
    assert re.search(r"run .*0/3 epochs .*ETA \d:\d\d:\d\d", text), text
    assert "epoch 1/3 4/4  loss" not in text  # no plain lines on a terminal


def test_terminal_flag_forces_either_display():
    assert not Progress(console=Console(file=io.StringIO(), force_terminal=True), terminal=False).rich
    assert Progress(console=Console(file=io.StringIO()), terminal=True).rich


def test_a_run_piped_to_a_file_shows_the_eta_and_keeps_the_epoch_summary(converted, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(tmp_path / "run"),
                                      "--epochs", "2", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    progress = [line for line in lines if "ETA" in line]
    # a line at the end of each epoch's training; others only 10 s apart (8 steps of 32 take less)
    ends = [line for line in progress if line.split()[2] == "8/8"]
    assert [line.split()[:2] for line in ends] == [["epoch", "1/2"], ["epoch", "2/2"]] and len(progress) <= 6
    assert re.search(r"ETA epoch \d:\d\d:\d\d run \d:\d\d:\d\d$", ends[0]), ends[0]
    assert [SUMMARY.match(line).groups() for line in lines if SUMMARY.match(line)] == [("1", "2"), ("2", "2")]


def test_a_run_on_a_terminal_draws_its_validation_too(tmp_path, train_tiny, monkeypatch):
    import gfgp_cli.console

    buf = io.StringIO()
    monkeypatch.setattr(gfgp_cli.console, "err", Console(file=buf, force_terminal=True, width=120, soft_wrap=True))
    train_tiny(tmp_path / "run", epochs=2, ema_decay=0.9)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    for row in (r"epoch 2/2 .*22/22", r"epoch 2/2 val .*\d+/\d+", r"epoch 2/2 ema val", r"run .*1/2 epochs .*ETA"):
        assert re.search(row, text), (row, text[-2000:])
    summaries = [line for line in text.splitlines() if re.match(r"epoch \d/2  lr .*  ema top1 .* img/s  \S+ s$", line)]
    assert len(summaries) == 2  # the summaries stay, the bars are gone
