"""What the training loop and ``gfgp eval`` do differently for each torchvision task.

A :class:`Task` says how a batch goes to the device, what the training loss is, what an epoch
sums up (its meters), how a validation set is measured and what the metrics rows hold. The
checkpoint's spec picks it (:func:`task_for`):

- classification (also quantizable float models and video classifiers): cross-entropy on the
  class logits; loss, top-1 and top-5 (:class:`~gfgp_cli.train.metrics.Meters`);
- segmentation (torchvision's FCN, DeepLabV3, LR-ASPP: ``{"out": Tensor[N, C, H, W], "aux": ...}``):
  cross-entropy on ``out`` plus 0.5 x cross-entropy on ``aux`` where the model has that head
  (torchvision's reference recipe), pixels labelled 255 ignored; metrics pixel accuracy and mIoU
  from a confusion matrix (:class:`SegmentationMeters`);
- detection (Faster R-CNN, RetinaNet, SSD, FCOS, ... taking a list of images and, in training,
  a list of ``{"boxes", "labels"}`` targets): the sum of the loss dict the model returns in train
  mode; COCO mAP@[.5:.95] and mAP@.5 computed by pycocotools (:func:`coco_map`).

Every metric is in percent, as top-1 is. Sums that several processes reduce are float64 tensors
(:meth:`totals`), so DDP and resume treat every task alike.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..errors import BadInputError
from .config import TrainConfig
from .data import loader_batches
from .distributed import DistInfo, all_gather_object, all_reduce_sum
from .metrics import Meters, Progress
from .optim import build_criterion
from .runtime import autocast, to_device

__all__ = ["Task", "Classification", "Segmentation", "Detection", "task_for", "task_of_row", "SegmentationMeters",
           "DetectionMeters", "SegmentationLoss", "segmentation_scores", "confusion_matrix", "coco_map",
           "collate_detection", "detection_classes", "segmentation_classes", "AUX_WEIGHT", "IGNORE_INDEX",
           "CLASSIFICATION_TASKS"]

#: Tasks whose models return class logits ``[N, classes]`` (the classification loop).
CLASSIFICATION_TASKS = ("classification", "quantization", "video")
AUX_WEIGHT = 0.5  # weight of a segmentation model's auxiliary head in the loss (torchvision's reference)
IGNORE_INDEX = 255  # mask value of unlabelled pixels


def collate_detection(batch):
    """A detection batch: ``(list of Tensor[3, H, W], list of {"boxes", "labels"})`` (images may
    differ in size; the model batches them itself)."""
    return [sample[0] for sample in batch], [sample[1] for sample in batch]


class Task:
    """Classification, and the interface of every task (see the module docstring)."""

    name = "classification"
    #: The validation metric best.pt follows (higher is better), a key of :meth:`evaluate`'s result.
    primary = "top1"
    #: The metrics of a training epoch and of a validation, in the rows' order.
    train_metrics: Tuple[str, ...] = ("loss", "top1", "top5")
    val_metrics: Tuple[str, ...] = ("loss", "top1", "top5")
    #: What :meth:`evaluate` reports, as (key, column header) for ``gfgp eval``.
    eval_columns: Tuple[Tuple[str, str], ...] = (("loss", "loss"), ("top1", "top-1 (%)"), ("top5", "top-5 (%)"))

    def __init__(self, num_classes: int = 0) -> None:
        self.num_classes = num_classes

    # -- checks and data ----------------------------------------------------------------------

    def check(self, config: TrainConfig) -> None:
        """Bad input for a training option the task cannot use."""

    @property
    def collate(self) -> Callable:
        return default_collate

    def to_device(self, images, target, device: torch.device, config: Optional[TrainConfig]):
        return to_device(images, device, config), target.to(device, non_blocking=True)

    @staticmethod
    def batch_len(images) -> int:
        return len(images)

    def eval_batches(self, data_loader, device, config, info, progress):
        """The validation batches ``(images, target)`` on ``device`` (unreadable ones skipped),
        ``progress`` advanced after each one is used."""
        with loader_batches(data_loader) as batches:
            for i, batch in enumerate(batches):
                if batch is None:
                    continue
                images, target = self.to_device(*batch, device, config)
                yield images, target
                if progress is not None:
                    progress.update(i + 1, self.batch_len(images) * info.world_size, {})

    # -- training -----------------------------------------------------------------------------

    def criterion(self, config: Optional[TrainConfig]) -> nn.Module:
        """The training loss (``config`` None: the plain one, for measurements)."""
        return build_criterion(config) if config is not None else nn.CrossEntropyLoss()

    def forward(self, model: nn.Module, images, target, criterion: nn.Module) -> Tuple[torch.Tensor, Any]:
        """``(loss, output)`` of a training forward pass (``output`` for the meters)."""
        output = model(images)
        return criterion(output, target), output

    def meters(self) -> Meters:
        return Meters()

    # -- evaluation and rows ------------------------------------------------------------------

    def evaluate(self, model: nn.Module, criterion: nn.Module, data_loader: DataLoader, device: torch.device,
                 config: Optional[TrainConfig], info: DistInfo, progress: Optional[Progress]) -> Dict[str, float]:
        from .evaluation import evaluate_classifier

        return evaluate_classifier(model, criterion, data_loader, device, config, info, progress)

    def columns(self, ema: bool) -> Tuple[str, ...]:
        """metrics.csv's columns."""
        train = tuple(f"train_{k}" for k in self.train_metrics)
        val = tuple(f"val_{k}" for k in self.val_metrics)
        ema_columns = tuple(f"ema_val_{k}" for k in self.val_metrics) if ema else ()
        return ("epoch", "lr", *train, *val, "images_per_s", "epoch_time_s", *ema_columns)

    def row(self, train: Dict[str, float], val: Dict[str, float]) -> Dict[str, float]:
        """The metrics of an epoch's row (train and validation)."""
        return {**{f"train_{k}": train[k] for k in self.train_metrics}, **{f"val_{k}": val[k] for k in self.val_metrics}}

    def ema_row(self, ema: Dict[str, float]) -> Dict[str, float]:
        return {f"ema_val_{k}": ema[k] for k in self.val_metrics}

    def epoch_text(self, row: Dict[str, Any]) -> str:
        """The metrics part of the epoch's line on stderr."""
        ema = f"  ema top1 {row['ema_val_top1']:.2f}%" if "ema_val_top1" in row else ""
        return (f"train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f} "
                f"top1 {row['val_top1']:.2f}% top5 {row['val_top5']:.2f}%{ema}")

    def summary_rows(self, final: Dict[str, Any]) -> List[Tuple[str, str]]:
        """The final epoch's rows of ``gfgp train``'s table."""
        return [("final val loss", f"{final['val_loss']:.4f}"), ("final val top-1 (%)", _pct(final["val_top1"])),
                ("final val top-5 (%)", _pct(final["val_top5"]))]

    @property
    def primary_label(self) -> str:
        return dict(self.eval_columns)[self.primary]


Classification = Task


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- segmentation ----------------------------------------------------------------------------------


def segmentation_scores(confusion: torch.Tensor) -> Dict[str, float]:
    """Pixel accuracy and mIoU (percent) of a confusion matrix ``Tensor[C, C]`` (rows: true class,
    columns: predicted): accuracy = trace / total; IoU_c = TP_c / (TP_c + FP_c + FN_c), and mIoU
    their mean over the classes present in the labels or the predictions (others are 0 / 0)."""
    cm = confusion.double()
    total = cm.sum()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"pixel_acc": float(100.0 * tp.sum() / total) if total > 0 else math.nan,
            "miou": float(100.0 * iou.mean()) if present.any() else math.nan}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Tensor[C, C]`` int64 counts of (true, predicted) class pairs over the pixels whose
    target is a class (``IGNORE_INDEX`` and anything outside 0..C-1 are left out)."""
    keep = (target >= 0) & (target < num_classes)
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


@dataclass
class SegmentationMeters:
    """Running sums of a segmentation epoch: loss (per image) and the confusion matrix."""

    num_classes: int
    loss_sum: float = 0.0
    count: int = 0
    confusion: torch.Tensor = field(default=None)  # type: ignore[assignment]  # Tensor[C, C] int64

    def __post_init__(self) -> None:
        if self.confusion is None:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, loss: float, output: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        self.loss_sum += loss * n
        self.count += n
        self.confusion += confusion_matrix(output.detach().argmax(1), target, self.num_classes)

    def totals(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.loss_sum, self.count], dtype=torch.float64),
                          self.confusion.flatten().double()])

    def summary(self, totals: torch.Tensor) -> Dict[str, float]:
        loss_sum, n = totals[:2].tolist()
        scores = segmentation_scores(totals[2:].reshape(self.num_classes, self.num_classes))
        return {"loss": loss_sum / max(n, 1.0), **scores, "images": int(n)}

    def running(self) -> Dict[str, float]:
        return {"loss": self.loss_sum / max(self.count, 1), "pixel_acc": segmentation_scores(self.confusion)["pixel_acc"]}

    def state(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "loss_sum": self.loss_sum, "count": self.count,
                "confusion": self.confusion.clone()}

    def restored(self, states: List[Dict[str, Any]]) -> "SegmentationMeters":
        total = SegmentationMeters(self.num_classes)
        for m in states:
            total.loss_sum += m["loss_sum"]
            total.count += m["count"]
            total.confusion += m["confusion"]
        return total


class SegmentationLoss(nn.Module):
    """Cross-entropy on ``out`` plus ``AUX_WEIGHT`` x cross-entropy on ``aux`` when the model has
    that head; pixels labelled ``IGNORE_INDEX`` count in neither."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)

    def forward(self, output: Dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(output["out"].float(), target)
        if "aux" in output:
            loss = loss + AUX_WEIGHT * self.ce(output["aux"].float(), target)
        return loss


class Segmentation(Task):
    name = "segmentation"
    primary = "miou"
    train_metrics = ("loss", "pixel_acc", "miou")
    val_metrics = ("loss", "pixel_acc", "miou")
    eval_columns = (("loss", "loss"), ("miou", "mIoU (%)"), ("pixel_acc", "pixel acc (%)"))

    def check(self, config: TrainConfig) -> None:
        _no_mix(self.name, config)

    def criterion(self, config: Optional[TrainConfig]) -> nn.Module:
        return SegmentationLoss(config.label_smoothing if config is not None else 0.0)

    def forward(self, model, images, target, criterion):
        output = _segmentation_output(model(images))
        return criterion(output, target), output["out"]

    def meters(self) -> SegmentationMeters:  # type: ignore[override]
        return SegmentationMeters(self.num_classes)

    @torch.inference_mode()
    def evaluate(self, model, criterion, data_loader, device, config, info, progress):
        """Loss, pixel accuracy and mIoU over ``data_loader``, summed over all ranks, with ``images``
        and ``nonfinite`` (images with a NaN/Inf score). The loss is the mean over the images of
        each image's mean cross-entropy of ``out`` over its labelled pixels (ignored ones left
        out), so it does not depend on how the images are batched or sharded."""
        model.eval()
        ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
        meters = SegmentationMeters(self.num_classes)
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        amp = autocast(device, config)
        for images, target in self.eval_batches(data_loader, device, config, info, progress):
            with amp:
                out = _segmentation_output(model(images))["out"]
            out = out.float()
            labelled = (target != IGNORE_INDEX).flatten(1).sum(1).clamp(min=1)
            loss = (ce(out, target).flatten(1).sum(1) / labelled).mean()  # per image, then over the batch
            nonfinite += (~torch.isfinite(out).flatten(1).all(dim=1)).sum()
            meters.update(loss.item() if torch.isfinite(loss) else math.inf, out, target)
        totals = all_reduce_sum(torch.cat([meters.totals(), nonfinite.cpu().double().reshape(1)]), info)
        return {**meters.summary(totals[:-1]), "nonfinite": int(totals[-1])}

    def epoch_text(self, row):
        ema = f"  ema mIoU {row['ema_val_miou']:.2f}%" if "ema_val_miou" in row else ""
        return (f"train loss {row['train_loss']:.4f} mIoU {row['train_miou']:.2f}%  val loss {row['val_loss']:.4f} "
                f"mIoU {row['val_miou']:.2f}% pixel acc {row['val_pixel_acc']:.2f}%{ema}")

    def summary_rows(self, final):
        return [("final val loss", f"{final['val_loss']:.4f}"), ("final val mIoU (%)", _pct(final["val_miou"])),
                ("final val pixel acc (%)", _pct(final["val_pixel_acc"]))]


def _segmentation_output(output) -> Dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"out": output}
    if isinstance(output, dict) and isinstance(output.get("out"), torch.Tensor):
        return output
    raise BadInputError(f"the model returns {type(output).__name__}, not segmentation scores "
                        "({'out': Tensor[N, classes, H, W]}); gfgp train needs a torchvision segmentation model")


def _no_mix(task: str, config: TrainConfig) -> None:
    if config.mixup or config.cutmix:
        flag = "--mixup" if config.mixup else "--cutmix"
        raise BadInputError(f"{flag} mixes class labels, which a {task} model does not have; drop {flag}")
    if getattr(config, "activation_checkpointing", False):
        raise BadInputError(f"--activation-checkpointing splits classifiers only for now; drop it for a {task} model")


# --- detection -------------------------------------------------------------------------------------


@dataclass
class DetectionMeters:
    """Running sums of a detection epoch: the loss (the model's loss dict, summed) per image."""

    loss_sum: float = 0.0
    count: int = 0

    def update(self, loss: float, output: Any, target: Sequence[Dict[str, torch.Tensor]]) -> None:
        self.loss_sum += loss * len(target)
        self.count += len(target)

    def totals(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.count], dtype=torch.float64)

    def summary(self, totals: torch.Tensor) -> Dict[str, float]:
        loss_sum, n = totals.tolist()
        return {"loss": loss_sum / max(n, 1.0), "images": int(n)}

    def running(self) -> Dict[str, float]:
        return {"loss": self.loss_sum / max(self.count, 1)}

    def state(self) -> Dict[str, Any]:
        return {"loss_sum": self.loss_sum, "count": self.count}

    def restored(self, states: List[Dict[str, Any]]) -> "DetectionMeters":
        return DetectionMeters(sum(m["loss_sum"] for m in states), sum(m["count"] for m in states))


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise BadInputError("detection metrics need pycocotools: pip install 'gfgp[detection]'") from None
    return COCO, COCOeval


def coco_map(predictions: Sequence[Dict[str, torch.Tensor]], targets: Sequence[Dict[str, torch.Tensor]],
             num_classes: int) -> Dict[str, float]:
    """COCO box mAP@[.5:.95] and mAP@.5 (percent) of ``predictions`` (per image: ``boxes``
    Tensor[D, 4] (x1, y1, x2, y2), ``scores``, ``labels``) against ``targets`` (per image: ``boxes``,
    ``labels``), computed by pycocotools' COCOeval (its stats[0] and stats[1]: all areas, up to 100
    detections per image). Classes 1..num_classes-1 (0 is the background)."""
    COCO, COCOeval = _pycocotools()
    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(predictions, targets)):
        images.append({"id": image_id})
        for box, label in zip(_xywh(target["boxes"]), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    if not annotations:
        return {"map": math.nan, "map50": math.nan}
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in range(1, num_classes)]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"map": max(float(stats[0]), 0.0) * 100.0, "map50": max(float(stats[1]), 0.0) * 100.0}


def _xywh(boxes: torch.Tensor) -> List[List[float]]:
    b = boxes.detach().double().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist() if len(b) else []


def _dataset_order(parts: List[List[Any]]) -> List[Any]:
    """Every rank's items in the validation set's order: rank r held items r, r + W, r + 2W, ...
    (the evaluation's ShardSampler), so the COCO evaluation numbers the images as one process does
    (pycocotools breaks score ties by image order). Shards of other sizes (images left out by
    --skip-bad-images) are joined rank after rank."""
    world, total = len(parts), sum(len(p) for p in parts)
    if any(len(p) != len(range(r, total, world)) for r, p in enumerate(parts)):
        return [item for part in parts for item in part]
    return [parts[i % world][i // world] for i in range(total)]


class Detection(Task):
    name = "detection"
    primary = "map"
    train_metrics = ("loss",)
    val_metrics = ("map", "map50")
    eval_columns = (("map", "mAP@[.5:.95] (%)"), ("map50", "mAP@.5 (%)"))

    def check(self, config: TrainConfig) -> None:
        _no_mix(self.name, config)
        if config.label_smoothing:
            raise BadInputError("--label-smoothing applies to cross-entropy on class labels; a detection model "
                                "trains with its own losses: drop --label-smoothing")
        _pycocotools()  # its validation needs them: say so before the first epoch, not after it

    @property
    def collate(self) -> Callable:
        return collate_detection

    def to_device(self, images, target, device, config):
        return ([to_device(x, device, config) for x in images],
                [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in target])

    def criterion(self, config):
        return nn.Identity()  # unused: the model computes its losses

    def forward(self, model, images, target, criterion):
        losses = model(images, target)
        if not isinstance(losses, dict):
            raise BadInputError(f"the model returns {type(losses).__name__} in train mode, not a dict of losses; "
                                "gfgp train needs a torchvision detection model")
        return sum(losses.values()), None

    def meters(self) -> DetectionMeters:  # type: ignore[override]
        return DetectionMeters()

    @torch.inference_mode()
    def evaluate(self, model, criterion, data_loader, device, config, info, progress):
        """COCO mAP@[.5:.95] and mAP@.5 (percent) over ``data_loader`` (every rank's predictions
        gathered), with ``images`` and ``nonfinite`` (images with a NaN/Inf box or score)."""
        model.eval()
        amp = autocast(device, config)
        predictions: List[Dict[str, torch.Tensor]] = []
        targets: List[Dict[str, torch.Tensor]] = []
        nonfinite = 0
        for images, target in self.eval_batches(data_loader, device, config, info, progress):
            with amp:
                output = model(images)
            for pred, t in zip(output, target):
                pred = {k: pred[k].detach().float().cpu() for k in ("boxes", "scores", "labels")}
                nonfinite += int(not (torch.isfinite(pred["boxes"]).all() and torch.isfinite(pred["scores"]).all()))
                predictions.append(pred)
                targets.append({k: t[k].cpu() for k in ("boxes", "labels")})
        gathered = all_gather_object((predictions, targets, nonfinite), info)
        predictions = _dataset_order([part[0] for part in gathered])
        targets = _dataset_order([part[1] for part in gathered])
        bad = sum(part[2] for part in gathered)
        scores = coco_map(predictions, targets, self.num_classes) if not bad else {"map": math.nan, "map50": math.nan}
        return {**scores, "images": len(targets), "nonfinite": bad}

    def epoch_text(self, row):
        ema = f"  ema mAP {row['ema_val_map']:.2f}%" if "ema_val_map" in row else ""
        return f"train loss {row['train_loss']:.4f}  val mAP {row['val_map']:.2f}% mAP@.5 {row['val_map50']:.2f}%{ema}"

    def summary_rows(self, final):
        return [("final train loss", f"{final['train_loss']:.4f}"),
                ("final val mAP@[.5:.95] (%)", _pct(final["val_map"])), ("final val mAP@.5 (%)", _pct(final["val_map50"]))]


_TASKS = {"segmentation": Segmentation, "detection": Detection}


def task_for(name: str, num_classes: int = 0) -> Task:
    """The :class:`Task` of a spec's ``task`` (classification for the classifier tasks)."""
    if name in CLASSIFICATION_TASKS:
        return Task(num_classes)
    if name not in _TASKS:
        raise BadInputError(f"gfgp train and eval handle classification, segmentation and detection models; a "
                            f"{name.replace('_', ' ')} model's losses and metrics are not built yet")
    return _TASKS[name](num_classes)


def task_of_row(row: Dict[str, Any]) -> Task:
    """The task whose metrics a metrics row holds (``gfgp plot`` of any run)."""
    for cls in (Segmentation, Detection):
        if f"val_{cls.primary}" in row:
            return cls()
    return Task()


def detection_classes(model: nn.Module) -> Optional[int]:
    """Classes (background included) a torchvision detection model predicts, None when unknown."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "cls_score"):
        return int(predictor.cls_score.out_features)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is not None and hasattr(head, "num_classes"):
        return int(head.num_classes)
    return None


def segmentation_classes(model: nn.Module, images: torch.Tensor) -> int:
    """Classes a segmentation model scores, from one forward pass of ``images`` (eval mode)."""
    return int(_segmentation_output(model(images))["out"].shape[1])

