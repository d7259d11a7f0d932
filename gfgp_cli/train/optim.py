"""The optimisation of a run, from its :class:`~gfgp_cli.train.config.TrainConfig`:

- :func:`build_optimizer`: SGD (momentum) or AdamW over :func:`param_groups`, with the per-epoch
  schedule of :func:`~gfgp_cli.train.config.lr_factor`: a LambdaLR of
  :func:`~gfgp_cli.train.config.schedule_factor`, after ``warmup_epochs`` a torch LinearLR warm-up
  (the two chained by SequentialLR);
- :func:`build_criterion`: cross-entropy with ``label_smoothing`` (it takes class indices or the
  soft targets of MixUp/CutMix);
- :func:`build_ema`: the exponential moving average of the weights (``ema_decay``), a torch
  AveragedModel;
- :func:`build_mix`: MixUp and/or CutMix of the training micro-batches.

``gfgp train`` and ``gfgp study`` both build theirs with :func:`build_optimizer`, so a recipe
means the same optimisation in both.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..spec import ConversionSpec
from .config import TrainConfig, schedule_factor

__all__ = ["param_groups", "build_optimizer", "build_criterion", "build_ema", "build_mix", "Mix"]

#: ``(images, labels[N]) -> (mixed images, soft targets Tensor[N, classes])``
Mix = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def param_groups(model: nn.Module, spec: Optional[ConversionSpec], config: TrainConfig,
                 notes: List[str]) -> List[Dict[str, Any]]:
    """One group, or for ``backbone_lr_scale != 1`` the new layers at lr and the reused layers at
    lr * backbone_lr_scale. New layers: the parameters the conversion spec records as not coming
    from the pretrained weights (new pooling layers, a classifier rebuilt for other classes);
    without that record (or without a spec), the pooling layers."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.backbone_lr_scale == 1.0:
        return [{"params": params, "lr": config.lr, "name": "all"}]
    from ..nn import GFGPPool2d, MaxEntPool2d

    # Read only here: with one group the spec's record does not matter.
    recorded = spec.new_parameters if spec is not None else None
    if recorded is not None:
        named = dict(model.named_parameters())
        new_ids = {id(named[k]) for k in recorded if k in named}
    else:
        new_ids = {id(p) for m in model.modules() if isinstance(m, (GFGPPool2d, MaxEntPool2d)) for p in m.parameters()}
    new = [p for p in params if id(p) in new_ids]
    reused = [p for p in params if id(p) not in new_ids]
    notes.append(f"{len(new)} new pooling tensors at lr {config.lr:g}, {len(reused)} reused tensors at lr "
                 f"{config.lr * config.backbone_lr_scale:g}")
    groups = [{"params": new, "lr": config.lr, "name": "new"},
              {"params": reused, "lr": config.lr * config.backbone_lr_scale, "name": "reused"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig, spec: Optional[ConversionSpec] = None,
                    notes: Optional[List[str]] = None) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` of ``config`` for ``model``; the scheduler steps once per epoch
    (the lr of epoch e is ``lr * lr_factor(config, e)``). Notes about the parameter groups go to
    ``notes``."""
    notes = notes if notes is not None else []
    groups = param_groups(model, spec, config, notes)
    if config.opt == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: schedule_factor(config, e))
    if not config.warmup_epochs:
        return optimizer, schedule
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=config.warmup_lr_ratio, end_factor=1.0,
                                               total_iters=config.warmup_epochs)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, schedule], [config.warmup_epochs])


def build_criterion(config: TrainConfig) -> nn.Module:
    """The training loss: cross-entropy with ``config.label_smoothing``; it takes class indices
    ``Tensor[N]`` or soft targets ``Tensor[N, classes]`` (MixUp/CutMix)."""
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def build_ema(model: nn.Module, config: TrainConfig) -> Optional[AveragedModel]:
    """The exponential moving average of ``model`` (None for ``ema_decay`` 0): a copy of it whose
    parameters and buffers (BatchNorm statistics too) follow ``ema = d * ema + (1 - d) * w`` after
    every optimizer step (``update_parameters``). It starts at ``model``'s current weights.

    Build it from the unwrapped model on its device, after SyncBatchNorm and before DDP/compile.
    Integer buffers (``num_batches_tracked``) are averaged too, and truncated.
    """
    if not config.ema_decay:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    ema.requires_grad_(False)
    ema.update_parameters(model)  # the first update copies: the average starts at the current weights
    return ema


def build_mix(config: TrainConfig, num_classes: int) -> Optional[Mix]:
    """MixUp (``config.mixup`` alpha), CutMix (``config.cutmix``) or, with both, one of the two
    chosen at random for each micro-batch (torchvision.transforms.v2); None when both are 0.

    It returns the mixed batch and soft targets ``Tensor[N, classes]`` (each row sums to 1). Its
    randomness comes from the global torch generator, which checkpoints save and resume restores.
    Clips ``Tensor[N, C, T, H, W]`` are mixed as videos (the same box in every frame).
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    mixes = []
    if config.mixup:
        mixes.append(v2.MixUp(alpha=config.mixup, num_classes=num_classes))
    if config.cutmix:
        mixes.append(v2.CutMix(alpha=config.cutmix, num_classes=num_classes))
    if not mixes:
        return None
    transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def mix(images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = tv_tensors.Video(images) if images.dim() == 5 else images
        mixed, soft = transform(batch, labels)
        return mixed.as_subclass(torch.Tensor), soft

    return mix
