"""Fine-tuning a segmentation model from weights, as ``gfgp convert --weights FILE`` then
``gfgp train``, without a download: torchvision's LR-ASPP built here, its state_dict saved to a
local file, converted with it. The converted model starts from those weights, the run defaults
to the finetune recipe, and one SGD step moves the new GFGP parameters by lr x gradient and the
reused ones by a tenth of that (the gradient computed here, on the same batch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gfgp_cli.checkpoint import read_checkpoint

# The tests' shared helpers, loaded by path (--import-mode=importlib: no test folder on sys.path).
_spec = importlib.util.spec_from_file_location("gfgp_tests_task_run", Path(__file__).parent / "task_run.py")
task_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_run)

SIZE = 32
DATA = "scenes:0:train=4:val=4"  # one step of all 4 training scenes
LR = 0.05


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """torchvision's lraspp_mobilenet_v3_large (11 classes), its weights drawn at random (seeded:
    "pretrained" weights no model here has), saved as a plain state_dict."""
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=11)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.01)  # unlike a fresh model's
    path = tmp_path_factory.mktemp("weights") / "lraspp_weights.pt"
    torch.save(model.state_dict(), path)
    return path


def test_finetune_from_a_local_weights_file(weights_file, tmp_path):
    from gfgp_cli import convert, load, save
    from gfgp_cli.nn import GFGPPool2d
    from gfgp_cli.spec import spec_of
    from gfgp_cli.train.data import load_data
    from gfgp_cli.train.tasks import SegmentationLoss

    torch.set_num_threads(1)
    model = convert("lraspp_mobilenet_v3_large", num_classes=11, image_size=SIZE, weights=str(weights_file), seed=0)
    spec = spec_of(model)
    assert spec.weights == str(weights_file)
    original = torch.load(weights_file)
    state = model.state_dict()
    for key, value in original.items():  # every torchvision tensor kept, under its own name
        assert torch.equal(state[key], value), key
    new = {name for name, p in model.named_parameters()
           if any(p is q for m in model.modules() if isinstance(m, GFGPPool2d) for q in m.parameters())}
    assert new and new == set(spec.new_parameters) and not new & set(original)
    checkpoint = tmp_path / "lraspp_ft.pt"
    save(model, checkpoint)

    # the gradient of the training loss at the start, on the one batch the run will see
    reference = load(checkpoint).train()
    train_set = load_data(DATA, SIZE, task="segmentation").train
    images = torch.stack([train_set[i][0] for i in range(4)])
    masks = torch.stack([train_set[i][1] for i in range(4)])
    SegmentationLoss()(reference(images), masks).backward()
    grads = {name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None}

    run = tmp_path / "run"
    result = task_run.invoke("train", checkpoint, "--data", DATA, "--out", run, "--epochs", 1, "--batch-size", 4,
                             "--lr", LR, "--momentum", 0, "--wd", 0, "--sched", "constant")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["backbone_lr_scale"]) == ("finetune", 0.1)  # chosen for a --weights checkpoint
    assert any(f"{len(new)} new pooling tensors at lr {LR:g}" in note and f"at lr {LR * 0.1:g}" in note
               for note in config["notes"]), config["notes"]
    trained = read_checkpoint(run / "last.pt")["state_dict"]
    initial = reference.state_dict()
    moved = {"new": [], "reused": []}
    for name, grad in grads.items():
        group = "new" if name in new else "reused"
        lr = LR if group == "new" else LR * 0.1
        delta = trained[name] - initial[name]
        # plain SGD: -lr x gradient (atol: float32 rounding of weights of size ~1)
        torch.testing.assert_close(delta, -lr * grad, rtol=1e-3, atol=1e-6, msg=name)
        moved[group].append(int((delta.abs() > 1e-4).sum()))
    assert sum(moved["new"]) > 100 and sum(moved["reused"]) > 100  # both groups moved measurably
