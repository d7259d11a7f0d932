"""``gfgp bench model``: a training step of a converted model against the original, side by side.

Both models are built the same way (torchvision, ``weights=None``), put in training mode on the
chosen device with an SGD optimizer (momentum 0.9, as the paper's recipes), and timed
interleaved (:func:`~gfgp_cli.bench.timing.interleaved_medians`) on one random batch:
``zero_grad; cross_entropy(model(x), y).backward(); step``. MACs are counted for one image with
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2; convolutions and matmuls, the pooling op
itself is not counted). The interesting number is time ratio / MACs ratio: how much the
converted model costs beyond the convolutions it runs at full resolution.

A third row trains the converted model with ``--activation-checkpointing`` (its full-resolution
stage recomputed in the backward pass, :mod:`gfgp_cli.train.recompute`). Every row also reports
the peak memory of a forward+backward (:func:`gfgp_cli.train.memory.step_growth`: on CUDA the
peak allocated, on the CPU the growth of the process's peak resident memory; the largest of
three measurements, interleaved, since memory the process already holds and reuses can only
make a measurement smaller).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .timing import describe_device, device_sync, interleaved_medians, resolve_device

__all__ = ["bench_model"]


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def bench_model(
    model: str,
    batch_size: int = 8,
    image_size: Optional[int] = None,
    device: str = "cpu",
    repeats: int = 5,
    pool: str = "gfgp",
    seed: int = 0,
    channels_last: bool = False,
) -> dict:
    """Training-step time and MACs of ``convert(model, pool)`` and of the original; a JSON-able dict.

    Rows: the original model, then the converted one, each with parameters, MACs per image and
    the median step time; ratios are converted / original. ``channels_last`` puts both models and
    the batch in channels_last memory format (as ``gfgp train --channels-last``).
    """
    from ..conversion import _macs, build_model, convert_with_report
    from ..errors import BadInputError
    from ..train.memory import step_growth
    from ..train.recompute import checkpoint_full_resolution

    if batch_size < 2:
        raise ValueError(f"batch-size must be >= 2 (BatchNorm in training mode needs more than one sample), got {batch_size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    original, task = build_model(model)
    if task not in ("classification", "quantization"):
        raise BadInputError(f"gfgp bench model times classification models (a training step on class labels); "
                            f"{model} is a {task.replace('_', ' ')} model")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    converted, report = convert_with_report(model, pool, image_size=image_size)
    size = report.image_size  # the model's own default when not given (224; inception_v3 299; timm's config)
    models = {model: original, f"{model} ({report.pool})": converted}

    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    macs = {name: _macs(m.eval(), example) for name, m in models.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, size, size, generator=gen).to(dev).contiguous(memory_format=memory_format)
    num_classes = original(example).shape[1]
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    for m in models.values():
        m.to(dev, memory_format=memory_format).train()
    running = dict(models)
    try:
        recomputing, _ = checkpoint_full_resolution(copy.deepcopy(converted), x[:1])
        running[f"{model} ({report.pool}, act-ckpt)"] = recomputing
        models[f"{model} ({report.pool}, act-ckpt)"] = recomputing
        macs[f"{model} ({report.pool}, act-ckpt)"] = macs[f"{model} ({report.pool})"]
    except BadInputError:  # no full-resolution stage (or not one traced graph): two rows
        pass
    steps = {name: _train_step(m, x, y) for name, m in running.items()}
    times = interleaved_medians(steps, repeats, warmup=2, sync=device_sync(dev))
    memory = {name: 0 for name in running}
    for _ in range(3):
        for name, m in running.items():
            memory[name] = max(memory[name], step_growth(m, x, y, dev)[0])

    base = model
    rows = []
    for name, m in models.items():
        macs_ratio = macs[name] / macs[base]
        time_ratio = times[name] / times[base]
        rows.append({
            "model": name, "params": sum(p.numel() for p in m.parameters()), "macs": macs[name],
            "step_ms": times[name] * 1e3, "macs_ratio": macs_ratio, "time_ratio": time_ratio,
            "time_per_macs_ratio": time_ratio / macs_ratio,
            "peak_memory_bytes": memory[name], "memory_ratio": memory[name] / memory[base] if memory[base] else None,
        })
    return {
        "model": model, "pool": report.pool, "batch_size": batch_size, "image_size": size, "repeats": repeats,
        "memory_format": "channels_last" if channels_last else "contiguous", "device": describe_device(dev), "rows": rows,
    }
