"""Video models (torchvision's r3d_18 & co: ``Tensor[N, 3, T, H, W]`` -> class logits) through
``gfgp train`` / ``gfgp eval`` on moving digits: one epoch of a converted r3d_18 end to end, a
tiny 3-D GFGP network in-process (channels_last_3d, learning, lam plots), and the one-line
refusals of a video model given images or an image model given clips.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError
from gfgp_cli.spec import ConversionSpec, ModuleSource, attach_spec, spec_of

SIZE, FRAMES = 32, 8
# 16 training clips (two steps of 8), 8 validation clips; no frames=T: the clips follow the
# checkpoint's clip length (its spec's frames, 8).
VIDEO_DATA = "moving-digits:0:train=16:val=8"
VIDEO_NAME = "moving-digits:0:frames=8:train=16:val=8"  # the data set it names for that checkpoint


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def r3d_checkpoint(tmp_path_factory):
    """r3d_18 (10 classes) converted by gfgp_cli.convert for 8-frame 32x32 clips, saved."""
    from gfgp_cli import convert, save

    torch.set_num_threads(1)  # module-scoped: the autouse one_thread fixture has not run yet
    model = convert("r3d_18", num_classes=10, image_size=SIZE, frames=FRAMES, seed=0)
    spec = spec_of(model)
    assert (spec.task, spec.image_size, spec.frames) == ("video", SIZE, FRAMES)
    assert any(type(m).__name__ == "GFGPPool3d" for m in model.modules())
    path = tmp_path_factory.mktemp("video") / "r3d.pt"
    save(model, path)
    return path


@pytest.fixture(scope="module")
def r3d_run(r3d_checkpoint, tmp_path_factory):
    """One epoch of `gfgp train` of the converted r3d_18 on 16 moving-digit clips (two steps)."""
    run = tmp_path_factory.mktemp("video") / "run"
    torch.set_num_threads(1)  # module-scoped: the autouse one_thread fixture has not run yet
    result = _invoke("train", r3d_checkpoint, "--data", VIDEO_DATA, "--out", run, "--epochs", 1, "--batch-size", 8,
                     "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_video_model_trains_an_epoch_on_moving_digits(r3d_run):
    run, report = r3d_run
    assert report["epochs"] == 1 and not report["interrupted"]
    config = json.loads((run / "config.json").read_text())
    assert (config["image_size"], config["data"]) == (SIZE, VIDEO_DATA)  # the size of the conversion spec
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and len((run / "metrics.csv").read_text().splitlines()) == 2
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(rows[0][key]), rows[0]
    assert 0 <= rows[0]["val_top1"] <= 100 and (run / "last.pt").exists() and (run / "best.pt").exists()


def test_gfgp_eval_of_the_video_run_reproduces_its_validation(r3d_run):
    run, report = r3d_run
    result = _invoke("eval", run / "last.pt", "--data", VIDEO_DATA, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert (got["images"], got["image_size"], got["frames"], got["data"]) == (8, SIZE, FRAMES, VIDEO_NAME)
    assert got["top1"] == report["final"]["val_top1"]
    assert got["loss"] == pytest.approx(report["final"]["val_loss"], rel=1e-4)
    table = _invoke("eval", run / "best.pt", "--data", VIDEO_DATA, "--batch-size", 4)
    assert table.exit_code == 0 and "8-frame 32px clips" in table.output and "top-1" in table.output
    # frames=T in the SPEC overrides the checkpoint's clip length (r3d_18 takes any)
    other = _invoke("eval", run / "last.pt", "--data", "moving-digits:0:frames=4:val=8", "--json")
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout)["frames"] == 4


def test_video_model_given_images_exits_2_with_one_line(r3d_checkpoint, tmp_path):
    for data in ("digits", "fake", "cluttered:1"):
        line = _one_line_error(_invoke("train", r3d_checkpoint, "--data", data, "--out", tmp_path / "run"))
        assert "r3d_18 is a video model" in line and f"--data {data} holds images" in line and "moving-digits" in line
    line = _one_line_error(_invoke("eval", r3d_checkpoint, "--data", "digits"))
    assert "is a video model" in line
    assert not (tmp_path / "run").exists()


def test_image_model_given_clips_exits_2_with_one_line(converted, tmp_path):
    line = _one_line_error(_invoke("train", converted, "--data", VIDEO_DATA, "--out", tmp_path / "run"))
    assert f"--data {VIDEO_DATA} holds video clips" in line and "mobilenet_v3_small is an image model" in line
    assert "r3d_18" in line  # what to use instead
    line = _one_line_error(_invoke("eval", converted, "--data", "moving-digits"))
    assert "holds video clips" in line
    assert not (tmp_path / "run").exists()


# --- a tiny 3-D GFGP network, in-process -----------------------------------------------------------


def tiny_video_model(num_classes: int = 10, seed: int = 0, width: int = 8) -> nn.Module:
    """Three 3x3x3 convs, each followed by a 3-D GFGP pool (the first over space only): a video
    classifier of ``Tensor[N, 3, T, H, W]``."""
    from gfgp_cli.nn import GFGPPool3d

    torch.manual_seed(seed)
    c = width
    return nn.Sequential(
        nn.Conv3d(3, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU(), GFGPPool3d(c, (1, 2, 2)),
        nn.Conv3d(c, 2 * c, 3, padding=1), nn.BatchNorm3d(2 * c), nn.ReLU(), GFGPPool3d(2 * c, 2),
        nn.Conv3d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm3d(4 * c), nn.ReLU(), GFGPPool3d(4 * c, 2),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4 * c, num_classes),
    )


# "A user's video module with GFGP pools, at 16x16" (what training reads: the task and the size).
TINY_VIDEO_SPEC = ConversionSpec(source=ModuleSource("test_video.tiny_video_model"), pool="gfgp", placement="local",
                                 activation="sigmoid", image_size=16, sites=(), torchvision_version="none",
                                 task="video")
TINY_DATA = "moving-digits:0:frames=8:train=96:val=32"


def _train_tiny_video(out, data=TINY_DATA, model=None, **flags):
    from gfgp_cli.train import train

    return train("tiny_video.pt", data, str(out), model=model or tiny_video_model(), spec=TINY_VIDEO_SPEC,
                 **{"batch_size": 16, "lr": 0.05, "epochs": 1, **flags})


def test_tiny_video_model_trains_with_channels_last_3d(tmp_path):
    model = tiny_video_model()
    seen = []  # every training batch (not the blank clips that count the classes, before the run)
    model[0].register_forward_pre_hook(lambda m, args: seen.append(
        (args[0].dim(), args[0].is_contiguous(memory_format=torch.channels_last_3d))) if m.training else None)
    result = _train_tiny_video(tmp_path / "run", model=model, channels_last=True)
    assert result.epochs == 1 and math.isfinite(result.final["train_loss"]) and math.isfinite(result.final["val_loss"])
    assert seen and all(s == (5, True) for s in seen), seen[:3]
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert model[4].weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_tiny_video_model_learns_the_moving_digits(tmp_path):
    # Five epochs of 1,024 clips (8 frames, 16x16), cosine decay: far above chance (10%) on the
    # validation clips, whose source digits were never seen in training (52% with this seed; the
    # BatchNorm running statistics lag the weights in so short a run, train-mode accuracy is higher).
    result = _train_tiny_video(tmp_path / "run", data="moving-digits:0:frames=8:train=1024:val=256", epochs=5,
                               batch_size=32, lr=0.05, schedule="cosine", final_lr_ratio=0.01, image_size=16)
    assert result.final["val_top1"] > 30, result.final


def test_image_model_in_process_refuses_clips(tmp_path, train_tiny):
    with pytest.raises(BadInputError, match="holds video clips") as e:
        train_tiny(tmp_path / "run", data=TINY_DATA)
    assert "\n" not in str(e.value) and "tiny_run.tiny_model is an image model" in str(e.value)
    with pytest.raises(BadInputError, match="is a video model"):
        _train_tiny_video(tmp_path / "run", data="digits")
    assert not (tmp_path / "run").exists()


def test_video_model_that_does_not_run_on_the_clips_is_bad_input():
    # torchvision's S3D ends in a (2, 7, 7) average pool: 8-frame 32x32 clips are too small for it.
    import torchvision

    from gfgp_cli.train.evaluation import prepare_data

    s3d = attach_spec(torchvision.models.get_model("s3d", num_classes=10), TINY_VIDEO_SPEC.replace(image_size=SIZE))
    with pytest.raises(BadInputError, match="does not run on 8-frame 32x32 clips") as e:
        prepare_data(s3d, spec_of(s3d), TINY_DATA, None, torch.device("cpu"), False)
    assert "--image-size" in str(e.value) and "frames=T" in str(e.value) and "\n" not in str(e.value)


def test_lam_of_3d_pools_is_collected_over_clips():
    from gfgp_cli.train import collect_lam, load_data

    clips = torch.stack([load_data(TINY_DATA, 16).val[i][0] for i in range(4)])
    assert clips.shape == (4, 3, 8, 16, 16)
    lam = collect_lam(tiny_video_model(), clips)
    assert sorted(lam) == ["11", "3", "7"] and lam["3"].shape == (4 * 8,) and lam["11"].shape == (4 * 32,)


def test_channels_last_by_rank():
    from gfgp_cli.train.runtime import channels_last_format, to_channels_last

    assert channels_last_format(torch.zeros(1, 2, 3, 4)) == torch.channels_last
    assert channels_last_format(torch.zeros(1, 2, 3, 4, 5)) == torch.channels_last_3d
    assert channels_last_format(torch.zeros(2, 3)) is None
    mixed = to_channels_last(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(4, 5, 3), nn.Linear(5, 2)))
    assert mixed[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert mixed[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert mixed[2].weight.is_contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_video_model_trains_on_cuda_with_amp_and_channels_last_3d(tmp_path):
    model = tiny_video_model()
    result = _train_tiny_video(tmp_path / "run", model=model, device="cuda", amp=True, channels_last=True, epochs=2)
    assert result.epochs == 2 and math.isfinite(result.final["train_loss"])
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
