"""`gfgp convert`, `export`, `train` for models of every torchvision task: options and one-line refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import gfgp_cli
from gfgp_cli import zoo
from gfgp_cli.cli import cli
from gfgp_cli.spec import spec_of


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_segmentation_model_converts_by_name_with_its_kwargs(tmp_path):
    result = _run("convert", "fcn_resnet50", "--num-classes", 11, "--kwarg", "aux_loss=True", "--image-size", 64,
                  "--placement", "exact", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["task"] == "segmentation" and data["parts"] == [""] and data["exact"] is True
    assert data["untraced"] == [] and len(data["exact_examples"]) == 2


def test_kwargs_reach_the_builder_and_the_spec():
    model = gfgp_cli.convert("fcn_resnet50", num_classes=11, aux_loss=True, image_size=64)
    spec = spec_of(model)
    assert spec.source.kwargs == {"num_classes": 11, "aux_loss": True} and spec.source.weights_backbone is None
    assert model.get_submodule("classifier.4").out_channels == 11 and model.get_submodule("aux_classifier.4").out_channels == 11


def test_detection_model_converts_part_by_part_and_lists_what_stays_python():
    result = _run("convert", "fasterrcnn_mobilenet_v3_large_320_fpn", "--kwarg", "min_size=160", "--kwarg", "max_size=160",
                  "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["task"] == "detection" and data["parts"] == ["backbone"]
    untraced = {u["qualname"]: u for u in data["untraced"]}
    assert {"", "transform", "rpn", "roi_heads"} <= set(untraced)
    assert untraced[""]["type"] == "FasterRCNN" and "Proxy object cannot be iterated" in untraced[""]["reason"]
    assert all(s["qualname"].startswith("backbone.") for s in data["sites"])


def test_conversion_downloads_no_backbone_weights(monkeypatch):
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    gfgp_cli.convert("deeplabv3_mobilenet_v3_large", image_size=64)
    gfgp_cli.convert("ssdlite320_mobilenet_v3_large", image_size=160)


@pytest.mark.parametrize("args, message", [
    (["fcn_resnt50"], "unknown model 'fcn_resnt50'; did you mean fcn_resnet50? (torchvision's task families: classification, "
                      "segmentation, detection, optical_flow, quantization, video"),
    (["resnet18", "--frames", "8"], "--frames applies to video models (clips), not to resnet18 (classification)"),
    (["quantized_resnet18", "--kwarg", "quantize=True"], "with quantize=True is an int8 model"),
    (["resnet18", "--weights-backbone", "IMAGENET1K_V1"], "--weights-backbone applies to detection and segmentation models"),
    (["resnet18", "--kwarg", "depth=3"], "cannot build resnet18 with {'depth': 3}: ResNet.__init__() got an unexpected keyword"),
    (["resnet18", "--num-classes", "3", "--kwarg", "num_classes=4"], "give num_classes once"),
    (["resnet18", "--kwarg", "oops"], "'oops' is not KEY=VALUE"),
    # the task's own weights names, checked before anything downloads
    (["fasterrcnn_resnet50_fpn", "--weights", "COCO_V2"], "unknown weights for fasterrcnn_resnet50_fpn 'COCO_V2'; did you mean COCO_V1?"),
])
def test_bad_convert_input_is_one_line(args, message):
    result = _run("convert", *args, "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_list_names_every_model_by_task():
    result = _run("convert", "--list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {task: zoo.list_model_names(task) for task in zoo.TASKS}


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "det.pt"
    result = _run("convert", "fasterrcnn_mobilenet_v3_large_320_fpn", "--kwarg", "min_size=160", "--kwarg", "max_size=160",
                  "--image-size", 160, "--out", path)
    assert result.exit_code == 0, result.output
    return path


def test_export_refuses_a_whole_detector_and_names_its_part(detector, tmp_path):
    line = _one_line_error(_run("export", detector, "--onnx", tmp_path / "d.onnx"))
    assert "cannot export fasterrcnn_mobilenet_v3_large_320_fpn whole" in line and "--part backbone" in line
    assert not (tmp_path / "d.onnx").exists()
    line = _one_line_error(_run("export", detector, "--onnx", tmp_path / "d.onnx", "--part", "rpn"))
    assert "'rpn' is not a converted part" in line and "choose one of: backbone" in line


def test_train_and_eval_refuse_class_label_data_for_a_detector_before_writing(detector, tmp_path):
    out = tmp_path / "run"
    line = _one_line_error(_run("train", detector, "--data", "fake:8", "--out", out, "--epochs", 1))
    assert "is a detection model but --data fake:8 holds class labels, not boxes" in line and "--data scenes" in line
    assert not out.exists()
    line = _one_line_error(_run("eval", detector, "--data", "fake:8"))
    assert "is a detection model but --data fake:8 holds class labels" in line


def test_quantizable_float_model_trains_like_a_classifier(tmp_path):
    ckpt = tmp_path / "q.pt"
    assert _run("convert", "quantized_resnet18", "--num-classes", 10, "--image-size", 32, "--out", ckpt).exit_code == 0
    result = _run("train", ckpt, "--data", "fake:10", "--epochs", 1, "--batch-size", 8, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last.pt").exists()
    assert spec_of(gfgp_cli.load(tmp_path / "run" / "last.pt")).task == "quantization"


def _paper_resnet(prefix: str, layers) -> list:
    """The official ResNet layout: the stem's pool after its ReLU; each downsampling block's two
    pools (main path and shortcut) merged into one after the block's final ReLU."""
    return [(f"{prefix}relu", (f"{prefix}conv1",))] + [
        (f"{prefix}layer{i}.0.relu", (f"{prefix}layer{i}.0.conv2", f"{prefix}layer{i}.0.downsample.0")) for i in layers]


@pytest.mark.parametrize("name, kwargs, prefix, layers", [
    ("fasterrcnn_resnet50_fpn", {"min_size": 160, "max_size": 160}, "backbone.body.", (2, 3, 4)),
    ("fcn_resnet50", {}, "backbone.", (2,)),  # layer3 and layer4 are dilated, not strided
])
def test_detection_and_segmentation_resnets_get_the_paper_layout(name, kwargs, prefix, layers):
    from gfgp_cli.conversion import convert_with_report

    _, report = convert_with_report(name, pool="skip", image_size=160, **kwargs)
    assert [(p["after"], tuple(p["sources"])) for p in report.placed] == _paper_resnet(prefix, layers)
