"""Options with the names users know (issue 15): --opt, --sched with --warmup-epochs, --label-smoothing,
--ema-decay, --clip-grad-norm, --mixup/--cutmix; each checked against a hand computation, and all of them
together through a SIGKILL mid-epoch and --resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError
from gfgp_cli.train.config import lr_factor, resolve_config
from gfgp_cli.train.engine import train_one_epoch
from gfgp_cli.train.evaluation import evaluate_checkpoint
from gfgp_cli.train.metrics import Meters
from gfgp_cli.train.optim import build_criterion, build_ema, build_mix, build_optimizer

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _cfg(recipe="paper-vgg", **flags):
    return resolve_config("m.pt", "digits", "run", recipe, **flags)[0]


def _rows(run):
    drop = ("images_per_s", "epoch_time_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _batches(n_steps, batch=8, seed=0):
    """A loader of ``n_steps`` batches of random 8x8 images with labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_steps * batch, 3, 8, 8, generator=g)
    labels = torch.randint(0, 10, (n_steps * batch,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- warm-up and schedules -------------------------------------------------------------------------


def test_warmup_lrs_of_the_first_epochs_are_linear_then_the_schedule_spans_the_rest(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run, recipe="paper-vgg", epochs=4, warmup_epochs=2, warmup_lr_ratio=0.1)
    lrs = [r["lr"] for r in _rows(run)]
    # by hand: 0.05 x (0.1, 0.1 + 0.9 / 2), then loglinear over the 2 epochs left: 0.05, 0.05e-3
    assert lrs == pytest.approx([0.005, 0.0275, 0.05, 0.05e-3], rel=1e-12)
    config = json.loads((run / "config.json").read_text())
    assert (config["warmup_epochs"], config["warmup_lr_ratio"], config["schedule"]) == (2, 0.1, "loglinear")


@pytest.mark.parametrize("sched", ["step", "cosine", "loglinear", "constant"])
def test_the_scheduler_follows_lr_factor_and_without_warmup_is_unchanged(sched):
    for warmup in (0, 3):
        cfg = _cfg(schedule=sched, epochs=8, warmup_epochs=warmup, step_size=2, gamma=0.5, final_lr_ratio=0.01)
        optimizer, scheduler = build_optimizer(nn.Linear(2, 2), cfg)
        lrs = []
        for _ in range(8):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs == pytest.approx([cfg.lr * lr_factor(cfg, e) for e in range(8)], rel=1e-12)
        assert isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR if warmup else
                          torch.optim.lr_scheduler.LambdaLR)
    cfg = _cfg(schedule="cosine", epochs=5, warmup_epochs=1, final_lr_ratio=0.0)
    # warm-up from lr/100 (the default ratio), then cosine over the 4 epochs left, to 0 after the last
    assert [lr_factor(cfg, e) for e in range(6)] == pytest.approx([0.01, 1, (1 + 2 ** -0.5) / 2, 0.5,
                                                                   (1 - 2 ** -0.5) / 2, 0])


# --- the optimizer ---------------------------------------------------------------------------------


def test_adamw_is_used_and_its_state_is_saved(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run, epochs=1, opt="adamw", lr=1e-3)
    last = read_checkpoint(run / "last.pt")
    assert last["config"]["opt"] == "adamw"
    group = last["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.999) and group["weight_decay"] == 1e-4 and "momentum" not in group
    states = list(last["optimizer"]["state"].values())
    assert states and all({"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in states)
    assert all(float(s["step"]) == 22 for s in states)  # 22 steps in the epoch
    assert isinstance(build_optimizer(nn.Linear(2, 2), _cfg(opt="adamw"))[0], torch.optim.AdamW)
    assert isinstance(build_optimizer(nn.Linear(2, 2), _cfg())[0], torch.optim.SGD)


def test_adamw_without_lr_gets_a_note_and_momentum_is_for_sgd_only():
    config, notes = resolve_config("m.pt", "digits", "run", "paper-vgg", opt="adamw")
    assert config.lr == 0.1 and any("AdamW usually wants" in n for n in notes)
    with pytest.raises(BadInputError, match="--momentum applies to --opt sgd only"):
        resolve_config("m.pt", "digits", "run", "paper-vgg", opt="adamw", momentum=0.5)
    assert _cfg(momentum=0.5).momentum == 0.5


# --- the loss --------------------------------------------------------------------------------------


def test_label_smoothing_loss_on_a_known_batch_is_the_formula():
    eps, classes = 0.1, 4
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-3.0, 1.0, 2.0, 0.5]])
    target = torch.tensor([0, 3, 1])
    log_p = logits.log_softmax(dim=1)
    # q = (1 - eps) onehot + eps / C; loss = mean_i -sum_c q_ic log p_ic
    q = torch.full((3, classes), eps / classes)
    q[torch.arange(3), target] += 1 - eps
    want = float(-(q * log_p).sum(dim=1).mean())
    got = float(build_criterion(_cfg(label_smoothing=eps))(logits, target))
    assert got == pytest.approx(want, rel=1e-6)
    assert float(build_criterion(_cfg())(logits, target)) == pytest.approx(float(-log_p[torch.arange(3), target].mean()))
    # soft targets (MixUp) are smoothed the same way
    soft = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 0.5, 0.5], [0, 1.0, 0, 0]])
    want_soft = float(-(((1 - eps) * soft + eps / classes) * log_p).sum(dim=1).mean())
    assert float(build_criterion(_cfg(label_smoothing=eps))(logits, soft)) == pytest.approx(want_soft, rel=1e-6)


# --- EMA -------------------------------------------------------------------------------------------


def test_ema_follows_the_hand_computed_average_of_the_raw_weights(tiny_model):
    decay = 0.8
    config = _cfg(ema_decay=decay, batch_size=8, lr=0.05)
    model = tiny_model()
    criterion = build_criterion(config)
    optimizer, _ = build_optimizer(model, config)
    ema = build_ema(model, config)
    want = {k: v.double() for k, v in _state(model).items() if v.is_floating_point()}  # ema_0 = w_0
    raw = []

    def on_step(done):  # after the optimizer step and the EMA update
        w = _state(model)
        raw.append(w)
        for k in want:
            want[k] = decay * want[k] + (1 - decay) * w[k].double()

    train_one_epoch(model, criterion, optimizer, _batches(4), torch.device("cpu"), 0, config, steps=4, ema=ema,
                    on_step=on_step)
    got = ema.module.state_dict()
    assert len(raw) == 4
    for k, v in want.items():  # every float tensor: weights and BatchNorm statistics
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k in want if not torch.allclose(got[k], raw[-1][k])]
    assert "0.weight" in moved and "1.running_mean" in moved  # the EMA is not the raw model
    assert build_ema(model, _cfg()) is None


def test_ema_is_evaluated_every_epoch_and_saved_in_last_pt_and_ema_pt(tmp_path, train_tiny, tiny_model, capfd):
    run = tmp_path / "run"
    train_tiny(run, epochs=2, ema_decay=0.9)
    rows = _rows(run)
    assert all({"ema_val_loss", "ema_val_top1", "ema_val_top5"} <= set(r) for r in rows)
    assert "ema top1" in capfd.readouterr().err
    last, ema = read_checkpoint(run / "last.pt"), read_checkpoint(run / "ema.pt")
    assert last["ema_state_dict"].keys() == last["state_dict"].keys() == ema["state_dict"].keys()
    assert all(torch.equal(last["ema_state_dict"][k], ema["state_dict"][k]) for k in ema["state_dict"])
    assert not torch.equal(last["ema_state_dict"]["0.weight"], last["state_dict"]["0.weight"])
    # ema.pt is a model checkpoint: `gfgp eval` of it gives the EMA's validation of the last epoch
    got = evaluate_checkpoint(str(run / "ema.pt"), "digits", module=tiny_model())
    assert got["image_size"] == 8
    assert got["top1"] == rows[-1]["ema_val_top1"] and got["loss"] == pytest.approx(rows[-1]["ema_val_loss"], rel=1e-5)
    # best.pt follows the raw model's top-1
    assert read_checkpoint(run / "best.pt")["epoch"] == max(rows, key=lambda r: r["val_top1"])["epoch"]


# --- gradient clipping -----------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_clipping_caps_the_total_grad_norm_right_before_the_step(tiny_model, clip):
    config = _cfg(clip_grad_norm=clip, batch_size=8, lr=0.05)
    model = tiny_model()
    optimizer, _ = build_optimizer(model, config)
    norms = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: norms.append(float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None])))))
    train_one_epoch(model, build_criterion(config), optimizer, _batches(3), torch.device("cpu"), 0, config, steps=3)
    assert len(norms) == 3
    if clip:
        assert norms == pytest.approx([clip] * 3, rel=1e-4)
    else:
        assert min(norms) > 0.05  # the unclipped norms are larger: the cap is what made them 0.05


# --- MixUp / CutMix --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [dict(mixup=0.4), dict(cutmix=1.0), dict(mixup=0.4, cutmix=1.0)])
def test_mixup_and_cutmix_mix_the_labels_with_the_global_generator(flags):
    mix = build_mix(_cfg(**flags), 10)
    images, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    torch.manual_seed(3)
    mixed, soft = mix(images, labels)
    assert mixed.shape == images.shape and type(mixed) is torch.Tensor and soft.shape == (16, 10)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(16))
    assert (soft.max(dim=1).values < 1).all()  # no row is one-hot ...
    assert ((soft > 0).sum(dim=1) == 2).all()  # ... each mixes its label with its neighbour's
    lam = float(soft[0, labels[0]])
    if "cutmix" not in flags:  # MixUp: the images mix with the labels' weights
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    torch.manual_seed(3)  # the same global torch generator state, the same mix (so resume restores it)
    again = mix(images, labels)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)
    clips = build_mix(_cfg(**flags), 10)(torch.randn(4, 3, 2, 8, 8), torch.arange(4))
    assert clips[0].shape == (4, 3, 2, 8, 8) and clips[1].shape == (4, 10)
    assert build_mix(_cfg(), 10) is None


def test_train_top1_with_mixup_counts_the_dominant_label(tiny_model):
    config = _cfg(mixup=0.4, batch_size=8, lr=0.05)
    model = tiny_model()
    optimizer, _ = build_optimizer(model, config)
    dominant, outputs = [], []

    def mix(images, labels):  # a known mix: 60% of the next class, 40% of the image's own
        soft = 0.6 * nn.functional.one_hot((labels + 1) % 10, 10).float() + 0.4 * nn.functional.one_hot(labels, 10).float()
        dominant.append((labels + 1) % 10)
        return images, soft

    model.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    meters = Meters()
    train_one_epoch(model, build_criterion(config), optimizer, _batches(3), torch.device("cpu"), 0, config, steps=3,
                    mix=mix, meters=meters)
    assert meters.count == 24 and len(outputs) == len(dominant) == 3
    assert meters.correct1 == sum(int((o.argmax(dim=1) == d).sum()) for o, d in zip(outputs, dominant))


# --- validation and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (dict(opt="rmsprop"), "--opt"), (dict(schedule="linear"), "--sched"), (dict(warmup_epochs=-1), "--warmup-epochs"),
    (dict(epochs=3, warmup_epochs=3), "--warmup-epochs 3 leaves no epoch"), (dict(warmup_lr_ratio=0.0), "--warmup-lr-ratio"),
    (dict(label_smoothing=1.0), "--label-smoothing"), (dict(ema_decay=1.0), "--ema-decay"), (dict(ema_decay=-0.1), "--ema-decay"),
    (dict(mixup=-1.0), "--mixup"), (dict(cutmix=float("nan")), "--cutmix"), (dict(clip_grad_norm=-1.0), "--clip-grad-norm"),
    (dict(momentum=1.0), "--momentum"),
])
def test_impossible_option_values_are_bad_input(flags, needle):
    with pytest.raises(BadInputError, match=needle):
        _cfg(**flags)


def test_cli_flags_reach_the_config_and_bad_ones_exit_2(tmp_path, converted):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(run), "--epochs", "2",
                                      "--batch-size", "64", "--opt", "adamw", "--lr", "1e-3", "--sched", "constant",
                                      "--warmup-epochs", "1", "--label-smoothing", "0.1", "--mixup", "0.2",
                                      "--cutmix", "1", "--clip-grad-norm", "2", "--ema-decay", "0.5",
                                      "--activation-checkpointing", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in ("opt", "schedule", "warmup_epochs", "label_smoothing", "mixup", "cutmix",
                                   "clip_grad_norm", "ema_decay", "activation_checkpointing")} == dict(
        opt="adamw", schedule="constant", warmup_epochs=1, label_smoothing=0.1, mixup=0.2, cutmix=1.0,
        clip_grad_norm=2.0, ema_decay=0.5, activation_checkpointing=True)
    assert (run / "ema.pt").exists()
    bad = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(tmp_path / "bad"),
                                   "--sched", "linear"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "--sched" in bad.output
    # a resumed run keeps its options: another value is refused, naming the flag
    again = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(run), "--resume",
                                     "--ema-decay", "0.9"])
    assert again.exit_code == 2 and "--ema-decay 0.5" in again.output


RESUME_FLAGS = dict(epochs=2, batch_size=32, deterministic=True, save_every_steps=5,  # 44 steps per epoch
                    opt="adamw", lr=2e-3, warmup_epochs=1, warmup_lr_ratio=0.1, ema_decay=0.9, mixup=0.4, cutmix=1.0,
                    label_smoothing=0.1, clip_grad_norm=0.5)


def test_sigkill_mid_epoch_with_every_option_then_resume_is_bit_identical(tmp_path, train_tiny, tiny_model,
                                                                          subprocess_env):
    whole = tmp_path / "whole"
    train_tiny(whole, **RESUME_FLAGS)

    # killed in its 57th training forward (epoch 2, step 13), after the checkpoint of step 10
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(HERE / "tiny_run.py"), str(killed), json.dumps(RESUME_FLAGS),
                           "--kill-at", "57"], cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = read_checkpoint(killed / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 10)
    train_tiny(killed, model=tiny_model(seed=123), resume=True, **RESUME_FLAGS)

    a, b = read_checkpoint(whole / "last.pt"), read_checkpoint(killed / "last.pt")
    for entry in ("state_dict", "ema_state_dict"):
        assert a[entry].keys() == b[entry].keys()
        for key in a[entry]:
            assert torch.equal(a[entry][key], b[entry][key]), (entry, key)
    assert not torch.equal(a["ema_state_dict"]["0.weight"], a["state_dict"]["0.weight"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    ema_a, ema_b = read_checkpoint(whole / "ema.pt")["state_dict"], read_checkpoint(killed / "ema.pt")["state_dict"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    rows = _rows(whole)
    assert _rows(killed) == rows  # the interrupted epoch's train and EMA metrics included
    assert [r["lr"] for r in rows] == pytest.approx([2e-4, 2e-3])


def test_a_schedule_other_than_the_recipes_brings_its_own_shape():
    from gfgp_cli.train.config import lr_factor, resolve_config

    # paper-resnet's floor ratio (1.0) would make a cosine constant
    config, notes = resolve_config("m.pt", "digits", "run", "paper-resnet", schedule="cosine", epochs=4,
                                   warmup_epochs=1)
    assert [round(lr_factor(config, e), 4) for e in range(4)] == [0.01, 1.0, 0.75, 0.25]
    assert "--sched cosine instead of the paper-resnet recipe's step: final_lr_ratio 0" in notes
    config, _ = resolve_config("m.pt", "digits", "run", "paper-resnet", schedule="cosine", final_lr_ratio=0.5, epochs=2)
    assert config.final_lr_ratio == 0.5  # given: kept
