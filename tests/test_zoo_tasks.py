"""Every torchvision task converts by name, exactly, and goes through train, load and export.

``gfgp_cli.zoo_report.check_model`` runs each step for one model: convert (paper layout, GFGP
pools), the layout check of the exact layout (skip pools against the original, eval mode, two
input sizes; detections compared as sets in float64, and the converted backbone's feature maps),
one training-mode forward and backward (a detection model's own losses on synthetic targets)
with finite, non-zero gradients on the GFGP parameters, and a checkpoint round trip.

- ``test_zoo_model_of_every_task`` (marker ``zoo``, ``make test-zoo``): every name of
  ``torchvision.models.list_models()``, video models included (3-D pooling, their default
  16-frame clips), exported too; detectors built with ``check_kwargs``
  (``min_size=max_size=320``; SSD at its own size), as in the README's table.
- ``test_task_representative`` (fast suite): one model per task, exported and verified in
  onnxruntime too (a detection model's converted backbone; the whole detector is refused); the
  video representative on 8-frame 64 x 64 clips.
Weights are random (``weights=None``, nothing downloads); the checkpoint files go to tmp_path.
"""

from __future__ import annotations

import pytest

from gfgp_cli import zoo
from gfgp_cli.errors import BadInputError
from gfgp_cli.zoo_report import check_kwargs, check_model

# The smallest model of each task; all run in a few seconds on 2 CPU cores.
TASK_REPRESENTATIVES = {
    "classification": "mobilenet_v3_small",
    "segmentation": "lraspp_mobilenet_v3_large",
    "detection": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "optical_flow": "raft_small",
    "quantization": "quantized_mobilenet_v3_large",
    "video": "r3d_18",
}
# Example sizes of the fast suite where a model's default is slow on 2 cores (16 x 112 x 112).
REPRESENTATIVE_KWARGS = {"r3d_18": {"image_size": 64, "frames": 8}}
# Where a model torch.fx cannot trace whole is converted: derived from torchvision's code (the
# forward loops over a list of images / iterates RAFT's updates; the backbone and the two
# encoders are plain CNNs).
EXPECTED_PARTS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ["backbone"],
    "raft_small": ["feature_encoder", "context_encoder"],
}

ALL_MODELS = zoo.list_model_names()
# Models that take one input size only: the layout check's second size is refused by the original.
FIXED_SIZE = ("vit_", "mvit_", "swin_", "maxvit_", "regnet", "inception", "googlenet", "quantized_")
# Models whose only strided conv is a patch embedding (kernel == stride >= 4 in H and W), which
# is not converted by default: they get no GFGP layer (and still train and round-trip).
NO_GFGP_LAYER = {name for name in ALL_MODELS if name.startswith(("vit_", "swin_", "swin3d_"))}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _assert_row(row: dict) -> None:
    assert "error" not in row, row["error"]
    assert row["converts"] and (row["gfgp_layers"] > 0) == (row["model"] not in NO_GFGP_LAYER), row
    assert row["exact"] is True, f"layout check: {row['exact_error']:.3g} x output scale on {row['exact_inputs']}"
    # Two sizes, except models of a fixed input size (ViT, MViT: positional embeddings of one size).
    assert len(row["exact_inputs"]) == 2 or row["model"].startswith(FIXED_SIZE), row["exact_inputs"]
    assert row["trains"] is True, row
    assert row["roundtrip"] is True, row


@pytest.mark.parametrize("task", sorted(TASK_REPRESENTATIVES))
def test_task_representative(task, tmp_path):
    name = TASK_REPRESENTATIVES[task]
    row = check_model(name, export=True, workdir=tmp_path, **REPRESENTATIVE_KWARGS.get(name, {}))
    assert row["task"] == task
    _assert_row(row)
    assert row["parts"] == EXPECTED_PARTS.get(name, [""])
    assert row["exports"] is True, row.get("export_note")
    if task == "detection":
        assert row["export_part"] == "backbone" and "whole model refused" in row["export_note"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL_MODELS)
def test_zoo_model_of_every_task(name, tmp_path):
    video = zoo.task_of(name) == "video"
    row = check_model(name, export=video, workdir=tmp_path, **check_kwargs(name))
    print(f"{name} ({row['task']}): {row.get('gfgp_layers')} GFGP layers, parts {row.get('parts')}, "
          f"converted in {row.get('convert_s')} s, layout error {row.get('exact_error')}")
    _assert_row(row)
    if video:
        assert row["exports"] is True, row.get("export_note")


def test_frames_are_for_video_models_only():
    with pytest.raises(BadInputError, match="^--frames applies to video models"):
        zoo.check_frames("resnet18", "classification", 8)
    with pytest.raises(BadInputError, match="^frames must be a positive int"):
        zoo.check_frames("r3d_18", "video", 0)
    assert zoo.check_frames("r3d_18", "video", None) == zoo.VIDEO_FRAMES


def test_every_name_has_one_task():
    names = zoo.list_model_names()
    assert len(names) == len(set(names)) and set(zoo.TASKS) == {zoo.task_of(n) for n in names}
    assert sum(len(zoo.list_model_names(t)) for t in zoo.TASKS) == len(names)


@pytest.mark.parametrize("name, strides", [
    ("r3d_18", (2, 2, 2)), ("mc3_18", (1, 2, 2)), ("r2plus1d_18", (2, 2, 2)),
])
def test_video_resnets_get_the_official_layout(name, strides):
    """Paper placement: the stem's pool after its ReLU, and each downsampling block's one pool
    after the block's final ReLU, as for the 2-D ResNets (R(2+1)D: its spatial and temporal
    pools composed into one)."""
    from gfgp_cli.conversion import convert_with_report
    from gfgp_cli.nn import GFGPPool3d

    gm, report = convert_with_report(name, image_size=32, frames=4, seed=0)
    assert [(p["after"], tuple(p["stride"])) for p in report.placed] == [("stem.2", (1, 2, 2))] + [
        (f"layer{i}.0.relu", strides) for i in (2, 3, 4)]
    assert sum(isinstance(m, GFGPPool3d) for m in gm.modules()) == 4
