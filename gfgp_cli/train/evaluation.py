"""Evaluation: :func:`evaluate` (loss, top-1, top-5 over a loader, summed over ranks) and ``gfgp
eval`` (:func:`evaluate_checkpoint`), with what they share with training and plots: reading a
trained checkpoint (:func:`load_trained`), loading the data a model fits (:func:`prepare_data`)
and the validation loader (:func:`eval_loader`).

Image models take ``Tensor[N, 3, S, S]``; video models (task ``video``: torchvision's r3d_18,
mc3_18, r2plus1d_18, s3d, mvit_v1_b, mvit_v2_s, swin3d_t/s/b) take clips ``Tensor[N, 3, T, S, S]``
and train on clip data (``--data moving-digits``). Both return class logits ``[N, classes]``;
:func:`prepare_data` refuses, in one line, a model given the other kind of data. Segmentation and
detection models take images too, and data with masks or boxes (``--data scenes``, ``voc:DIR``,
``coco:DIR``); their losses and metrics are their task's (:mod:`.tasks`, picked from the spec).

A model whose outputs are not finite (NaN/Inf) is a failure, not a result: :func:`evaluate`
counts such images (``nonfinite``), ``gfgp eval`` then exits 1 naming the tensors that hold
NaN/Inf (:func:`nonfinite_message`), and so does training's validation (the engine).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..checkpoint import load, read_checkpoint
from ..errors import BadInputError, WorkFailedError
from ..spec import ConversionSpec, spec_of
from .config import TrainConfig, check_device_name
from .data import (
    MOVING_DIGITS,
    MOVING_DIGITS_FORM,
    SCENES,
    SCENES_FORM,
    DataBundle,
    ShardSampler,
    collate_readable,
    data_frames,
    data_tasks,
    load_data,
    loader_batches,
    skipped_note,
)
from .distributed import SINGLE_PROCESS, DistInfo, all_reduce_sum
from .metrics import Meters, Progress
from .runtime import amp_dtype, autocast, ignore_sigint, resolve_device, to_device
from .state import trained_image_size
from .tasks import CLASSIFICATION_TASKS, Task, detection_classes, segmentation_classes, task_for

__all__ = ["evaluate", "evaluate_classifier", "evaluate_checkpoint", "load_trained", "prepare_data", "eval_loader", "check_data_kind",
           "example_batch", "nonfinite_tensors", "nonfinite_message"]


def evaluate(model: nn.Module, criterion: nn.Module, data_loader: DataLoader, device: torch.device,
             config: Optional[TrainConfig] = None, info: DistInfo = SINGLE_PROCESS,
             progress: Optional[Progress] = None, task: Optional[Task] = None) -> Dict[str, float]:
    """The validation metrics of ``task`` (default: classification) over ``data_loader``, summed
    over all ranks, with ``images`` (how many) and ``nonfinite`` (how many of them got a NaN/Inf
    score). Classification: loss, top-1 and top-5 accuracy (percent); the other tasks:
    :mod:`.tasks`."""
    task = task if task is not None else Task()
    return task.evaluate(model, criterion, data_loader, device, config, info, progress)


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, criterion: nn.Module, data_loader: DataLoader, device: torch.device,
                        config: Optional[TrainConfig] = None, info: DistInfo = SINGLE_PROCESS,
                        progress: Optional[Progress] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over ``data_loader``, summed over all ranks, with
    ``images`` (how many) and ``nonfinite`` (how many of them got a NaN/Inf score)."""
    model.eval()
    amp = autocast(device, config) if config is not None else contextlib.nullcontext()
    meters = Meters()
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device: no sync per batch
    with loader_batches(data_loader) as batches:
        for i, batch in enumerate(batches):
            if batch is None:  # every image of the batch was unreadable and left out (--skip-bad-images)
                continue
            images, target = batch
            images = to_device(images, device, config)
            target = target.to(device, non_blocking=True)
            with amp:
                output = model(images)
                loss = criterion(output, target)
            output = output.float()
            nonfinite += (~torch.isfinite(output).all(dim=1)).sum()
            meters.update(loss.item(), output, target)
            if progress is not None:
                progress.update(i + 1, images.shape[0] * info.world_size, {})
    totals = all_reduce_sum(torch.cat([meters.totals(), nonfinite.cpu().double().reshape(1)]), info)
    return {**Meters.summary(totals[:4]), "nonfinite": int(totals[4])}


def nonfinite_tensors(model: nn.Module) -> List[str]:
    """Names of the parameters and buffers of ``model`` that hold NaN or Inf."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def nonfinite_message(metrics: Dict[str, Any], model: nn.Module, whose: str, amp: bool) -> str:
    """The one-line failure of an evaluation whose ``metrics`` count images with non-finite
    outputs: how many, and which of ``whose`` ("the checkpoint's") weights hold NaN/Inf."""
    names = nonfinite_tensors(model)
    if names:
        more = f" (and {len(names) - 1} more tensor{'s' if len(names) > 2 else ''})" if len(names) > 1 else ""
        cause = f"{whose} weights hold NaN/Inf in {names[0]}{more}"
    else:
        cause = f"{whose} weights are all finite, so its activations overflow" + (" (try without --amp)" if amp else "")
    return (f"the model's outputs are not finite (NaN/Inf) on {metrics['nonfinite']} of {metrics['images']} "
            f"validation images; {cause}")


def evaluate_checkpoint(checkpoint: str, data: str, *, batch_size: int = 256, image_size: Optional[int] = None,
                        device: str = "auto", workers: int = 0, amp: bool = False, download: bool = False,
                        module: Optional[nn.Module] = None, skip_bad_images: bool = False) -> Dict[str, Any]:
    """``gfgp eval``: the metrics of a checkpoint's model on SPEC's validation set: loss, top-1 and
    top-5 (percent) for a classifier, loss, mIoU and pixel accuracy for a segmentation model,
    mAP@[.5:.95] and mAP@.5 for a detector (:mod:`.tasks`).

    Fails (WorkFailedError, exit 1) when the model's scores are NaN/Inf for even one image.
    ``skip_bad_images``: unreadable images are left out (and counted on stderr, ``skipped_images``).
    """
    _positive_int(batch_size, "--batch-size")
    if image_size is not None:
        _positive_int(image_size, "--image-size")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise BadInputError(f"--workers must be >= 0, got {workers!r}")
    check_device_name(device)
    model, spec, trained_size = load_trained(checkpoint, module=module)
    dev = resolve_device(device, DistInfo())
    model.to(dev)
    bundle, size = prepare_data(model, spec, data, image_size or trained_size, dev, download,
                                skip_bad_images=skip_bad_images)
    config = TrainConfig(checkpoint=str(checkpoint), data=data, out="", amp=amp, image_size=size)
    amp_dtype(dev, config, [])  # the same checks as training (fp16 on the CPU is bad input)
    task = task_for(spec.task, bundle.num_classes)
    loader = eval_loader(bundle.val, batch_size, workers, dev, DistInfo(), collate=task.collate)
    metrics = evaluate(model, nn.CrossEntropyLoss(), loader, dev, config, task=task)
    if metrics["nonfinite"]:
        raise WorkFailedError(nonfinite_message(metrics, model, "the checkpoint's", amp))
    del metrics["nonfinite"]
    skipped = {}
    if skip_bad_images:
        note, count = skipped_note(bundle.val)
        if note is not None:
            from ..console import err

            err.print(note, markup=False)
        skipped = {"skipped_images": count}
    clips = {} if bundle.frames is None else {"frames": bundle.frames}
    return {"checkpoint": str(checkpoint), "data": bundle.name, "task": task.name, "image_size": size, **clips, **metrics,
            **skipped}


def _positive_int(value: Any, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadInputError(f"{flag} must be a positive integer, got {value!r}")


#: Tasks gfgp train and eval handle: those whose models take an image batch (or, ``video``, a
#: batch of clips) and return class logits (docs: "What converts"), segmentation and detection.
TRAINABLE_TASKS = (*CLASSIFICATION_TASKS, "segmentation", "detection")

#: torchvision's video classifiers, named in the errors of a model given the wrong kind of data.
_VIDEO_MODELS = "r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v1_b, mvit_v2_s, swin3d_t"


def load_trained(checkpoint, module: Optional[nn.Module] = None) -> Tuple[nn.Module, ConversionSpec, Optional[int]]:
    """``(model, spec, image_size)`` of a checkpoint; image_size is what a run trained at (None
    for a plain conversion, whose spec may record its own)."""
    data = read_checkpoint(checkpoint)
    size = trained_image_size(data)
    model = load(data, module=module)
    return model, spec_of(model), size


def prepare_data(model: nn.Module, spec: ConversionSpec, data: str, image_size: Optional[int], device: torch.device,
                 download: bool, skip_bad_images: bool = False) -> Tuple[DataBundle, int]:
    """Resolve the image size, load SPEC's data and check the classifier fits its classes (and
    that clips go to a video model, images to an image model). ``skip_bad_images``: see
    :func:`~gfgp_cli.train.data.load_data`."""
    if spec.task not in TRAINABLE_TASKS:
        raise BadInputError(
            f"{spec.model_name} is a {spec.task.replace('_', ' ')} model; gfgp train and eval handle classification "
            "(quantizable float models and video classifiers included), segmentation and detection models for now: "
            "the losses and metrics of other tasks are not built yet"
        )
    frames = data_frames(data, spec.frames)  # clips follow the model's clip length unless SPEC sets frames=T
    check_data_kind(spec, data, frames)
    size = image_size or spec.image_size
    outputs = _num_outputs(model, spec.task, size, device, frames)
    bundle = load_data(data, size, num_classes=outputs, download=download, frames=spec.frames,
                       skip_bad_images=skip_bad_images, task=spec.task)
    if outputs is not None and bundle.num_classes != outputs:
        raise BadInputError(
            f"the model has {outputs} outputs but {bundle.name} has {bundle.num_classes} classes; convert it with "
            f"`gfgp convert MODEL --num-classes {bundle.num_classes} --out ...`"
        )
    return bundle, size


def eval_loader(dataset, batch_size: int, workers: int, device: torch.device, info: DistInfo,
                collate: Callable = default_collate) -> DataLoader:
    """This rank's shard of ``dataset`` in order, batched by ``collate`` (a task's). Its own
    generator: iterating it draws nothing from the global RNG, so evaluating never changes the
    training's random stream. Images left out by --skip-bad-images are dropped from their batch
    (a batch of none is None)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.world_size, info.rank),
                      num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator(),
                      worker_init_fn=ignore_sigint, collate_fn=functools.partial(collate_readable, collate=collate))


def check_data_kind(spec: ConversionSpec, data: str, frames: Optional[int]) -> None:
    """Bad input (one line) for a video model given image data, or an image model given clips
    (``frames``: the clip length of ``data``, None for images)."""
    if spec.task == "video" and frames is None:
        raise BadInputError(
            f"{spec.model_name} is a video model (it takes clips, Tensor[N, 3, T, H, W]) but --data {data} holds images; "
            f"train and evaluate it on clips: --data {MOVING_DIGITS} ({MOVING_DIGITS_FORM})"
        )
    if spec.task != "video" and frames is not None:
        raise BadInputError(
            f"--data {data} holds video clips (Tensor[N, 3, T, H, W]) but {spec.model_name} is an image model "
            f"({spec.task}, it takes Tensor[N, 3, H, W]); give it image data, or convert a video model "
            f"({_VIDEO_MODELS}, ...) for the clips"
        )
    serves = data_tasks(data)
    if spec.task in ("segmentation", "detection") and spec.task not in serves and "classification" in serves:
        raise BadInputError(
            f"{spec.model_name} is a {spec.task} model but --data {data} holds class labels, not "
            f"{'masks' if spec.task == 'segmentation' else 'boxes'}; train and evaluate it on --data {SCENES} "
            f"({SCENES_FORM}: digit scenes with masks and boxes) or your own "
            f"{'voc:DIR (VOC layout)' if spec.task == 'segmentation' else 'coco:DIR (COCO layout)'}"
        )
    if spec.task in ("segmentation", "detection") and spec.task not in serves:
        raise BadInputError(f"{spec.model_name} is a {spec.task} model but --data {data} holds {serves[0]} targets; "
                            f"give it {spec.task} data (--data {SCENES}, or your own in the "
                            f"{'VOC (voc:DIR)' if spec.task == 'segmentation' else 'COCO (coco:DIR)'} layout)")
    if spec.task in CLASSIFICATION_TASKS and "classification" not in serves and frames is None:
        raise BadInputError(
            f"--data {data} holds {' and '.join(serves)} targets but {spec.model_name} is a classifier; give it "
            f"class-labelled data, or convert a {' or '.join(serves)} model for it"
        )


def example_batch(image_size: int, device: torch.device, frames: Optional[int] = None) -> torch.Tensor:
    """Two blank inputs: images ``Tensor[2, 3, S, S]``, or clips ``Tensor[2, 3, frames, S, S]``."""
    shape = (2, 3, image_size, image_size) if frames is None else (2, 3, frames, image_size, image_size)
    return torch.zeros(shape, device=device)


def _num_outputs(model: nn.Module, task: str, image_size: int, device: torch.device,
                 frames: Optional[int] = None) -> Optional[int]:
    """Number of classes the model predicts, from one forward pass of two blank images (or
    clips of ``frames`` frames); a detector's from its head (None where it has none gfgp knows)."""
    if task == "detection":
        return detection_classes(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if task == "segmentation":
                return segmentation_classes(model, example_batch(image_size, device))
            out = model(example_batch(image_size, device, frames))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        # (torchvision's MViT asserts its input's shape; S3D's pooling fails on small clips)
        what = f"{image_size}x{image_size} images" if frames is None else f"{frames}-frame {image_size}x{image_size} clips"
        fix = "choose another --image-size" + ("" if frames is None else
                                                f" (or another clip length: --data {MOVING_DIGITS}:SEED:frames=T)")
        raise BadInputError(f"the model does not run on {what} ({' '.join(str(e).split())[:160]}); {fix}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInputError(f"the model returns {shape}, not class scores [N, classes]; gfgp train needs a classifier")
    return int(out.shape[1])
