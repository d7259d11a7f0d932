"""The memory check before training: measuring one step, planning micro-batches, and the opt-in
activation checkpointing of the full-resolution stage."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from gfgp_cli.errors import BadInputError
from gfgp_cli.train.config import TrainConfig
from gfgp_cli.train.memory import USABLE, StepMemory, available_memory, measure_step, parse_size, plan_micro_batches
from gfgp_cli.train.recompute import checkpoint_full_resolution

MiB = 2**20
CONFIG = TrainConfig(checkpoint="m.pt", data="digits", out="run")


# --- the plan (arithmetic) -----------------------------------------------------------------------------


def test_a_batch_that_fits_is_left_whole():
    assert plan_micro_batches(StepMemory(100 * MiB, MiB, "t"), 10_000 * MiB, "RAM", 256, 1, None, 2) == (1, None)


def test_a_batch_that_does_not_fit_is_split_into_the_fewest_micro_batches_that_do():
    memory = StepMemory(fixed=100 * MiB, per_sample=10 * MiB, how="measured")
    # usable 0.85 * 1000 MiB = 850 MiB: 100 + 10 m <= 850 -> m <= 75; 256 splits into 8 x 32 (4 x 64 fits too)
    accum, note = plan_micro_batches(memory, 1000 * MiB, "available memory", 256, 1, None, 2)
    assert accum == 4 and 100 + 10 * 256 // accum <= 850
    assert note.startswith("batch 256 does not fit in 850.0 MiB: 4 micro-batches of 64")
    # two processes: 128 each, 2 micro-batches of 64 per process
    accum, note = plan_micro_batches(memory, 1000 * MiB, "available memory", 256, 2, None, 2)
    assert accum == 2 and "850.0 MiB per process: 2 micro-batches of 64" in note


def test_given_accumulation_is_checked_and_a_fitting_one_suggested():
    memory = StepMemory(fixed=100 * MiB, per_sample=10 * MiB, how="measured")
    assert plan_micro_batches(memory, 1000 * MiB, "RAM", 256, 1, 8, 2) == (8, None)
    with pytest.raises(BadInputError, match=r"--batch-size 256 with --accum-steps 2 runs micro-batches of 128, which "
                                            r"need about 1.3 GiB; 850.0 MiB .* is usable: use --accum-steps 4 "
                                            r"\(micro-batches of 64\)"):
        plan_micro_batches(memory, 1000 * MiB, "RAM", 256, 1, 2, 2)


def test_nothing_fits():
    memory = StepMemory(fixed=800 * MiB, per_sample=100 * MiB, how="measured")
    with pytest.raises(BadInputError, match="not even a micro-batch of 2 fits: it needs about 1000.0 MiB"):
        plan_micro_batches(memory, 1000 * MiB, "RAM", 64, 1, None, 2)


def test_parse_size():
    assert parse_size("1GiB") == parse_size("1g") == 2**30 and parse_size("512MiB") == 512 * MiB
    with pytest.raises(BadInputError, match="--memory-limit must be a size"):
        parse_size("lots")


def test_available_memory_honours_a_limit():
    free, where = available_memory(torch.device("cpu"))
    assert free > 0
    assert available_memory(torch.device("cpu"), limit=1) == (0, "--memory-limit")


# --- the measurement -----------------------------------------------------------------------------------


def _digits_batch(n, size=16):
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


def test_measuring_a_step_leaves_no_trace(tiny_model):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    batch = _digits_batch(4, 8)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    memory = measure_step(model, *batch, torch.device("cpu"), CONFIG, 1)
    assert memory.per_sample > 0 and memory.fixed == 2 * sum(p.numel() * 4 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_measured_step_predicts_a_larger_batch_on_the_safe_side(tmp_path):
    """Oracle: the peak resident memory of a fresh process running one step at batch 32 (VmHWM),
    against the plan's prediction from one step at batch 8 (training's MEASURE_BATCH) in this process."""
    script = tmp_path / "step.py"
    script.write_text(
        "import sys, torch, torchvision\n"
        "from torch import nn\n"
        "torch.set_num_threads(1)\n"
        "m = torchvision.models.resnet18(num_classes=10).train()\n"
        "x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))\n"
        "status = lambda f: next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(f))\n"
        "base = status('VmRSS:')\n"
        "nn.functional.cross_entropy(m(x), y).backward()\n"
        "print(status('VmHWM:') - base)\n")
    real = int(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                              timeout=600).stdout.split()[-1])
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    memory = measure_step(model, torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,)), torch.device("cpu"), CONFIG, 0)
    predicted = memory.need(32)  # gradients + 32 samples (no optimizer state: factor 0)
    # The plan keeps 1 - USABLE of the memory in reserve for the measurement's error (in a process
    # that has already run other work, its heap reuses freed blocks: a few % low).
    assert real <= predicted / USABLE and predicted <= 3 * real, (real, predicted, memory)


# --- activation checkpointing -----------------------------------------------------------------------------


def test_activation_checkpointing_recomputes_the_full_resolution_stage_exactly():
    from gfgp_cli import convert

    torch.manual_seed(0)
    model = convert("resnet18", num_classes=10, image_size=32).train()
    twin = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    running, note = checkpoint_full_resolution(twin, x)
    assert note.startswith("activation checkpointing: 4 operations at full resolution 32x32")
    assert set(running.state_dict()) != set(twin.state_dict()) and twin.state_dict().keys() == model.state_dict().keys()

    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    losses = []
    for net in (model, running):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = nn.functional.cross_entropy(net(x), y)
        losses.append((loss, sum(saved.values())))
        loss.backward()
    assert losses[1][1] < losses[0][1]  # fewer bytes kept for the backward
    assert torch.equal(losses[0][0], losses[1][0])
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):  # statistics updated once, not twice
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_needs_a_traced_model(tiny_model):
    with pytest.raises(BadInputError, match="needs a model converted as one traced graph"):
        checkpoint_full_resolution(tiny_model(), torch.randn(1, 3, 8, 8))


# --- end to end -----------------------------------------------------------------------------------------------


def test_training_splits_a_batch_that_does_not_fit_and_records_it(tmp_path, train_tiny, monkeypatch):
    import gfgp_cli.train.loop as loop

    # The wiring, with a step of known memory (the measurement itself is checked above):
    # 1 MiB fixed + 1 MiB per sample, and room for about 20 samples.
    monkeypatch.setattr(loop, "measure_step", lambda *a, **k: StepMemory(MiB, MiB, "a known step"))
    monkeypatch.setattr(loop, "available_memory", lambda *a, **k: (int(21 * MiB / 0.85) + 1, "a known machine"))
    run, whole = tmp_path / "run", tmp_path / "whole"
    result = train_tiny(run, epochs=1, deterministic=True)
    config = json.loads((run / "config.json").read_text())
    assert config["accum_steps"] == 4  # 64 = 4 x 16 (2 x 32 does not fit)
    assert "batch 64 does not fit in 21.0 MiB: 4 micro-batches of 16 (a known step: 1.0 MiB per sample)" in config["notes"]
    assert result.epochs == 1
    # the same run as one asked for with --accum-steps 4 (the measurement leaves no trace)
    train_tiny(whole, epochs=1, accum_steps=4, deterministic=True)
    from gfgp_cli.checkpoint import read_checkpoint

    a, b = read_checkpoint(run / "last.pt")["state_dict"], read_checkpoint(whole / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_given_accumulation_that_cannot_fit_is_refused_with_one_that_does(tmp_path, train_tiny, monkeypatch):
    import gfgp_cli.train.loop as loop

    monkeypatch.setattr(loop, "measure_step", lambda *a, **k: StepMemory(MiB, MiB, "a known step"))
    with pytest.raises(BadInputError, match=r"--batch-size 64 with --accum-steps 1 runs micro-batches of 64, which need "
                                            r"about 65.0 MiB; .* is usable: use --accum-steps \d+ \(micro-batches of \d+\)"):
        train_tiny(tmp_path / "run", epochs=1, accum_steps=1, memory_limit=_rss() + int(21 * MiB / 0.85) + 4 * MiB)
    assert not (tmp_path / "run").exists()


def _rss():
    from gfgp_cli.train.memory import _status

    return _status("VmRSS:")


def test_the_cli_refuses_a_run_that_cannot_fit_in_seconds(tmp_path, converted):
    import time

    from click.testing import CliRunner

    from gfgp_cli.cli import cli

    started = time.monotonic()
    result = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(tmp_path / "run"),
                                      "--batch-size", "16", "--memory-limit", "1MiB"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: not even a micro-batch of 2 fits: it needs about ")
    assert "is usable; use a smaller --image-size" in line and "per sample]" in line
    assert time.monotonic() - started < 120  # a hang guard: it measures two small steps, then stops
    assert not (tmp_path / "run").exists()
