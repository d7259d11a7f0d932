"""Recipes (docs/method.md section 5), learning-rate schedules, linear LR scaling and config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gfgp_cli.errors import BadInputError
from gfgp_cli.train import RECIPES, lr_factor, resolve_config


def _cfg(recipe, **flags):
    return resolve_config("m.pt", "digits", "run", recipe, **flags)


def test_recipes_are_the_papers():
    vgg, resnet = RECIPES["paper-vgg"], RECIPES["paper-resnet"]
    assert (vgg["batch_size"], vgg["momentum"], vgg["weight_decay"], vgg["lr"], vgg["epochs"]) == (64, 0.9, 5e-4, 0.1, 20)
    assert (resnet["batch_size"], resnet["momentum"], resnet["weight_decay"], resnet["lr"], resnet["epochs"]) == (
        256, 0.9, 1e-4, 0.1, 100)


def test_paper_vgg_lr_is_log_linear_from_0_1_to_1e_4_over_20_epochs():
    cfg, notes = _cfg("paper-vgg")
    lrs = [cfg.lr * lr_factor(cfg, e) for e in range(20)]
    # Oracle: numpy's logspace, what "linearly in log scale" means.
    np.testing.assert_allclose(lrs, np.logspace(-1, -4, 20), rtol=1e-12)
    assert notes == []


def test_paper_resnet_lr_divides_by_10_every_30_epochs():
    cfg, _ = _cfg("paper-resnet")
    got = {e: cfg.lr * lr_factor(cfg, e) for e in (0, 29, 30, 59, 60, 89, 90, 99)}
    want = {0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 1e-3, 89: 1e-3, 90: 1e-4, 99: 1e-4}
    assert got == pytest.approx(want, rel=1e-12)


def test_finetune_is_cosine_to_zero_with_slower_reused_layers():
    cfg, _ = _cfg("finetune", epochs=4)
    assert [lr_factor(cfg, e) for e in range(5)] == pytest.approx([1, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                                   (1 + math.cos(3 * math.pi / 4)) / 2, 0])
    assert cfg.backbone_lr_scale < 1


@pytest.mark.parametrize("recipe,batch,lr", [("paper-vgg", 128, 0.2), ("paper-vgg", 32, 0.05), ("paper-resnet", 64, 0.025)])
def test_other_batch_size_scales_lr_linearly_and_says_so(recipe, batch, lr):
    cfg, notes = _cfg(recipe, batch_size=batch)
    assert cfg.lr == pytest.approx(lr)
    assert len(notes) == 1 and "scaled linearly" in notes[0] and f"{lr:g}" in notes[0]


def test_explicit_flags_override_the_recipe_and_lr_is_then_not_scaled():
    cfg, notes = _cfg("paper-vgg", batch_size=128, lr=0.03, epochs=3, weight_decay=0.0)
    assert (cfg.lr, cfg.epochs, cfg.weight_decay, cfg.batch_size, cfg.momentum) == (0.03, 3, 0.0, 128, 0.9)
    assert notes == []


def test_loglinear_schedule_spans_the_epochs_given():
    cfg, _ = _cfg("paper-vgg", epochs=4)
    assert [cfg.lr * lr_factor(cfg, e) for e in range(4)] == pytest.approx([0.1, 0.01, 0.001, 1e-4])


@pytest.mark.parametrize("flags,needle", [
    (dict(epochs=0), "--epochs"), (dict(epochs=-3), "--epochs"), (dict(batch_size=0), "--batch-size"),
    (dict(batch_size=-1), "--batch-size"), (dict(lr=0.0), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(batch_size=10, accum_steps=3), "--accum-steps"), (dict(device="gpu"), "--device"),
    (dict(image_size=0), "--image-size"), (dict(amp_dtype="fp8"), "--amp-dtype"), (dict(workers=-1), "--workers"),
])
def test_impossible_values_are_bad_input(flags, needle):
    with pytest.raises(BadInputError, match=needle):
        _cfg("paper-vgg", **flags)


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(BadInputError, match="paper-vgg, paper-resnet, finetune"):
        _cfg("paper-alexnet")
