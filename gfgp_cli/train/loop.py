"""Training and evaluation of converted models, in the shape of torchvision's
references/classification/train.py: :func:`train_one_epoch`, :func:`evaluate`, :func:`load_data`
(in ``data``) and :func:`main`, driven by a frozen :class:`~gfgp_cli.train.config.TrainConfig`.

:func:`train` is the library side of ``gfgp train``: it resolves the recipe and the flags, checks
every input before anything is written, then calls :func:`main`. :func:`evaluate_checkpoint` is
``gfgp eval``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import atomic_write_text, ensure_writable_dir
from ..checkpoint import load, read_checkpoint
from ..spec import ConversionSpec, TorchvisionSource, spec_of
from ..devices import resolve_device as _resolve_device
from ..errors import BadInputError, WorkFailedError
from .config import RESUME_MUTABLE, TrainConfig, check_device_name, config_from_dict, lr_factor, resolve_config
from .data import DataBundle, ResumableSampler, SeededSamples, ShardSampler, load_data
from .distributed import (DistInfo, all_gather_object, all_reduce_max, all_reduce_sum, cleanup_distributed,
                          init_distributed, run_on_main)
from .metrics import Meters, MetricsLog, Progress
from .state import BEST, LAST, capture_rng, promote_to_best, restore_rng, save_run_checkpoint

__all__ = ["train", "main", "train_one_epoch", "evaluate", "evaluate_checkpoint", "TrainResult", "RUN_FILES"]

# Files a run writes; a folder holding any of them is an existing run.
RUN_FILES = (LAST, BEST, "config.json", "metrics.csv", "metrics.jsonl")


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    run_dir: str
    epochs: int  # epochs finished
    total_epochs: int
    interrupted: bool = False
    stopped_at: Optional[Tuple[int, int]] = None  # (epoch, step) saved when interrupted
    final: Optional[Dict[str, Any]] = None  # the last finished epoch's metrics
    best_top1: Optional[float] = None
    best_epoch: Optional[int] = None
    notes: List[str] = field(default_factory=list)


class _Control:
    """Set by the SIGINT/SIGTERM handler; the loop stops after the current optimizer step."""

    stop = False


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"loss {value} at epoch {epoch} step {step}")
        self.epoch, self.step, self.value = epoch, step, value


# --- the two loops ---------------------------------------------------------------------------


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                    device: torch.device, epoch: int, config: TrainConfig, *, steps: int, start_step: int = 0,
                    scaler: Optional[torch.amp.GradScaler] = None, meters: Optional[Meters] = None,
                    info: DistInfo = DistInfo(), no_sync: Optional[Callable] = None, control: Optional[_Control] = None,
                    on_step: Optional[Callable[[int], None]] = None, progress: Optional[Progress] = None) -> Tuple[int, bool]:
    """Run optimizer steps ``start_step .. steps - 1`` of ``epoch``; each step accumulates
    ``config.accum_steps`` micro-batches from ``data_loader``.

    Raises :class:`NonFiniteLoss` before the backward of a NaN/Inf loss (on every rank). After
    each step ``on_step(steps_done)`` runs (periodic checkpoints). Returns ``(steps_done, stop)``:
    ``stop`` is True when a stop was requested (Ctrl-C on any rank); the loop then ends after the
    step in progress.
    """
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    meters = meters if meters is not None else Meters()
    control = control or _Control()
    model.train()
    autocast = _autocast(device, config)
    accum = config.accum_steps
    batches = iter(data_loader)
    for step in range(start_step, steps):
        optimizer.zero_grad(set_to_none=True)
        stop = False
        for j in range(accum):
            images, target = next(batches)
            images, target = _to_device(images, device, config), target.to(device, non_blocking=True)
            # DDP: gradients are all-reduced only on the last micro-batch of a step.
            sync = no_sync() if (no_sync is not None and j < accum - 1) else contextlib.nullcontext()
            with sync:
                with autocast:
                    output = model(images)
                    loss = criterion(output, target)
                value = loss.item()
                flags = all_reduce_max(torch.tensor([float(not math.isfinite(value)), float(control.stop)],
                                                    device=_collective_device(device, info)), info).tolist()
                if flags[0]:
                    raise NonFiniteLoss(epoch, step, value)
                stop = stop or bool(flags[1])
                scaler.scale(loss / accum).backward()
            meters.update(value, output, target)
        scaler.step(optimizer)
        scaler.update()
        if progress is not None:
            progress.update(step + 1, images.shape[0] * accum * info.world_size,
                            {"loss": meters.loss_sum / max(meters.count, 1), "top1": 100.0 * meters.correct1 / max(meters.count, 1)})
        if on_step is not None:
            on_step(step + 1)
        if stop:
            return step + 1, True
    return steps, False


@torch.inference_mode()
def evaluate(model: nn.Module, criterion: nn.Module, data_loader: DataLoader, device: torch.device,
             config: Optional[TrainConfig] = None, info: DistInfo = DistInfo(),
             progress: Optional[Progress] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over ``data_loader``, summed over all ranks."""
    model.eval()
    autocast = _autocast(device, config) if config is not None else contextlib.nullcontext()
    meters = Meters()
    for i, (images, target) in enumerate(data_loader):
        images = _to_device(images, device, config)
        target = target.to(device, non_blocking=True)
        with autocast:
            output = model(images)
            loss = criterion(output, target)
        meters.update(loss.item(), output.float(), target)
        if progress is not None:
            progress.update(i + 1, images.shape[0] * info.world_size, {})
    return Meters.summary(all_reduce_sum(meters.totals(), info))


# --- entry points ------------------------------------------------------------------------------


def train(checkpoint: str, data: str, out: str, *, recipe: Optional[str] = None, resume: bool = False,
          force: bool = False, model: Optional[nn.Module] = None, spec: Optional[ConversionSpec] = None,
          **flags: Any) -> TrainResult:
    """Train the model of a gfgp checkpoint (``gfgp train``); ``flags`` are TrainConfig fields,
    ``None`` meaning "not given" (the recipe's value).

    ``model``/``spec`` train an in-memory model instead of rebuilding it from ``checkpoint``
    (for models converted from the user's own module). Every input is checked before anything is
    written; a bad one raises BadInputError (exit 2).
    """
    run_dir = Path(out)
    state = None
    if resume:
        last = run_dir / LAST
        if not last.exists():
            raise BadInputError(f"nothing to resume: {run_dir} has no {LAST}; start the run without --resume")
        state = read_checkpoint(last)
        if "config" not in state:
            raise BadInputError(f"{last} holds a model but no training state; start a new run with --force")
        config, notes = _resume_config(config_from_dict(state["config"]), data, recipe, flags)
        # The run continues where it lies now (the folder may have been moved or copied).
        config = dataclasses.replace(config, out=str(out), checkpoint=str(checkpoint))
        model = _rebuild(state, model)
        spec = state["spec"]
    else:
        existing = [name for name in RUN_FILES if (run_dir / name).exists()]
        if existing and not force:
            raise BadInputError(
                f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it "
                "or --force to start over"
            )
        if model is None:
            model = load(checkpoint)
            spec = spec_of(model)
        elif spec is None:
            raise TypeError("train(model=...) needs the model's conversion spec (spec=...)")
        config, notes = resolve_config(checkpoint, data, out, recipe or _default_recipe(spec), **flags)
    return main(config, model, spec, state=state, force=force, notes=notes)


def main(config: TrainConfig, model: nn.Module, spec: ConversionSpec, *, state: Optional[Dict[str, Any]] = None,
         force: bool = False, notes: Optional[List[str]] = None) -> TrainResult:
    """Run the training a resolved ``config`` describes, from scratch or from ``state`` (a
    ``last.pt`` checkpoint). Joins torchrun's process group when launched by it."""
    notes = list(notes or [])
    info = init_distributed(_wants_cuda(config.device))
    threads = torch.get_num_threads()  # --threads applies to this run only (train() is a library call)
    try:
        with _determinism(config.deterministic):
            return _main(config, model, spec, state, force, notes, info)
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed(info)


def _main(config: TrainConfig, model: nn.Module, spec: ConversionSpec, state: Optional[Dict[str, Any]], force: bool,
          notes: List[str], info: DistInfo) -> TrainResult:
    run_dir = Path(config.out)
    device = resolve_device(config.device, info)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model.to(device)
    bundle, image_size = prepare_data(model, spec, config.data, config.image_size, device, config.download)
    config = dataclasses.replace(config, image_size=image_size)

    # -- checks that need the model and the data (before anything is written)
    sampler = ResumableSampler(len(bundle.train), config.batch_size, info.world_size, info.rank,
                               config.accum_steps, seed=config.seed)
    steps = sampler.steps_per_epoch
    if steps < 1:
        raise BadInputError(
            f"the training set of {bundle.name} has {len(bundle.train)} images, fewer than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    if sampler.micro_batch < 2 and _has_batchnorm(model) and not config.sync_bn:
        raise BadInputError(
            f"--batch-size {config.batch_size} leaves {sampler.micro_batch} image per device and micro-batch "
            f"({info.world_size} process(es) x {config.accum_steps} accumulation step(s)); the BatchNorm in "
            "GFGP's lam estimator normalises 1x1 maps over the batch and needs at least 2: raise --batch-size"
        )
    autocast_dtype = _amp_dtype(device, config, notes)
    if config.sync_bn:
        if device.type != "cuda":
            raise BadInputError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)")
        if info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            notes.append("--sync-bn has no effect with a single process")

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(_param_groups(model, spec, config, notes), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(config, e))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16 and device.type == "cuda")

    start_epoch, start_step, meters, history, best = 0, 0, Meters(), [], {"epoch": None, "top1": None}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        meters = _restore_meters(state["meters"], info)
        history, best = list(state["history"]), dict(state["best"])

    # -- the run directory (rank 0), then the model wrappers
    run_on_main(lambda: _prepare_run_dir(run_dir, config, notes, force=force and state is None), info)
    log = MetricsLog(run_dir, history) if info.is_main else None
    progress = Progress(enabled=info.is_main)
    for note in notes:
        progress.log(f"note: {note}")

    model_without_ddp = model
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp = None
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model = ddp
    if config.compile:
        model = torch.compile(model)

    train_loader = DataLoader(SeededSamples(bundle.train), batch_size=sampler.micro_batch, sampler=sampler,
                              num_workers=config.workers, pin_memory=device.type == "cuda", drop_last=True,
                              generator=torch.Generator(), worker_init_fn=_ignore_sigint)
    val_loader = _eval_loader(bundle.val, max(1, config.batch_size // info.world_size), config.workers, device, info)

    def save(epoch: int, step: int, epoch_meters: Meters) -> None:
        # Every rank's generators and partial sums go into the checkpoint (collective: all ranks
        # call save at the same points); rank 0 writes.
        per_rank = all_gather_object({"rng": capture_rng(), "meters": epoch_meters.state()}, info)
        if info.is_main:
            save_run_checkpoint(run_dir, spec, model_without_ddp.state_dict(), {
                "config": config.to_dict(),
                "epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": [r["rng"] for r in per_rank], "meters": [r["meters"] for r in per_rank],
                "history": history, "best": best})

    if state is None:
        _seed_everything(config.seed + info.rank)  # one stream per process (dropout differs across ranks)
    elif len(state["rng"]) == info.world_size:
        restore_rng(state["rng"][info.rank])
    else:
        _seed_everything(config.seed + info.rank + 1000 * (start_epoch * steps + start_step))
        progress.log(f"note: resumed on {info.world_size} process(es) a run saved by {len(state['rng'])}: the data "
                     "order is kept, the random generators are reseeded (not bit-exact)")
    control = _Control()
    result = TrainResult(str(run_dir), start_epoch, config.epochs, notes=notes,
                         final=history[-1] if history else None, best_top1=best["top1"], best_epoch=best["epoch"])
    try:
        with _stop_on_signals(control):
            for epoch in range(start_epoch, config.epochs):
                sampler.set_epoch(epoch)
                sampler.set_start(start_step if epoch == start_epoch else 0)
                if epoch != start_epoch:
                    meters = Meters()
                progress.start(f"epoch {epoch + 1}/{config.epochs}", steps, sampler.start_step)
                lrs = [g["lr"] for g in optimizer.param_groups]
                t0 = time.perf_counter()
                every = config.save_every_steps

                def on_step(done: int, epoch: int = epoch, meters: Meters = meters) -> None:
                    if every and done % every == 0 and done < steps:
                        save(epoch, done, meters)

                try:
                    done, stop = train_one_epoch(
                        model, criterion, optimizer, train_loader, device, epoch, config, steps=steps,
                        start_step=sampler.start_step, scaler=scaler, meters=meters, info=info,
                        no_sync=ddp.no_sync if ddp is not None else None, control=control, on_step=on_step,
                        progress=progress)
                finally:
                    progress.stop()
                if done < steps:
                    save(epoch, done, meters)
                    result.interrupted, result.stopped_at = True, (epoch, done)
                    return result
                images_per_s = progress.images_per_s()
                train_m = Meters.summary(all_reduce_sum(meters.totals(), info))
                val_m = evaluate(model, criterion, val_loader, device, config, info)
                row = {"epoch": epoch + 1, "lr": max(lrs), "lrs": lrs,
                       "train_loss": train_m["loss"], "train_top1": train_m["top1"], "train_top5": train_m["top5"],
                       "val_loss": val_m["loss"], "val_top1": val_m["top1"], "val_top5": val_m["top5"],
                       "images_per_s": round(images_per_s, 1), "epoch_time_s": round(time.perf_counter() - t0, 3)}
                history.append(row)
                scheduler.step()
                improved = best["top1"] is None or val_m["top1"] > best["top1"]
                if improved:
                    best = {"epoch": epoch + 1, "top1": val_m["top1"]}
                save(epoch + 1, 0, Meters())
                if info.is_main:
                    if improved:
                        promote_to_best(run_dir)
                    log.append(row)
                progress.log(
                    f"epoch {epoch + 1}/{config.epochs}  lr {max(lrs):.4g}  train loss {train_m['loss']:.4f} "
                    f"top1 {train_m['top1']:.2f}%  val loss {val_m['loss']:.4f} top1 {val_m['top1']:.2f}% "
                    f"top5 {val_m['top5']:.2f}%  {images_per_s:.0f} img/s  {row['epoch_time_s']:.1f} s"
                )
                result.epochs, result.final = epoch + 1, row
                result.best_top1, result.best_epoch = best["top1"], best["epoch"]
                if stop:
                    result.interrupted, result.stopped_at = True, (epoch + 1, 0)
                    return result
    except NonFiniteLoss as e:
        kept = f"{run_dir / LAST} keeps the last good state" if (run_dir / LAST).exists() else "no checkpoint was written"
        raise WorkFailedError(
            f"training diverged: the loss became {e.value} at epoch {e.epoch + 1} step {e.step + 1} (lr "
            f"{max(g['lr'] for g in optimizer.param_groups):.4g}); stopped before updating the model, {kept}; "
            "lower --lr or disable --amp"
        ) from None
    finally:
        if log is not None:
            log.close()
    return result


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
    _amp_dtype(dev, config, [])
    loader = _eval_loader(bundle.val, batch_size, workers, dev, DistInfo())
    metrics = evaluate(model, nn.CrossEntropyLoss(), loader, dev, config)
    return {"checkpoint": str(checkpoint), "data": bundle.name, "image_size": size, **metrics}


# --- helpers ---------------------------------------------------------------------------------------


def load_trained(checkpoint, module: Optional[nn.Module] = None) -> Tuple[nn.Module, Dict[str, Any], Optional[int]]:
    """``(model, spec, image_size)`` of a checkpoint; image_size is what a run trained at (None
    for a plain conversion, whose spec may record its own)."""
    data = read_checkpoint(checkpoint)
    config = data.get("config")
    model = load(data, module=module)
    return model, spec_of(model), config.get("image_size") if isinstance(config, dict) else None


def _rebuild(state: Dict[str, Any], module: Optional[nn.Module]) -> nn.Module:
    """The model stored in a (read) run checkpoint; an in-memory ``module`` gets the stored weights."""
    if module is None:
        return load(state)
    module.load_state_dict(state["state_dict"], strict=True)
    return module


def _resume_config(saved: TrainConfig, data: str, recipe: Optional[str], flags: Dict[str, Any]) -> Tuple[TrainConfig, List[str]]:
    """The saved config, with the flags a resumed run may change; any other flag that differs is an error."""
    given = {k: v for k, v in flags.items() if v is not None}
    if recipe is not None:
        given["recipe"] = recipe
    given["data"] = data
    changes, notes = {}, []
    for key, value in given.items():
        old = getattr(saved, key)
        if key == "amp_dtype":
            value = {"bf16": "bfloat16", "fp16": "float16"}.get(value, value)
        if value == old:
            continue
        if key not in RESUME_MUTABLE:
            flag = {"weight_decay": "--wd"}.get(key, "--" + key.replace("_", "-"))
            raise BadInputError(
                f"the run was started with {flag} {old}; --resume continues it unchanged, so drop {flag} "
                "(or start over with --force)"
            )
        changes[key] = value
        notes.append(f"resumed with {key} {old} -> {value}")
    config = dataclasses.replace(saved, **changes)
    if config.epochs < 1:
        raise BadInputError(f"--epochs must be a positive integer, got {config.epochs!r}")
    return config, notes


def _default_recipe(spec: ConversionSpec) -> str:
    """finetune for models converted with pretrained weights; else paper-vgg for VGG models and
    paper-resnet for the rest (docs/method.md section 5)."""
    if spec.weights:
        return "finetune"
    name = spec.source.name.lower() if isinstance(spec.source, TorchvisionSource) else ""
    return "paper-vgg" if name.startswith("vgg") else "paper-resnet"


def prepare_data(model: nn.Module, spec: ConversionSpec, data: str, image_size: Optional[int], device: torch.device,
             download: bool) -> Tuple[DataBundle, int]:
    """Resolve the image size, load SPEC's data and check the classifier fits its classes."""
    size = image_size or spec.image_size
    outputs = _num_outputs(model, size, device)
    bundle = load_data(data, size, num_classes=outputs, download=download)
    if bundle.num_classes != outputs:
        raise BadInputError(
            f"the model has {outputs} outputs but {bundle.name} has {bundle.num_classes} classes; convert it with "
            f"`gfgp convert MODEL --num-classes {bundle.num_classes} --out ...`"
        )
    return bundle, size


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


def _eval_loader(dataset, batch_size: int, workers: int, device: torch.device, info: DistInfo) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.world_size, info.rank),
                      num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator(),
                      worker_init_fn=_ignore_sigint)


def _prepare_run_dir(run_dir: Path, config: TrainConfig, notes: List[str], force: bool) -> None:
    """Create the run folder, prove it is writable, clear an old run (--force), record the config."""
    ensure_writable_dir(run_dir, "the run directory")
    if force:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    text = json.dumps({**config.to_dict(), "notes": notes}, indent=2) + "\n"
    atomic_write_text(run_dir / "config.json", text)


def _param_groups(model: nn.Module, spec: ConversionSpec, config: TrainConfig, notes: List[str]) -> List[Dict[str, Any]]:
    """One group, or for ``backbone_lr_scale != 1`` the new layers at lr and the reused layers at
    lr * backbone_lr_scale. New layers: the parameters the conversion spec records as not coming
    from the pretrained weights (new pooling layers, a classifier rebuilt for other classes);
    without that record, the pooling layers."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.backbone_lr_scale == 1.0:
        return [{"params": params, "lr": config.lr, "name": "all"}]
    from ..nn import GFGPPool2d, MaxEntPool2d

    recorded = spec.new_parameters
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


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def resolve_device(device: str, info: DistInfo = DistInfo()) -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch.device (under torchrun, cuda is cuda:LOCAL_RANK)."""
    return _resolve_device(device, info.local_rank if info.enabled else None)


def _amp_dtype(device: torch.device, config: TrainConfig, notes: List[str]) -> Optional[torch.dtype]:
    if not config.amp:
        return None
    dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise BadInputError("--amp-dtype fp16 needs CUDA; on the CPU autocast runs in bf16 (--amp-dtype bf16)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        notes.append("this GPU has no bfloat16: autocast uses float16 with a grad scaler")
        dtype = torch.float16
    return dtype


def _autocast(device: torch.device, config: Optional[TrainConfig]):
    if config is None or not config.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _to_device(images: torch.Tensor, device: torch.device, config: Optional[TrainConfig]) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if config is not None and config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _collective_device(device: torch.device, info: DistInfo) -> torch.device:
    """Small flag tensors live where the backend wants them (NCCL: GPU, gloo: CPU)."""
    return device if info.enabled and device.type == "cuda" else torch.device("cpu")


def _restore_meters(saved: List[Dict[str, Any]], info: DistInfo) -> Meters:
    """This rank's partial sums; on another world size rank 0 carries the total (the sums are
    only ever reduced)."""
    if len(saved) == info.world_size:
        return Meters(**saved[info.rank])
    if not info.is_main:
        return Meters()
    total = Meters()
    for m in saved:
        for key, value in m.items():
            setattr(total, key, getattr(total, key) + value)
    return total


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def _determinism(enabled: bool):
    """--deterministic: deterministic kernels only (restored afterwards); otherwise cuDNN autotuning."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1], previous[2]


@contextlib.contextmanager
def _stop_on_signals(control: _Control):
    """First Ctrl-C (or SIGTERM): finish the current step, save last.pt and return. A second
    Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if control.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        control.stop = True

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops cleanly after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
