"""The optimizer and the learning-rate schedule of a run: SGD over :func:`param_groups`, with the
recipe's per-epoch schedule (:func:`~gfgp_cli.train.config.lr_factor`) as a LambdaLR.

``gfgp train`` and ``gfgp study`` both build theirs with :func:`build_optimizer`, so a recipe
means the same optimisation in both.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..spec import ConversionSpec
from .config import TrainConfig, lr_factor

__all__ = ["param_groups", "build_optimizer"]


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
                    notes: Optional[List[str]] = None) -> Tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` of ``config``'s recipe for ``model``; the scheduler steps once per
    epoch. Notes about the parameter groups go to ``notes``."""
    notes = notes if notes is not None else []
    optimizer = torch.optim.SGD(param_groups(model, spec, config, notes), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(config, e))
    return optimizer, scheduler
