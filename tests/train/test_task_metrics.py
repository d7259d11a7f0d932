"""The metrics and losses of the segmentation and detection tasks (gfgp_cli.train.tasks) against
hand-computed cases and maintained implementations: the confusion matrix, pixel accuracy and
mIoU (scikit-learn's), the segmentation loss (torch's cross-entropy, aux head, ignored pixels),
box IoU and COCO mAP (pycocotools, through coco_map)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, jaccard_score
from torchvision.ops import box_iou

from gfgp_cli.errors import BadInputError
from gfgp_cli.train.tasks import (
    IGNORE_INDEX,
    SegmentationLoss,
    SegmentationMeters,
    coco_map,
    confusion_matrix,
    segmentation_scores,
    task_for,
)

# --- segmentation ----------------------------------------------------------------------------------


def test_scores_of_a_hand_computed_confusion_matrix():
    # rows: true class, columns: predicted. Class 0: TP 3, FN 1, FP 2 -> IoU 3/6; class 1: TP 4,
    # FN 2, FP 1 -> IoU 4/7; class 2 never appears (0 / 0) and is left out of the mean.
    cm = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    scores = segmentation_scores(cm)
    assert scores["pixel_acc"] == pytest.approx(100 * 7 / 10)
    assert scores["miou"] == pytest.approx(100 * (3 / 6 + 4 / 7) / 2)


def test_a_class_only_predicted_counts_with_iou_zero():
    cm = torch.tensor([[2, 2], [0, 0]])  # class 1 never true, predicted twice: IoU 0
    assert segmentation_scores(cm)["miou"] == pytest.approx(100 * (2 / 4 + 0) / 2)


def test_perfect_prediction_gives_miou_and_accuracy_100():
    target = torch.randint(0, 11, (2, 16, 16))
    target[0, :3] = IGNORE_INDEX
    cm = confusion_matrix(target.clamp(max=10), target, 11)
    assert segmentation_scores(cm) == {"pixel_acc": 100.0, "miou": 100.0}


def test_confusion_matrix_skips_ignored_pixels_and_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 20, 20), generator=g)
    pred = torch.where(torch.rand(3, 20, 20, generator=g) < 0.6, target, torch.randint(0, 5, (3, 20, 20), generator=g))
    target[:, :4] = IGNORE_INDEX
    pred[:, :4] = 0  # whatever is predicted on ignored pixels does not count
    cm = confusion_matrix(pred, target, 5)
    keep = target != IGNORE_INDEX
    assert int(cm.sum()) == int(keep.sum())
    t, p = target[keep].numpy(), pred[keep].numpy()
    scores = segmentation_scores(cm)
    assert scores["pixel_acc"] == pytest.approx(100 * accuracy_score(t, p))
    assert scores["miou"] == pytest.approx(100 * jaccard_score(t, p, average="macro"))


def test_meters_sum_batches_and_restore_from_their_state():
    meters = SegmentationMeters(3)
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 1] = 1  # predicts class 1 everywhere
    target = torch.ones(2, 4, 4, dtype=torch.long)
    target[0] = 0
    meters.update(0.5, logits, target)
    meters.update(1.5, logits, target)
    summary = meters.summary(meters.totals())
    assert summary["loss"] == pytest.approx(1.0) and summary["images"] == 4
    assert summary["pixel_acc"] == pytest.approx(50.0)
    assert summary["miou"] == pytest.approx(100 * (0 + 0.5) / 2)  # class 0: IoU 0; class 1: 32 / 64
    again = SegmentationMeters(3).restored([meters.state(), meters.state()])
    assert torch.equal(again.confusion, 2 * meters.confusion) and again.count == 8


def test_segmentation_loss_is_ce_on_out_plus_half_ce_on_aux_without_ignored_pixels():
    g = torch.Generator().manual_seed(1)
    out, aux = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (2, 5, 5), generator=g)
    target[1, 2:] = IGNORE_INDEX
    loss = SegmentationLoss()
    keep = target != IGNORE_INDEX
    ce_out = F.cross_entropy(out.permute(0, 2, 3, 1)[keep], target[keep])
    ce_aux = F.cross_entropy(aux.permute(0, 2, 3, 1)[keep], target[keep])
    torch.testing.assert_close(loss({"out": out, "aux": aux}, target), ce_out + 0.5 * ce_aux)
    torch.testing.assert_close(loss({"out": out}, target), ce_out)  # no aux head (LR-ASPP)
    changed = out.clone()
    changed[1, :, 2:] = 100.0  # scores on ignored pixels change nothing
    torch.testing.assert_close(loss({"out": changed}, target), ce_out)


# --- detection -------------------------------------------------------------------------------------


def test_box_iou_of_a_shifted_box_is_the_hand_computed_one():
    # A 10x10 box shifted right by 4: intersection 6x10 = 60, union 100 + 100 - 60 = 140.
    a, b = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[4.0, 0.0, 14.0, 10.0]])
    assert float(box_iou(a, b)) == pytest.approx(60 / 140)


def _target(*boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return {"boxes": boxes, "labels": torch.tensor(labels or [1] * len(boxes))}


def _pred(*boxes, labels=None, scores=None):
    t = _target(*boxes, labels=labels)
    return {**t, "scores": torch.tensor(scores or [0.9] * len(t["boxes"]))}


def test_perfect_detections_give_map_100():
    targets = [_target([2, 3, 20, 30], [30, 5, 50, 25], labels=[1, 4]), _target([10, 10, 40, 40], labels=[7])]
    predictions = [_pred([2, 3, 20, 30], [30, 5, 50, 25], labels=[1, 4]), _pred([10, 10, 40, 40], labels=[7])]
    assert coco_map(predictions, targets, 11) == {"map": pytest.approx(100.0), "map50": pytest.approx(100.0)}


@pytest.mark.parametrize("width, shift, iou, thresholds_passed", [
    (10, 4, 60 / 140, 0),  # intersection 6 x 10 = 60, union 100 + 100 - 60: IoU 0.43, a miss at 0.5
    (20, 4, 160 / 240, 4),  # intersection 16 x 10 = 160, union 200 + 200 - 160: IoU 0.67 passes 0.5 .. 0.65
])
def test_a_shifted_box_scores_by_its_hand_computed_iou(width, shift, iou, thresholds_passed):
    box, moved = [0.0, 0.0, width, 10.0], [shift, 0.0, width + shift, 10.0]
    assert float(box_iou(torch.tensor([box]), torch.tensor([moved]))) == pytest.approx(iou)
    scores = coco_map([_pred(moved)], [_target(box)], 11)
    assert scores["map50"] == pytest.approx(100.0 if iou >= 0.5 else 0.0)
    # mAP@[.5:.95]: the share of the ten IoU thresholds 0.5, 0.55, ..., 0.95 the detection passes
    assert scores["map"] == pytest.approx(100.0 * thresholds_passed / 10)


def test_a_wrong_label_or_no_detection_is_a_miss():
    assert coco_map([_pred([0, 0, 10, 10], labels=[2])], [_target([0, 0, 10, 10], labels=[1])], 11)["map50"] == 0.0
    assert coco_map([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}],
                    [_target([0, 0, 10, 10])], 11) == {"map": 0.0, "map50": 0.0}
    assert math.isnan(coco_map([_pred([0, 0, 1, 1])], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], 11)["map"])


def test_missing_pycocotools_is_one_line_bad_input(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pycocotools(name, *args, **kwargs):
        if name.startswith("pycocotools"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pycocotools)
    with pytest.raises(BadInputError, match=r"pip install 'gfgp\[detection\]'"):
        coco_map([_pred([0, 0, 1, 1])], [_target([0, 0, 1, 1])], 11)


def test_task_for_names_the_tasks_it_has():
    assert task_for("video").name == task_for("quantization").name == "classification"
    assert (task_for("segmentation").primary, task_for("detection").primary) == ("miou", "map")
    with pytest.raises(BadInputError, match="optical flow model's losses"):
        task_for("optical_flow")


def test_gathered_detections_go_back_to_the_validation_order():
    from gfgp_cli.train.data import ShardSampler
    from gfgp_cli.train.tasks import _dataset_order

    for total, world in ((9, 2), (10, 3), (1, 2)):
        parts = [list(ShardSampler(total, world, rank)) for rank in range(world)]  # each rank's indices
        assert _dataset_order(parts) == list(range(total))
    assert _dataset_order([[0, 2], [1, 3, 5, 7]]) == [0, 2, 1, 3, 5, 7]  # shards of other sizes: rank after rank
