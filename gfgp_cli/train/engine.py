"""The step and epoch engine: :func:`train_one_epoch` (optimizer steps with gradient accumulation,
the NaN/Inf stop, the stop request) and :func:`run_epochs`, the one epoch driver of both
``gfgp train`` and ``gfgp study``.

The driver runs the epochs of a :class:`Trainer`, evaluates after each one when the trainer has a
validation loader, steps the LR schedule, and decides *when* a checkpoint is taken (every
``save_every_steps`` steps, on a stop request, at each epoch end); what is saved and recorded is
left to its :class:`EpochHooks` (:class:`~gfgp_cli.train.rundir.RunRecorder` for ``gfgp train``,
:class:`InMemoryEpochs` for the study, which keeps times and train metrics only).

When the work stops on bad data or a broken model, the driver keeps what is exact:

- an unreadable image (:class:`~gfgp_cli.train.data.UnreadableImageError`) during training: every
  micro-batch of a step is read before the step changes anything, so the run is saved at the last
  finished step (as a stop request is) and ``--resume`` continues exactly; during validation: the
  run is saved at (epoch, all its steps), so ``--resume`` runs no step and starts with that
  epoch's validation. The error then says so. (Single process only: the save is collective and
  the other processes are not at that point; hooks that keep nothing get the error unchanged.)
- validation outputs that are not finite (NaN/Inf): WorkFailedError (exit 1) before the epoch is
  recorded or saved, so the last checkpoint keeps the last good state.
- ``config.skip_bad_images``: the loaders' ImageFolder data skip unreadable files instead
  (:func:`~gfgp_cli.train.data.skip_bad_images`), with a line in the log when more are found.

A step, with the options of :mod:`.optim`: each micro-batch is mixed (MixUp/CutMix, soft
targets; the train top-1/top-5 then count the dominant label of the mixed target, its argmax, as
torchvision's references do), the loss is the trainer's criterion (label smoothing), the
gradients are unscaled and clipped to ``clip_grad_norm`` before ``optimizer.step``, and the EMA
model, if any, is updated after it. Validation measures plain cross-entropy (what ``gfgp eval``
reports), of the model and of its EMA; best.pt follows the model's top-1.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import WorkFailedError
from .config import TrainConfig
from .data import ResumableSampler, UnreadableImageError, loader_batches, skip_bad_images, skipped_note
from .distributed import SINGLE_PROCESS, DistInfo, all_reduce_max, all_reduce_sum
from .evaluation import evaluate, nonfinite_message
from .metrics import Meters, Progress
from .optim import Mix
from .runtime import StopControl, autocast, collective_device
from .tasks import Task

__all__ = ["NonFiniteLoss", "train_one_epoch", "Trainer", "EpochEnd", "EpochHooks", "InMemoryEpochs", "run_epochs",
           "unwrapped"]


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"loss {value} at epoch {epoch} step {step}")
        self.epoch, self.step, self.value = epoch, step, value


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                    device: torch.device, epoch: int, config: TrainConfig, *, steps: int, start_step: int = 0,
                    scaler: Optional[torch.amp.GradScaler] = None, meters: Optional[Meters] = None,
                    info: DistInfo = SINGLE_PROCESS, no_sync: Optional[Callable] = None, control: Optional[StopControl] = None,
                    on_step: Optional[Callable[[int], None]] = None, progress: Optional[Progress] = None,
                    ema: Optional[torch.optim.swa_utils.AveragedModel] = None,
                    mix: Optional[Mix] = None, task: Optional[Task] = None) -> Tuple[int, bool]:
    """Run optimizer steps ``start_step .. steps - 1`` of ``epoch``; each step accumulates
    ``config.accum_steps`` micro-batches from ``data_loader``. ``task`` (default: classification)
    moves the batches to the device and computes the loss (:mod:`.tasks`; ``criterion`` is its).

    ``mix`` mixes each micro-batch (soft targets for the loss; the meters count their argmax);
    ``config.clip_grad_norm`` caps the total gradient norm before the step; ``ema`` is updated
    from the model after every step.

    Raises :class:`NonFiniteLoss` before the backward of a NaN/Inf loss (on every rank). After
    each step ``on_step(steps_done)`` runs (periodic checkpoints). Returns ``(steps_done, stop)``:
    ``stop`` is True when a stop was requested (Ctrl-C on any rank); the loop then ends after the
    step in progress. A step reads all its micro-batches before it runs them, so an error of the
    data (an unreadable image) leaves the model, the meters and the generators as the last
    finished step left them.
    """
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    task = task if task is not None else Task()
    meters = meters if meters is not None else task.meters()
    control = control or StopControl()
    model.train()
    amp = autocast(device, config)
    accum = config.accum_steps
    with loader_batches(data_loader) as batches:
        for step in range(start_step, steps):
            # The step's micro-batches are all read before it changes anything (weights, BatchNorm
            # statistics, meters, generators): a file that cannot be read stops the run at a step boundary.
            micro_batches = [next(batches) for _ in range(accum)]
            optimizer.zero_grad(set_to_none=True)
            stop = False
            for j, (images, target) in enumerate(micro_batches):
                images, target = task.to_device(images, target, device, config)
                labels = target
                if mix is not None:
                    images, target = mix(images, target)
                    labels = target.argmax(dim=1)  # the dominant label of each mixed image
                # DDP: gradients are all-reduced only on the last micro-batch of a step.
                sync = no_sync() if (no_sync is not None and j < accum - 1) else contextlib.nullcontext()
                with sync:
                    with amp:
                        loss, output = task.forward(model, images, target, criterion)
                    value = loss.item()
                    flags = all_reduce_max(torch.tensor([float(not math.isfinite(value)), float(control.stop)],
                                                        device=collective_device(device, info)), info).tolist()
                    if flags[0]:
                        raise NonFiniteLoss(epoch, step, value)
                    stop = stop or bool(flags[1])
                    scaler.scale(loss / accum).backward()
                meters.update(value, output, labels)
            if config.clip_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op without loss scaling)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(unwrapped(model))
            if progress is not None:
                progress.update(step + 1, task.batch_len(images) * accum * info.world_size, meters.running())
            if on_step is not None:
                on_step(step + 1)
            if stop:
                return step + 1, True
        return steps, False


@dataclass
class Trainer:
    """What the epoch driver runs: the model (as wrapped for running) and its optimisation, the
    training data in ``sampler``'s order, and where progress goes."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    sampler: ResumableSampler
    device: torch.device
    config: TrainConfig
    progress: Progress
    val_loader: Optional[DataLoader] = None  # None: no evaluation after each epoch
    scaler: Optional[torch.amp.GradScaler] = None  # None: no loss scaling
    info: DistInfo = SINGLE_PROCESS
    no_sync: Optional[Callable] = None  # DDP's no_sync, for gradient accumulation
    label: str = ""  # shown before "epoch N/M" in the progress
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None  # optim.build_ema: updated every step, evaluated every epoch
    mix: Optional[Mix] = None  # optim.build_mix: MixUp/CutMix of the training micro-batches
    val_criterion: Optional[nn.Module] = None  # None: plain cross-entropy, what gfgp eval measures
    task: Optional[Task] = None  # None: classification (.tasks)


@dataclass
class EpochEnd:
    """One finished epoch, as the driver hands it to its hooks."""

    epoch: int  # 0-based
    lrs: List[float]  # every parameter group's lr during the epoch
    train: Dict[str, float]  # train metrics, summed over ranks
    val: Optional[Dict[str, float]]  # validation metrics (None without a val_loader)
    images_per_s: float
    started: float  # time.perf_counter() when its steps began
    train_s: float  # seconds of the training steps alone
    ema_val: Optional[Dict[str, float]] = None  # validation metrics of the EMA model (None without one)


class EpochHooks:
    """What a caller of :func:`run_epochs` does at the points the driver picks; every hook does
    nothing by default."""

    def save(self, epoch: int, step: int, meters: Meters) -> None:
        """Checkpoint at (``epoch``, ``step``) with the epoch's sums so far (collective: every rank
        is called at the same points)."""

    def finished(self, end: EpochEnd) -> None:
        """An epoch ended and the schedule stepped; called before its checkpoint is saved."""

    def saved(self, end: EpochEnd) -> None:
        """The epoch-end checkpoint of ``end`` has been saved."""


class InMemoryEpochs(EpochHooks):
    """Hooks of a run that is never resumed and writes nothing (``gfgp study``): each epoch's
    training time, and the train metrics of the last finished epoch (NaN before the first)."""

    def __init__(self) -> None:
        self.times: List[float] = []
        self.train: Dict[str, float] = {"loss": math.nan, "top1": math.nan}

    def finished(self, end: EpochEnd) -> None:
        self.times.append(end.train_s)
        self.train = end.train


def run_epochs(trainer: Trainer, hooks: EpochHooks, *, start_epoch: int = 0, start_step: int = 0,
               meters: Optional[Meters] = None, control: Optional[StopControl] = None) -> Optional[Tuple[int, int]]:
    """Train epochs ``start_epoch .. config.epochs - 1`` of ``trainer``, the first from optimizer
    step ``start_step`` with its partial sums ``meters``. Returns None when every epoch ran, else
    the (epoch, step) a stop request saved the run at. :class:`NonFiniteLoss` propagates."""
    t, config = trainer, trainer.config
    task = t.task if t.task is not None else Task()
    steps = t.sampler.steps_per_epoch
    every = config.save_every_steps
    loaders = [loader for loader in (t.train_loader, t.val_loader) if loader is not None]
    skipped = [0] * len(loaders)  # unreadable files each loader's data has skipped, as logged
    for loader in loaders:  # before the loaders start their workers, which share the flags
        skip_bad_images(loader.dataset, config.skip_bad_images)
    saved = start_epoch > 0 or start_step > 0  # a last.pt holds this run's state (it was resumed)
    for epoch in range(start_epoch, config.epochs):
        t.sampler.set_epoch(epoch)
        t.sampler.set_start(start_step if epoch == start_epoch else 0)
        if epoch != start_epoch or meters is None:
            meters = task.meters()
        title = f"epoch {epoch + 1}/{config.epochs}"
        t.progress.start(f"{t.label} {title}" if t.label else title, steps, t.sampler.start_step, epoch=epoch,
                         epochs=config.epochs)
        lrs = [g["lr"] for g in t.optimizer.param_groups]
        t0 = time.perf_counter()

        finished = [t.sampler.start_step]  # steps of the epoch done so far

        def on_step(done: int, epoch: int = epoch, meters: Meters = meters, finished: List[int] = finished) -> None:
            nonlocal saved
            finished[0] = done
            if every and done % every == 0 and done < steps:
                hooks.save(epoch, done, meters)
                saved = True

        try:
            done, stop = train_one_epoch(
                t.model, t.criterion, t.optimizer, t.train_loader, t.device, epoch, config, steps=steps,
                start_step=t.sampler.start_step, scaler=t.scaler, meters=meters, info=t.info, no_sync=t.no_sync,
                control=control, on_step=on_step, progress=t.progress, ema=t.ema, mix=t.mix, task=task)
        except UnreadableImageError as e:
            t.progress.stop()
            if not _save_before_stopping(hooks, t.info, epoch, finished[0], meters):
                raise
            raise UnreadableImageError(f"{e}; last.pt keeps the run at epoch {epoch + 1} step {finished[0]}, "
                                       "and --resume continues it from there") from e
        finally:
            t.progress.stop()
        train_s = time.perf_counter() - t0
        if done < steps:
            hooks.save(epoch, done, meters)
            return epoch, done
        images_per_s = t.progress.images_per_s()
        train_m = meters.summary(all_reduce_sum(meters.totals(), t.info))
        val_m = ema_m = None
        if t.val_loader is not None:
            val_criterion = t.val_criterion if t.val_criterion is not None else nn.CrossEntropyLoss()
            try:
                val_m = _validate(t, t.model, val_criterion, "val")
                if t.ema is not None:
                    ema_m = _validate(t, t.ema.module, val_criterion, "ema val")
            except UnreadableImageError as e:
                if not _save_before_stopping(hooks, t.info, epoch, steps, meters):
                    raise
                raise UnreadableImageError(f"{e}; last.pt keeps epoch {epoch + 1}'s training, and --resume "
                                           "continues with its validation") from e
            ema_module = t.ema.module if t.ema is not None else None
            for m, module, whose in ((val_m, t.model, "the model's"), (ema_m, ema_module, "the EMA model's")):
                if m is not None and m["nonfinite"]:
                    what = nonfinite_message(m, module, whose, config.amp)
                    kept = "last.pt keeps the last good state" if saved else "no checkpoint was written"
                    raise WorkFailedError(f"validation after epoch {epoch + 1}: {what}; stopped before saving the "
                                          f"epoch, {kept}; lower --lr or disable --amp")
        with warnings.catch_warnings():
            # An epoch resumed after its last step (its validation had failed) runs no
            # optimizer.step() before this, which torch warns about; the schedule's position was
            # restored with it, so the step is the right one.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            t.scheduler.step()
        end = EpochEnd(epoch, lrs, train_m, val_m, images_per_s, t0, train_s, ema_m)
        # The epoch's record goes into its checkpoint; what points at the checkpoint (best.pt, the
        # metrics files) follows it, so a crash in between never leaves them ahead of last.pt.
        hooks.finished(end)
        hooks.save(epoch + 1, 0, task.meters())
        saved = True
        hooks.saved(end)
        for k, loader in enumerate(loaders):
            note, skipped[k] = skipped_note(loader.dataset, skipped[k])
            if note is not None:
                t.progress.log(note)
        if stop:
            return epoch + 1, 0
    return None


def _validate(t: Trainer, model: nn.Module, criterion: nn.Module, name: str) -> Dict[str, float]:
    """:func:`evaluate` of ``model`` on the trainer's validation data, shown as the phase ``name``."""
    t.progress.start_validation(len(t.val_loader), name)
    try:
        return evaluate(model, criterion, t.val_loader, t.device, t.config, t.info, progress=t.progress, task=t.task)
    finally:
        t.progress.stop()


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DDP's wrappers (whose parameters and buffers they
    share, in the same order)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _save_before_stopping(hooks: EpochHooks, info: DistInfo, epoch: int, step: int, meters: Meters) -> bool:
    """Save the run at (``epoch``, ``step``) before an error stops it; False when it cannot be:
    several processes (the save is collective and the others are elsewhere), or hooks whose
    :meth:`~EpochHooks.save` keeps nothing (the study's)."""
    if info.world_size > 1 or type(hooks).save is EpochHooks.save:
        return False
    hooks.save(epoch, step, meters)
    return True
