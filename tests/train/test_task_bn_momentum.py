"""``--bn-momentum``: every BatchNorm layer's running statistics follow the training batches with
the given momentum (checked against the update rule computed by hand from the batches a layer
saw), the run's config records it, --resume applies it again, and bad values are refused in one
line. On LR-ASPP MobileNetV3, whose backbone's BatchNorm momentum is torchvision's 0.01."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gfgp_cli.checkpoint import read_checkpoint

SIZE = 32
DATA = "scenes:0:train=8:val=4"  # 2 steps of 4 scenes per epoch


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    from gfgp_cli import convert, save

    torch.set_num_threads(1)  # module-scoped: the autouse one_thread fixture has not run yet
    path = tmp_path_factory.mktemp("bn") / "lraspp.pt"
    save(convert("lraspp_mobilenet_v3_large", num_classes=11, image_size=SIZE, seed=0), path)
    return path


def _norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _watch(norm, seen):
    """Record, for each training forward of ``norm`` itself (not of a copy), its momentum and the
    per-channel mean and unbiased variance of the batch it normalises."""
    def hook(module, args):
        if module is norm and module.training:
            x = args[0].detach().double()
            dims = [0, *range(2, x.dim())]
            seen.append((module.momentum, x.mean(dims), x.var(dims, unbiased=True)))

    return norm.register_forward_pre_hook(hook)


def test_running_statistics_follow_the_batches_with_the_given_momentum(seg_checkpoint, tmp_path):
    from gfgp_cli import load
    from gfgp_cli.spec import spec_of
    from gfgp_cli.train import train

    model = load(seg_checkpoint)
    norms = _norms(model)
    assert 0.01 in {m.momentum for m in norms}  # MobileNetV3's backbone, the default this replaces
    first = norms[0]
    mean0, var0 = first.running_mean.double().clone(), first.running_var.double().clone()
    seen = []
    _watch(first, seen)
    result = train(str(seg_checkpoint), DATA, str(tmp_path / "run"), model=model, spec=spec_of(model), epochs=2,
                   batch_size=4, lr=0.01, bn_momentum=0.3)
    assert any("--bn-momentum 0.3 in" in note and "0.01" in note for note in result.notes), result.notes
    assert len(seen) == 4 and all(m == 0.3 for m, _, _ in seen)  # 2 epochs x 2 steps, all at 0.3
    assert {m.momentum for m in norms} == {0.3}
    # the update rule, by hand: r <- (1 - m) r + m batch_statistic, for each of the 4 batches
    mean, var = mean0, var0
    for m, batch_mean, batch_var in seen:
        mean, var = (1 - m) * mean + m * batch_mean, (1 - m) * var + m * batch_var
    saved = read_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    key = next(name for name, b in model.named_buffers() if b is first.running_mean)
    torch.testing.assert_close(saved[key].double(), mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(saved[key.replace("running_mean", "running_var")].double(), var, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["bn_momentum"] == 0.3


def test_without_the_option_the_models_own_momentum_stays(seg_checkpoint, tmp_path):
    from gfgp_cli import load
    from gfgp_cli.spec import spec_of
    from gfgp_cli.train import train

    model = load(seg_checkpoint)
    own = [m.momentum for m in _norms(model)]
    result = train(str(seg_checkpoint), DATA, str(tmp_path / "run"), model=model, spec=spec_of(model), epochs=1,
                   batch_size=4, lr=0.01)
    assert [m.momentum for m in _norms(model)] == own
    assert not any("--bn-momentum" in note for note in result.notes)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["bn_momentum"] is None


def test_resume_applies_the_runs_momentum_again(seg_checkpoint, tmp_path, monkeypatch):
    from gfgp_cli.train import loop, train

    run = tmp_path / "run"
    train(str(seg_checkpoint), DATA, str(run), epochs=1, batch_size=4, lr=0.01, bn_momentum=0.2)
    seen = []
    rebuild = loop.rebuild_model

    def watched(state, model):  # the resumed run's model, as gfgp train rebuilds it
        model = rebuild(state, model)
        _watch(_norms(model)[0], seen)
        return model

    monkeypatch.setattr(loop, "rebuild_model", watched)
    train(None, None, str(run), resume=True, epochs=2)
    assert len(seen) == 2 and all(m == 0.2 for m, _, _ in seen)
    assert read_checkpoint(run / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_bad_momentum_is_refused_in_one_line(seg_checkpoint, tmp_path, value):
    from click.testing import CliRunner

    from gfgp_cli.cli import cli

    result = CliRunner().invoke(cli, ["train", str(seg_checkpoint), "--data", DATA, "--out", str(tmp_path / "run"),
                                      "--bn-momentum", value])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--bn-momentum must be in (0, 1]" in lines[0], result.output
    assert not (tmp_path / "run").exists()
