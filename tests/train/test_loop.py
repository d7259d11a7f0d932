"""The training loop in-process on a tiny GFGP network and the real digits data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.errors import BadInputError, WorkFailedError
from gfgp_cli.nn import GFGPPool2d
from gfgp_cli.train import train


def test_run_writes_checkpoints_metrics_and_config(tmp_path, train_tiny, tiny_model, tiny_spec):
    run = tmp_path / "run"
    result = train_tiny(run, recipe="paper-vgg", epochs=3)
    assert result.epochs == 3 and not result.interrupted
    assert {p.name for p in run.iterdir()} >= {"last.pt", "best.pt", "config.json", "metrics.csv", "metrics.jsonl"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # paper-vgg's log-linear schedule over the 3 epochs given: lr, lr/sqrt(1000), lr/1000
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05 * 10 ** -1.5, 0.05e-3])
    assert (run / "metrics.csv").read_text().count("\n") == 4
    assert rows[-1]["val_top1"] > 30  # it learns: 10 classes, chance is 10%
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["epochs"], config["lr"], config["weight_decay"]) == ("paper-vgg", 3, 0.05, 5e-4)

    last = read_checkpoint(run / "last.pt")
    assert (last["epoch"], last["step"], last["spec"]) == (3, 0, tiny_spec)
    assert set(last) >= {"optimizer", "scheduler", "scaler", "rng", "config", "history", "meters", "best"}
    best = read_checkpoint(run / "best.pt")
    best_epoch = max(rows, key=lambda r: r["val_top1"])["epoch"]
    assert best["epoch"] == best_epoch == result.best_epoch
    model = tiny_model()
    model.load_state_dict(last["state_dict"])  # a loadable model


def test_epoch_boundary_resume_equals_an_uninterrupted_run(tmp_path, train_tiny, tiny_model, tiny_spec):
    whole = train_tiny(tmp_path / "whole", epochs=2, deterministic=True)
    train_tiny(tmp_path / "split", epochs=1, deterministic=True)
    resumed = train("tiny.pt", "digits", str(tmp_path / "split"), model=tiny_model(seed=99), spec=tiny_spec,
                    resume=True, epochs=2)
    a = read_checkpoint(tmp_path / "whole" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "split" / "last.pt")["state_dict"]
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final == whole.final | {"images_per_s": resumed.final["images_per_s"],
                                           "epoch_time_s": resumed.final["epoch_time_s"]}


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, train_tiny, tiny_model, fail_at):
    run = tmp_path / "run"
    model = torch.nn.Sequential(tiny_model(), fail_at(30, "nan"))  # step 30 = epoch 2, step 8
    with pytest.raises(WorkFailedError, match=r"diverged: the loss became nan at epoch 2 step 8") as info:
        train_tiny(run, model=model, epochs=3, save_every_steps=3)
    assert "last.pt keeps the last good state" in str(info.value)
    last = read_checkpoint(run / "last.pt")
    assert (last["epoch"], last["step"]) == (1, 6)  # the last checkpoint before the NaN
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert len(read_checkpoint(run / "best.pt")["history"]) == 1


def test_finetune_gives_new_pooling_layers_the_full_lr(tmp_path, train_tiny, tiny_model):
    result = train_tiny(tmp_path / "ft", recipe="finetune", epochs=1)
    last = read_checkpoint(tmp_path / "ft" / "last.pt")
    groups = {g["name"]: g for g in last["optimizer"]["param_groups"]}
    model = tiny_model()
    pool_params = sum(len(list(m.parameters())) for m in model.modules() if isinstance(m, GFGPPool2d))
    assert len(groups["new"]["params"]) == pool_params == 16  # 2 layers x (2 convs + 2 BNs) x (weight, bias)
    assert len(groups["reused"]["params"]) == len(list(model.parameters())) - pool_params
    assert groups["reused"]["initial_lr"] == pytest.approx(groups["new"]["initial_lr"] * 0.1)
    assert any("new pooling tensors" in n for n in result.notes)


def test_cpu_bf16_autocast_and_channels_last_train(tmp_path, train_tiny):
    result = train_tiny(tmp_path / "amp", data="fake:10", epochs=1, amp=True, channels_last=True)
    assert math.isfinite(result.final["train_loss"]) and result.final["train_loss"] < 2.5


def test_accumulation_keeps_the_global_batch(tmp_path, train_tiny, tiny_model):
    result = train_tiny(tmp_path / "acc", epochs=1, accum_steps=4)
    assert result.final["epoch"] == 1
    last = read_checkpoint(tmp_path / "acc" / "last.pt")
    assert last["history"][0]["train_top1"] == result.final["train_top1"]
    # 1438 digits // 64 = 22 optimizer steps of 4 micro-batches of 16 images
    assert last["optimizer"]["state"][0]["momentum_buffer"].shape == tiny_model()[0].weight.shape


def test_tensorboard_events_when_installed(tmp_path, train_tiny):
    pytest.importorskip("tensorboard")
    train_tiny(tmp_path / "tb", epochs=1)
    assert any((tmp_path / "tb" / "tb").iterdir())


# --- bad input: one-line BadInputError (exit 2), nothing lost ---------------------------------------


def test_existing_run_needs_resume_or_force_and_is_left_untouched(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run, epochs=1)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(BadInputError, match="already holds a run .*--resume .*--force"):
        train_tiny(run, epochs=1)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    train_tiny(run, epochs=1, force=True)  # --force starts over


@pytest.mark.parametrize("flags,needle", [
    (dict(batch_size=1), "needs at least 2"),
    (dict(batch_size=4, accum_steps=4), "needs at least 2"),
    (dict(batch_size=4096), "fewer than one batch"),
    (dict(image_size=1), "does not run on 1x1 images"),
    (dict(data="fake:3"), "--num-classes 3"),
    (dict(device="cuda"), "no CUDA device is available"),
    (dict(sync_bn=True), "--sync-bn needs CUDA"),
    (dict(amp=True, amp_dtype="fp16"), "fp16 needs CUDA"),
])
def test_bad_runs_stop_before_writing_anything(tmp_path, flags, needle, train_tiny):
    if flags.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BadInputError, match=needle):
        train_tiny(tmp_path / "run", epochs=1, **flags)
    assert not (tmp_path / "run").exists()


def test_unwritable_run_directory(tmp_path, train_tiny):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(BadInputError, match="cannot write the run directory"):
        train_tiny(tmp_path / "file" / "run", epochs=1)


def test_resume_refuses_changed_hyper_parameters_and_a_missing_run(tmp_path, train_tiny, tiny_model, tiny_spec):
    with pytest.raises(BadInputError, match="nothing to resume"):
        train("tiny.pt", "digits", str(tmp_path / "none"), model=tiny_model(), spec=tiny_spec, resume=True)
    train_tiny(tmp_path / "run", epochs=1)
    with pytest.raises(BadInputError, match="started with --lr 0.05"):
        train("tiny.pt", "digits", str(tmp_path / "run"), model=tiny_model(), spec=tiny_spec, resume=True, lr=0.1)
    with pytest.raises(BadInputError, match="started with --data digits"):
        train("tiny.pt", "fake", str(tmp_path / "run"), model=tiny_model(), spec=tiny_spec, resume=True)


def _augmented_folder(root, n=6):
    """An ImageFolder tree whose training transform is random (RandomResizedCrop + flip)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_augmentation_and_order_do_not_depend_on_worker_processes(tmp_path, train_tiny, tiny_model):
    data = str(_augmented_folder(tmp_path / "data"))
    flags = dict(data=data, epochs=1, batch_size=4, image_size=8, deterministic=True)
    train_tiny(tmp_path / "w0", model=tiny_model(num_classes=2), workers=0, **flags)
    train_tiny(tmp_path / "w2", model=tiny_model(num_classes=2), workers=2, **flags)
    a = read_checkpoint(tmp_path / "w0" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "w2" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    train_tiny(tmp_path / "s1", model=tiny_model(num_classes=2), workers=0, **{**flags, "seed": 1})
    c = read_checkpoint(tmp_path / "s1" / "last.pt")["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed does matter


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, train_tiny):
    eager = train_tiny(tmp_path / "eager", data="fake:10", epochs=1, dropout=0.0)
    compiled = train_tiny(tmp_path / "compiled", data="fake:10", epochs=1, dropout=0.0, compile=True)
    assert compiled.final["train_loss"] == pytest.approx(eager.final["train_loss"], rel=1e-3)


def test_pretrained_spec_defaults_to_finetune_with_recorded_new_parameters_at_full_lr(tmp_path, tiny_model, tiny_spec):
    """A spec from `gfgp convert --weights` names the parameters that did not come from the
    weights (new pools, a classifier rebuilt for other classes): those train at the full lr."""
    from gfgp_cli.train import train

    model = tiny_model()
    names = [k for k, _ in model.named_parameters()]
    new = names[-2:]  # the classifier: as if rebuilt with --num-classes
    spec = tiny_spec.replace(weights="pretrained.pt", new_parameters=tuple(new))
    train("tiny.pt", "digits", str(tmp_path / "ft"), model=model, spec=spec, image_size=8, batch_size=64,
                   seed=0, epochs=1)
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["recipe"] == "finetune"
    groups = {g["name"]: g for g in read_checkpoint(tmp_path / "ft" / "last.pt")["optimizer"]["param_groups"]}
    assert len(groups["new"]["params"]) == 2 and len(groups["reused"]["params"]) == len(names) - 2
    assert groups["reused"]["initial_lr"] < groups["new"]["initial_lr"]


class _RecordThreads(torch.nn.Module):
    """Identity that records torch's thread count at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = set()

    def forward(self, x):
        self.seen.add(torch.get_num_threads())
        return x


def test_threads_apply_during_the_run_and_are_restored_after(tmp_path, tiny_model, tiny_spec):
    before = torch.get_num_threads()  # 1: the one_thread fixture
    recorder = _RecordThreads()
    model = torch.nn.Sequential(recorder, *tiny_model())
    train("tiny.pt", "digits", str(tmp_path / "t"), model=model, spec=tiny_spec, image_size=8, batch_size=64,
          seed=0, epochs=1, threads=2)
    assert recorder.seen == {2}
    assert torch.get_num_threads() == before != 2
