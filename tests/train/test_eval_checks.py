"""`gfgp eval` refuses impossible options in one line, and a model whose outputs are not finite
(NaN/Inf weights, or overflowing activations) fails, in `gfgp eval` and in training's validation."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gfgp_cli import load, save
from gfgp_cli.cli import cli
from gfgp_cli.errors import WorkFailedError


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result):
    assert "Traceback" not in result.output, result.output[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output[-3000:]
    return errors[0]


@pytest.mark.parametrize("option, value, message", [
    ("--image-size", 0, "--image-size must be a positive integer, got 0"),
    ("--image-size", -16, "--image-size must be a positive integer, got -16"),
    ("--batch-size", 0, "--batch-size must be a positive integer, got 0"),
    ("--workers", -1, "--workers must be >= 0, got -1"),
])
def test_eval_refuses_impossible_options(converted, option, value, message):
    result = _invoke("eval", converted, "--data", "fake", option, value)
    assert result.exit_code == 2, result.output[-3000:]
    assert _one_line_error(result) == f"Error: {message}"


def test_eval_of_nan_weights_exits_1_naming_the_tensor(converted, tmp_path):
    model = load(converted)
    name, weight = next((n, p) for n, p in model.named_parameters() if p.dim() == 4)  # the first conv
    with torch.no_grad():
        weight[0, 0, 0, 0] = math.nan
    poisoned = tmp_path / "nan.pt"
    save(model, poisoned)
    result = _invoke("eval", poisoned, "--data", "fake")
    assert result.exit_code == 1, result.output[-3000:]
    assert _one_line_error(result) == (
        "Error: the model's outputs are not finite (NaN/Inf) on 64 of 64 validation images; "
        f"the checkpoint's weights hold NaN/Inf in {name}")


class _PoisonAt(nn.Module):
    """Identity in training. From training forward ``at`` on, its buffer ``scale`` is ``value``,
    and in eval mode it returns ``x * scale``: the training loss stays finite, the validation
    outputs do not."""

    def __init__(self, at: int, value: float, buffer: bool = True) -> None:
        super().__init__()
        self.at, self.value, self.calls = at, value, 0
        self.register_buffer("scale", torch.ones(()), persistent=buffer)

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                self.scale.fill_(self.value)
            return x
        return x * self.scale


def test_training_stops_when_validation_outputs_are_nan_keeping_the_last_good_checkpoint(tmp_path, train_tiny,
                                                                                         tiny_model):
    # 22 steps per epoch, saved every 10: the buffer turns NaN in step 21, after the save of step 20.
    model = tiny_model()
    model.append(_PoisonAt(21, math.nan))
    with pytest.raises(WorkFailedError) as e:
        train_tiny(tmp_path, model=model, epochs=2, save_every_steps=10)
    assert str(e.value) == (
        "validation after epoch 1: the model's outputs are not finite (NaN/Inf) on 359 of 359 validation images; "
        "the model's weights hold NaN/Inf in 12.scale; stopped before saving the epoch, last.pt keeps the last good "
        "state; lower --lr or disable --amp")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 20) and state["state_dict"]["12.scale"] == 1
    assert not (tmp_path / "best.pt").exists()


def test_training_stops_when_validation_outputs_overflow_with_finite_weights(tmp_path, train_tiny, tiny_model):
    model = tiny_model()
    model.append(_PoisonAt(1, 3e38))  # logits * 3e38 overflow to Inf
    with pytest.raises(WorkFailedError) as e:
        train_tiny(tmp_path, model=model, epochs=1)
    assert "the model's outputs are not finite (NaN/Inf) on " in str(e.value)
    assert "the model's weights are all finite, so its activations overflow" in str(e.value)
    assert "no checkpoint was written" in str(e.value)
    assert not (tmp_path / "last.pt").exists()
