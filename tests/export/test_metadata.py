"""Names and metadata_props of an exported file (gfgp_cli.export.metadata): input ``image``, output
``logits`` (a dict's outputs by key), and the gfgp version, input size, conversion spec, training
data, class names and mean/std, read back with onnx and onnxruntime."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from gfgp_cli import GFGPPool2d, GFGPPool3d, __version__, convert, export_onnx, load, save
from gfgp_cli.export import export_checkpoint
from gfgp_cli.export.metadata import output_names
from gfgp_cli.export.runtime import make_session
from gfgp_cli.spec import ConversionSpec, spec_of
from gfgp_cli.train.data import IMAGENET_MEAN, IMAGENET_STD

_nets_spec = importlib.util.spec_from_file_location("_nets", Path(__file__).with_name("_nets.py"))
_nets = importlib.util.module_from_spec(_nets_spec)
_nets_spec.loader.exec_module(_nets)

SIZE = 48


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    return convert("squeezenet1_1", num_classes=10, image_size=SIZE)


def _checkpoint(model, folder, data):
    path = folder / "m.pt"
    save(model, path, config={"data": data})  # the entry a training run writes (TrainConfig.to_dict())
    return path


def _props(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_metadata_round_trip_from_a_digits_checkpoint(converted, tmp_path):
    checkpoint = _checkpoint(converted, tmp_path, "digits")
    report = export_checkpoint(checkpoint, tmp_path / "m.onnx", verify=False)
    props = _props(report.path)
    assert props == report.metadata
    assert props["gfgp_version"] == __version__
    assert json.loads(props["input_size"]) == [3, SIZE, SIZE]
    assert props["task"] == "classification" and props["training_data"] == "digits"
    # sklearn's own digits, in label order
    from sklearn.datasets import load_digits

    assert json.loads(props["class_names"]) == [str(t) for t in load_digits().target_names] == list("0123456789")
    # train/data.py's digits images: (x - 0.5) / 0.5
    assert json.loads(props["mean"]) == json.loads(props["std"]) == [0.5] * 3
    # The spec reads back into the same ConversionSpec the checkpoint holds.
    assert ConversionSpec.from_dict(json.loads(props["gfgp_spec"])) == spec_of(load(checkpoint))
    # The names and the metadata as onnxruntime shows them.
    session = make_session(report.path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_modelmeta().custom_metadata_map == props
    assert report.input_names == ["image"] and report.output_names == ["logits"]


def test_inline_form_keeps_the_metadata(converted, tmp_path):
    report = export_checkpoint(_checkpoint(converted, tmp_path, "digits"), tmp_path / "i.onnx", inline=True, verify=False)
    assert _props(report.path) == report.metadata and "class_names" in report.metadata


def test_image_folder_classes_and_imagenet_normalisation(converted, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ["zebra", "ant", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"]:
            (data / split / name).mkdir(parents=True)
    report = export_checkpoint(_checkpoint(converted, tmp_path, str(data)), tmp_path / "m.onnx", verify=False)
    assert json.loads(report.metadata["class_names"]) == sorted(p.name for p in (data / "train").iterdir())
    assert json.loads(report.metadata["mean"]) == pytest.approx(list(IMAGENET_MEAN))
    assert json.loads(report.metadata["std"]) == pytest.approx(list(IMAGENET_STD))


def test_class_names_are_left_out_when_unknown_or_not_one_per_logit(converted, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    gone = export_checkpoint(_checkpoint(converted, tmp_path / "a", str(tmp_path / "moved-away")),
                             tmp_path / "a" / "m.onnx", verify=False)
    assert "class_names" not in gone.metadata and gone.metadata["training_data"] == str(tmp_path / "moved-away")
    assert "mean" in gone.metadata  # the normalisation of an ImageFolder does not need the files
    torch.manual_seed(0)
    five = convert("squeezenet1_1", num_classes=5, image_size=SIZE)
    wrong = export_checkpoint(_checkpoint(five, tmp_path / "b", "digits"), tmp_path / "b" / "m.onnx", verify=False)
    assert "class_names" not in wrong.metadata and "mean" in wrong.metadata
    fake = export_checkpoint(_checkpoint(converted, tmp_path / "b", "fake:10"), tmp_path / "b" / "f.onnx",
                             verify=False)
    assert "class_names" not in fake.metadata


def test_a_model_without_a_spec_gets_the_version_and_input_size_only(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), GFGPPool2d(4, 2), nn.Flatten(), nn.LazyLinear(3)).eval()
    model(torch.zeros(1, 3, 10, 10))
    report = export_onnx(model, tmp_path / "m.onnx", image_size=10, metadata={"license": "MIT"})
    assert set(_props(report.path)) == {"gfgp_version", "input_size", "license"}
    assert report.output_names == ["logits"] and report.passed


class _Segmenter(_nets.ConvPool):
    """Returns a dict like torchvision's segmentation models."""

    def forward(self, x):
        y = self.features(x)
        return {"out": y, "aux": y.mean(1, keepdim=True)}


def test_dict_outputs_are_named_by_their_keys(tmp_path):
    report = export_onnx(_Segmenter().eval(), tmp_path / "s.onnx", image_size=8)
    assert report.output_names == ["out", "aux"] and report.passed
    assert [o.name for o in onnx.load(report.path).graph.output] == ["out", "aux"]


class _Clip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.pool = GFGPPool3d(4, (1, 2, 2), (1, 2, 2))

    def forward(self, x):
        return self.pool(self.conv(x)).mean((2, 3, 4))


def test_a_video_model_takes_a_clip(tmp_path):
    report = export_onnx(_Clip().eval(), tmp_path / "v.onnx", image_size=8, frames=2)
    assert report.input_names == ["clip"] and report.output_names == ["logits"]
    assert json.loads(report.metadata["input_size"]) == [3, 2, 8, 8]


def test_output_names_of_the_task_outputs():
    t = torch.zeros(1, 2)
    assert output_names([t, t, t], "optical_flow") == ["flow_1", "flow_2", "flow_3"]  # RAFT's estimates
    fpn = {"0": t, "1": t, "pool": t}  # a detection backbone's FPN levels
    assert output_names(fpn, "detection") == ["features_0", "features_1", "pool"]
    assert output_names(t, "segmentation") == ["output"] and output_names(t, None) == ["logits"]


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_a_checkpoint_converted_with_torchvision_weights_and_never_trained_takes_their_names_and_norm(
        tmp_path, num_classes):
    """The weights' categories (ImageNet: 1000, "tench" first) and transforms' mean/std, known to
    torchvision without a download. The spec is edited to record the weights (converting with them
    would download the file); a model with another class count keeps mean/std only."""
    from gfgp_cli.spec import attach_spec

    model = convert("squeezenet1_1", num_classes=num_classes, image_size=64)
    attach_spec(model, spec_of(model).replace(weights="IMAGENET1K_V1"))
    save(model, tmp_path / "m.pt")
    report = export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(report.path).metadata_props}
    assert meta["weights"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1" and "training_data" not in meta
    assert json.loads(meta["mean"]) == pytest.approx(IMAGENET_MEAN) and json.loads(meta["std"]) == pytest.approx(IMAGENET_STD)
    if num_classes == 1000:
        names = json.loads(meta["class_names"])
        assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet tissue"
    else:
        assert "class_names" not in meta


def test_a_checkpoint_without_torchvision_weights_has_no_weights_metadata(tmp_path):
    from gfgp_cli.export.metadata import weights_metadata

    assert weights_metadata(spec_of(convert("squeezenet1_1", num_classes=10, image_size=64))) == {}
    file_spec = spec_of(convert("squeezenet1_1", num_classes=10, image_size=64)).replace(weights=str(tmp_path / "w.pt"))
    assert weights_metadata(file_spec) == {}
