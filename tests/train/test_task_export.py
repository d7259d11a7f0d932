"""Export of trained segmentation and detection runs (gfgp_cli.export.export_checkpoint, as
``gfgp export``): a trained LR-ASPP exports whole and verifies, and onnxruntime's masks score
the validation scenes as ``gfgp eval`` does; a trained detector is refused whole in one line
(torch.export cannot trace torchvision's box post-processing, whose output size depends on the
data) and its converted backbone exports and verifies (``--part backbone``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gfgp_cli.errors import BadInputError

# The tests' shared helpers, loaded by path (--import-mode=importlib: no test folder on sys.path).
_spec = importlib.util.spec_from_file_location("gfgp_tests_task_run", Path(__file__).parent / "task_run.py")
task_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_run)

pytest.importorskip("onnxruntime")
DATA = "scenes:0:train=8:val=6"  # 2 steps of 4 scenes, 6 validation scenes


def _trained(tmp_path_factory, name, task, size, **kwargs):
    from gfgp_cli.train import train

    checkpoint = task_run.converted(tmp_path_factory, name, task, num_classes=11, image_size=size, seed=0, **kwargs)
    run = checkpoint.parent / "run"
    train(str(checkpoint), DATA, str(run), epochs=1, batch_size=4, lr=0.01)
    return run / "last.pt"


def test_a_trained_segmentation_model_exports_verifies_and_scores_as_gfgp_eval(tmp_path_factory, tmp_path):
    import onnxruntime as ort

    from gfgp_cli.export import export_checkpoint
    from gfgp_cli.train import evaluate_checkpoint
    from gfgp_cli.train.tasks import confusion_matrix, segmentation_scores

    last = _trained(tmp_path_factory, "lraspp_mobilenet_v3_large", "segmentation", 32)
    report = export_checkpoint(last, tmp_path / "seg.onnx")
    assert report.passed and report.custom_nodes > 0, report
    assert report.input_shape[1:] == [3, 32, 32] and report.output_names[0] == "out"
    assert (report.metadata["task"], report.metadata["training_data"]) == ("segmentation", DATA)
    # the exported file's masks, scored on the validation scenes, are the checkpoint's
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    confusion = torch.zeros(11, 11, dtype=torch.int64)
    for image, mask in task_run.validation(DATA, 32, "segmentation"):
        (scores, *_) = session.run(None, {session.get_inputs()[0].name: image[None].numpy()})
        confusion += confusion_matrix(torch.from_numpy(scores).argmax(1), mask[None], 11)
    ours = segmentation_scores(confusion)
    metrics = evaluate_checkpoint(str(last), DATA)
    assert confusion.sum() > 0
    assert ours["miou"] == pytest.approx(metrics["miou"], abs=0.5)  # a pixel's argmax may flip on a near tie
    assert ours["pixel_acc"] == pytest.approx(metrics["pixel_acc"], abs=0.5)


def test_a_trained_detector_is_refused_whole_and_its_backbone_exports(tmp_path_factory, tmp_path):
    from gfgp_cli.export import export_checkpoint

    last = _trained(tmp_path_factory, "fasterrcnn_mobilenet_v3_large_320_fpn", "detection", 64, min_size=64,
                    max_size=64)
    with pytest.raises(BadInputError, match=r"cannot export fasterrcnn_mobilenet_v3_large_320_fpn whole.*--part "
                                            r"backbone") as refused:
        export_checkpoint(last, tmp_path / "whole.onnx")
    assert "\n" not in str(refused.value) and not (tmp_path / "whole.onnx").exists()
    report = export_checkpoint(last, tmp_path / "backbone.onnx", part="backbone")
    assert report.passed and report.part == "backbone" and report.custom_nodes > 0, report
    assert report.output_names == ["features_0", "features_1", "pool"]
