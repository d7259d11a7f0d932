"""Evaluation: :func:`evaluate` (loss, top-1, top-5 over a loader, summed over ranks) and ``gfgp
eval`` (:func:`evaluate_checkpoint`), with what they share with training and plots: reading a
trained checkpoint (:func:`load_trained`), loading the data a model fits (:func:`prepare_data`)
and the validation loader (:func:`eval_loader`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import load, read_checkpoint
from ..errors import BadInputError
from ..spec import ConversionSpec, spec_of
from .config import TrainConfig, check_device_name
from .data import DataBundle, ShardSampler, load_data
from .distributed import SINGLE_PROCESS, DistInfo, all_reduce_sum
from .metrics import Meters, Progress
from .runtime import amp_dtype, autocast, ignore_sigint, resolve_device, to_device
from .state import trained_image_size

__all__ = ["evaluate", "evaluate_checkpoint", "load_trained", "prepare_data", "eval_loader"]


@torch.inference_mode()
def evaluate(model: nn.Module, criterion: nn.Module, data_loader: DataLoader, device: torch.device,
             config: Optional[TrainConfig] = None, info: DistInfo = SINGLE_PROCESS,
             progress: Optional[Progress] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over ``data_loader``, summed over all ranks."""
    model.eval()
    amp = autocast(device, config) if config is not None else contextlib.nullcontext()
    meters = Meters()
    for i, (images, target) in enumerate(data_loader):
        images = to_device(images, device, config)
        target = target.to(device, non_blocking=True)
        with amp:
            output = model(images)
            loss = criterion(output, target)
        meters.update(loss.item(), output.float(), target)
        if progress is not None:
            progress.update(i + 1, images.shape[0] * info.world_size, {})
    return Meters.summary(all_reduce_sum(meters.totals(), info))


def evaluate_checkpoint(checkpoint: str, data: str, *, batch_size: int = 256, image_size: Optional[int] = None,
                        device: str = "auto", workers: int = 0, amp: bool = False, download: bool = False,
                        module: Optional[nn.Module] = None) -> Dict[str, Any]:
    """``gfgp eval``: loss, top-1 and top-5 (percent) of a checkpoint's model on SPEC's validation set."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"--batch-size must be a positive integer, got {batch_size!r}")
    check_device_name(device)
    model, spec, trained_size = load_trained(checkpoint, module=module)
    dev = resolve_device(device, DistInfo())
    model.to(dev)
    bundle, size = prepare_data(model, spec, data, image_size or trained_size, dev, download)
    config = TrainConfig(checkpoint=str(checkpoint), data=data, out="", amp=amp, image_size=size)
    amp_dtype(dev, config, [])  # the same checks as training (fp16 on the CPU is bad input)
    loader = eval_loader(bundle.val, batch_size, workers, dev, DistInfo())
    metrics = evaluate(model, nn.CrossEntropyLoss(), loader, dev, config)
    return {"checkpoint": str(checkpoint), "data": bundle.name, "image_size": size, **metrics}


#: Tasks whose models take an image batch and return class logits (docs: "What converts").
TRAINABLE_TASKS = ("classification", "quantization")


def load_trained(checkpoint, module: Optional[nn.Module] = None) -> Tuple[nn.Module, ConversionSpec, Optional[int]]:
    """``(model, spec, image_size)`` of a checkpoint; image_size is what a run trained at (None
    for a plain conversion, whose spec may record its own)."""
    data = read_checkpoint(checkpoint)
    size = trained_image_size(data)
    model = load(data, module=module)
    return model, spec_of(model), size


def prepare_data(model: nn.Module, spec: ConversionSpec, data: str, image_size: Optional[int], device: torch.device,
                 download: bool) -> Tuple[DataBundle, int]:
    """Resolve the image size, load SPEC's data and check the classifier fits its classes."""
    if spec.task not in TRAINABLE_TASKS:
        raise BadInputError(
            f"{spec.model_name} is a {spec.task.replace('_', ' ')} model; gfgp train and eval handle classification models "
            "(quantizable float models included) for now: the losses and metrics of other tasks are not built yet"
        )
    size = image_size or spec.image_size
    outputs = _num_outputs(model, size, device)
    bundle = load_data(data, size, num_classes=outputs, download=download)
    if bundle.num_classes != outputs:
        raise BadInputError(
            f"the model has {outputs} outputs but {bundle.name} has {bundle.num_classes} classes; convert it with "
            f"`gfgp convert MODEL --num-classes {bundle.num_classes} --out ...`"
        )
    return bundle, size


def eval_loader(dataset, batch_size: int, workers: int, device: torch.device, info: DistInfo) -> DataLoader:
    """This rank's shard of ``dataset`` in order. Its own generator: iterating it draws nothing
    from the global RNG, so evaluating never changes the training's random stream."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.world_size, info.rank),
                      num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator(),
                      worker_init_fn=ignore_sigint)


def _num_outputs(model: nn.Module, image_size: int, device: torch.device) -> int:
    """Number of classes the model predicts, from one forward pass of two blank images."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, image_size, image_size, device=device))
    except (RuntimeError, ValueError) as e:
        raise BadInputError(
            f"the model does not run on {image_size}x{image_size} images ({' '.join(str(e).split())[:160]}); "
            "choose another --image-size"
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInputError(f"the model returns {shape}, not class scores [N, classes]; gfgp train needs a classifier")
    return int(out.shape[1])
