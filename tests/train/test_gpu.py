"""CUDA paths of the training loop (run on a GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

import math

import pytest
import torch

from gfgp_cli.checkpoint import read_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_cuda_autocast_trains_and_saves_the_scaler(tmp_path, train_tiny, amp_dtype):
    result = train_tiny(tmp_path / "run", device="cuda", amp=True, amp_dtype=amp_dtype, channels_last=True, epochs=2)
    assert math.isfinite(result.final["train_loss"]) and result.final["val_top1"] > 20
    scaler = read_checkpoint(tmp_path / "run" / "last.pt")["scaler"]
    # fp16 needs a grad scaler (its state has the scale); bf16 runs without one.
    assert ("scale" in scaler) == (amp_dtype == "fp16" or not torch.cuda.is_bf16_supported())


def test_cuda_epoch_boundary_resume_is_exact(tmp_path, train_tiny, tiny_model):
    flags = dict(device="cuda", deterministic=True)
    train_tiny(tmp_path / "whole", epochs=2, **flags)
    train_tiny(tmp_path / "split", epochs=1, **flags)
    train_tiny(tmp_path / "split", model=tiny_model(seed=5), resume=True, epochs=2, **flags)
    a = read_checkpoint(tmp_path / "whole" / "last.pt")
    b = read_checkpoint(tmp_path / "split" / "last.pt")
    assert "cuda" in a["rng"][0]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_cuda_eval_matches_cpu_eval(tmp_path, train_tiny, tiny_model):
    from torch import nn

    from gfgp_cli.train import evaluate, load_data
    from gfgp_cli.train.distributed import DistInfo
    from gfgp_cli.train.evaluation import eval_loader

    train_tiny(tmp_path / "run", epochs=1)
    model = tiny_model()
    model.load_state_dict(read_checkpoint(tmp_path / "run" / "last.pt")["state_dict"])
    val = load_data("digits", 8).val
    results = {}
    for device in ("cpu", "cuda"):
        dev = torch.device(device)
        results[device] = evaluate(model.to(dev), nn.CrossEntropyLoss(), eval_loader(val, 64, 0, dev, DistInfo()), dev)
    assert results["cuda"]["loss"] == pytest.approx(results["cpu"]["loss"], rel=1e-4)
    assert abs(results["cuda"]["top1"] - results["cpu"]["top1"]) <= 100 / len(val) + 1e-9
