"""Training of converted models, in the shape of torchvision's references/classification/train.py:
:func:`train` and :func:`main` put together the pieces the other modules hold, driven by a frozen
:class:`~gfgp_cli.train.config.TrainConfig`.

:func:`train` is the library side of ``gfgp train``: it resolves the recipe and the flags (or the
saved run for --resume), checks every input before anything is written, then calls :func:`main`.
The pieces: :mod:`.engine` (:func:`train_one_epoch`, the epoch driver), :mod:`.optim`,
:mod:`.runtime` (signals, seeding, devices, amp), :mod:`.evaluation` (:func:`evaluate`,
:func:`evaluate_checkpoint`, which is ``gfgp eval``), :mod:`.rundir` (the run folder, checkpoints
and metrics of each epoch) and :mod:`.state` (what a checkpoint holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import load, read_checkpoint
from ..errors import BadInputError, WorkFailedError
from ..spec import ConversionSpec, TimmSource, TorchvisionSource, spec_of
from .config import FILE_ONLY, FLAGS, RECIPES, RESUME_MUTABLE, TrainConfig, check_config, resolve_config
from .data import DataBundle, ResumableSampler, SeededSamples
from .distributed import DistInfo, all_gather_object, cleanup_distributed, init_distributed, run_on_main
from .engine import NonFiniteLoss, Trainer, run_epochs, train_one_epoch
from .evaluation import eval_loader, evaluate, evaluate_checkpoint, prepare_data
from .memory import MEASURE_BATCH, available_memory, measure_step, plan_micro_batches
from .metrics import MetricsLog, Progress
from .optim import build_ema, build_mix, build_optimizer
from .recompute import checkpoint_full_resolution
from .rundir import RUN_FILES, RunRecorder, TrainResult, check_checkpoint_space, hold_run_dir, prepare_run_dir
from .runtime import (
    StopControl,
    amp_dtype,
    determinism,
    grad_scaler,
    ignore_sigint,
    kept_num_threads,
    resolve_device,
    seed_process,
    stop_on_signals,
    sync_batchnorm,
    wants_cuda,
    wrap_model,
)
from .state import LAST, read_run_checkpoint, rebuild_model, resume_training, saved_config, saved_rng
from .tasks import Task, task_for

# train_one_epoch, evaluate, evaluate_checkpoint, TrainResult and RUN_FILES live in the modules
# above; they stay importable from here, where the commands and older code look for them.
__all__ = ["train", "main", "train_one_epoch", "evaluate", "evaluate_checkpoint", "TrainResult", "RUN_FILES"]


def train(checkpoint: Optional[str], data: Optional[str], out: str, *, recipe: Optional[str] = None, resume: bool = False,
          force: bool = False, model: Optional[nn.Module] = None, spec: Optional[ConversionSpec] = None,
          memory_limit: Optional[int] = None, **flags: Any) -> TrainResult:
    """Train the model of a gfgp checkpoint (``gfgp train``); ``flags`` are TrainConfig fields,
    ``None`` meaning "not given" (the recipe's value).

    ``model``/``spec`` train an in-memory model instead of rebuilding it from ``checkpoint``
    (for models converted from the user's own module). Before the first step the memory of a step
    is measured (:mod:`.memory`): without ``accum_steps`` a batch that does not fit is split into
    micro-batches that do; ``memory_limit`` (bytes) caps what the run may use. Every input is checked before anything is
    written; a bad one raises BadInputError (exit 2).

    With ``resume`` the saved run in ``out`` knows its checkpoint and data: ``checkpoint`` and
    ``data`` may be None (a given ``data`` must be the saved one). A new run needs both. A recipe
    that trains the reused layers slower (``finetune``) refuses a torchvision checkpoint whose
    reused layers are random: converted without --weights and never trained.
    """
    run_dir = Path(out)
    notes: List[str] = []
    if not resume and (checkpoint is None or data is None):
        missing = "CHECKPOINT" if checkpoint is None else "--data SPEC"
        raise BadInputError(f"a new run needs {missing}; give the converted model and the data "
                            "(`gfgp train m.pt --data SPEC --out RUN_DIR`), or --resume RUN_DIR to continue a run")
    with _held(run_dir, resume, notes):
        state = None
        if resume:
            state = read_run_checkpoint(_resumable(run_dir))
            config, resumed = _resume_config(saved_config(state), data, recipe, flags)
            # The run continues where it lies now (the folder may have been moved or copied).
            config = dataclasses.replace(config, out=str(out),
                                         checkpoint=config.checkpoint if checkpoint is None else str(checkpoint))
            model = rebuild_model(state, model)
            spec = state["spec"]
        else:
            existing = [name for name in RUN_FILES if (run_dir / name).exists()]
            if existing and not force:
                raise BadInputError(
                    f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it "
                    "or --force to start over"
                )
            from_file = model is None
            if from_file:
                model = load(checkpoint)
                spec = spec_of(model)
            elif spec is None:
                raise TypeError("train(model=...) needs the model's conversion spec (spec=...)")
            config, resumed = resolve_config(checkpoint, data, out, recipe or _default_recipe(spec), **flags)
            if from_file:
                _check_reused_layers(config, spec, checkpoint)
        return main(config, model, spec, state=state, force=force, notes=resumed + notes, memory_limit=memory_limit,
                    auto_accum=not resume and flags.get("accum_steps") is None)


@contextlib.contextmanager
def _held(run_dir: Path, resume: bool, notes: List[str]) -> Iterator[None]:
    """The run folder's lock for the whole run (rank 0 of torchrun, which alone writes it)."""
    if resume and not run_dir.is_dir():
        raise BadInputError(f"nothing to resume: {run_dir} does not exist; start the run without --resume")
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with hold_run_dir(run_dir, notes):
        yield


def _resumable(run_dir: Path) -> Path:
    """RUN_DIR/last.pt; bad input, with the way forward, when there is none."""
    last = run_dir / LAST
    if last.exists():
        return last
    others = [name for name in RUN_FILES if (run_dir / name).exists()]
    if others:
        raise BadInputError(
            f"nothing to resume: {run_dir} has {', '.join(others)} but no {LAST} (the run stopped before its "
            "first checkpoint); start it again with --force instead of --resume"
        )
    raise BadInputError(f"nothing to resume: {run_dir} holds no run; start the run without --resume")


def main(config: TrainConfig, model: nn.Module, spec: ConversionSpec, *, state: Optional[Dict[str, Any]] = None,
         force: bool = False, notes: Optional[List[str]] = None, memory_limit: Optional[int] = None,
         auto_accum: bool = False) -> TrainResult:
    """Run the training a resolved ``config`` describes, from scratch or from ``state`` (a
    ``last.pt`` checkpoint). Joins torchrun's process group when launched by it. ``auto_accum``:
    choose ``config.accum_steps`` from a measured step (else it is checked against memory)."""
    notes = list(notes or [])
    info = init_distributed(wants_cuda(config.device))
    try:
        with kept_num_threads(), determinism(config.deterministic):
            return _main(config, model, spec, state, force, notes, info, memory_limit, auto_accum)
    finally:
        cleanup_distributed(info)


def _main(config: TrainConfig, model: nn.Module, spec: ConversionSpec, state: Optional[Dict[str, Any]], force: bool,
          notes: List[str], info: DistInfo, memory_limit: Optional[int], auto_accum: bool) -> TrainResult:
    run_dir = Path(config.out)
    device = resolve_device(config.device, info)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model.to(device)
    bundle, image_size = prepare_data(model, spec, config.data, config.image_size, device, config.download,
                                       config.skip_bad_images)
    config = dataclasses.replace(config, image_size=image_size)
    task = task_for(spec.task, bundle.num_classes)

    # -- checks that need the model and the data (before anything is written)
    task.check(config)
    _set_bn_momentum(model, config.bn_momentum, notes)
    dtype = amp_dtype(device, config, notes)
    model = sync_batchnorm(model, config, device, info, notes)
    trainable = _recomputing(model, bundle, config, device, notes)  # shares model's parameters
    config = _fit_memory(trainable, bundle, config, device, info, memory_limit, auto_accum, notes, task)
    sampler = _train_sampler(bundle, model, config, info)

    criterion = task.criterion(config)
    optimizer, scheduler = build_optimizer(model, config, spec, notes)
    ema = build_ema(model, config)  # None unless --ema-decay
    scaler = grad_scaler(device, dtype)
    start_epoch, start_step, meters, history, best = resume_training(state, optimizer, scheduler, scaler, info, ema,
                                                                     meters=task.meters(), primary=task.primary)

    # -- the run directory (rank 0), then the model wrappers
    run_on_main(lambda: check_checkpoint_space(run_dir, model, config, "the run's checkpoints"), info)
    run_on_main(lambda: prepare_run_dir(run_dir, config, notes, force=force and state is None), info)
    columns = task.columns(ema is not None)
    log = MetricsLog(run_dir, history, columns=columns) if info.is_main else None
    progress = Progress(enabled=info.is_main)
    for note in notes:
        progress.log(f"note: {note}")
    running, ddp = wrap_model(trainable, config, device, info)
    trainer = Trainer(running, criterion, optimizer, scheduler, _train_loader(bundle, sampler, config, device, task),
                      sampler, device, config, progress, scaler=scaler, info=info,
                      val_loader=eval_loader(bundle.val, max(1, config.batch_size // info.world_size), config.workers,
                                             device, info, collate=task.collate),
                      no_sync=ddp.no_sync if ddp is not None else None, ema=ema,
                      mix=build_mix(config, bundle.num_classes), task=task)

    reseeded = seed_process(config.seed, info, saved_rng(state), start_epoch * sampler.steps_per_epoch + start_step)
    if reseeded:
        progress.log(reseeded)
    control = StopControl()
    result = TrainResult(str(run_dir), start_epoch, config.epochs, notes=notes,
                         final=history[-1] if history else None, best_top1=best.get("top1"), best_epoch=best["epoch"],
                         task=task.name, best_metric=task.primary, best_value=best.get(task.primary))
    recorder = RunRecorder(run_dir, spec, model, config, optimizer, scheduler, scaler, info, progress, log, history,
                           best, result, ema=ema, task=task)
    try:
        with stop_on_signals(control):
            stopped_at = run_epochs(trainer, recorder, start_epoch=start_epoch, start_step=start_step, meters=meters,
                                    control=control)
        if stopped_at is not None:
            result.interrupted, result.stopped_at = True, stopped_at
    except NonFiniteLoss as e:
        raise _diverged(e, run_dir, optimizer) from None
    finally:
        if log is not None:
            log.close()
    return result


# --- helpers ---------------------------------------------------------------------------------------


def _resume_config(saved: TrainConfig, data: str, recipe: Optional[str], flags: Dict[str, Any]) -> Tuple[TrainConfig, List[str]]:
    """The saved config, with the flags a resumed run may change; any other flag that differs is an error."""
    given = {k: v for k, v in flags.items() if v is not None}
    if recipe is not None:
        given["recipe"] = recipe
    if data is not None:
        given["data"] = data
    changes, notes = {}, []
    for key, value in given.items():
        old = getattr(saved, key)
        if key == "amp_dtype":
            value = {"bf16": "bfloat16", "fp16": "float16"}.get(value, value)
        if value == old:
            continue
        if key not in RESUME_MUTABLE:
            flag = key if key in FILE_ONLY else FLAGS.get(key, "--" + key.replace("_", "-"))
            raise BadInputError(
                f"the run was started with {flag} {old}; --resume continues it unchanged, so drop {flag} "
                "(or start over with --force)"
            )
        changes[key] = value
        notes.append(f"resumed with {key} {old} -> {value}")
    config = dataclasses.replace(saved, **changes)
    check_config(config)
    return config, notes


def _check_reused_layers(config: TrainConfig, spec: ConversionSpec, checkpoint: str) -> None:
    """Bad input when the reused layers would learn slower than the new ones (the finetune
    recipe's backbone_lr_scale) while they are random: a torchvision model converted without
    --weights whose checkpoint is no trained run's (best.pt, last.pt and ema.pt hold the run's
    ``config``). A user's module may hold trained weights the spec does not know of: not refused."""
    scale = config.backbone_lr_scale
    if scale >= 1 or spec.weights or not isinstance(spec.source, (TorchvisionSource, TimmSource)):
        return
    saved = read_checkpoint(checkpoint)
    if "config" in saved or "history" in saved:
        return
    what = (f"--recipe {config.recipe}" if RECIPES.get(config.recipe, {}).get("backbone_lr_scale") == scale
            else f"backbone_lr_scale {scale:g}")
    raise BadInputError(
        f"{what} trains the reused layers at {scale:g}x the learning rate, but {checkpoint} was converted without "
        "--weights and never trained, so they are random and would barely learn; convert with "
        f"`gfgp convert {spec.source.describe()} --weights {_pretrained_weights(spec)} ...` to fine-tune, or train "
        "from scratch with --recipe paper-resnet (or paper-vgg)"
    )


def _default_recipe(spec: ConversionSpec) -> str:
    """finetune for models converted with pretrained weights; else paper-vgg for VGG models and
    paper-resnet for the rest (docs/method.md section 5)."""
    if spec.weights:
        return "finetune"
    name = spec.source.name if isinstance(spec.source, (TorchvisionSource, TimmSource)) else ""
    return "paper-vgg" if name.lower().startswith("vgg") else "paper-resnet"


def _pretrained_weights(spec: ConversionSpec) -> str:
    """The ``--weights`` value that loads the source's own pretrained weights."""
    from ..sources import PRETRAINED

    return PRETRAINED if isinstance(spec.source, TimmSource) else "DEFAULT"


def _recomputing(model: nn.Module, bundle: DataBundle, config: TrainConfig, device: torch.device,
                 notes: List[str]) -> nn.Module:
    """The module to train: ``model``, or with --activation-checkpointing a split of it whose
    full-resolution stage is recomputed in the backward pass (:mod:`.recompute`)."""
    if not getattr(config, "activation_checkpointing", False):
        return model
    example = bundle.train[0][0].unsqueeze(0).to(device)
    trainable, note = checkpoint_full_resolution(model, example)
    notes.append(note)
    return trainable


def _fit_memory(model: nn.Module, bundle: DataBundle, config: TrainConfig, device: torch.device, info: DistInfo,
                memory_limit: Optional[int], auto_accum: bool, notes: List[str], task: Optional[Task] = None) -> TrainConfig:
    """The config with the accumulation steps that make one micro-batch fit in memory (chosen
    when ``auto_accum``, else checked): every rank measures, the largest choice wins."""
    if config.batch_size % (info.world_size * (1 if auto_accum else config.accum_steps)):
        return config  # _train_sampler says what is wrong
    min_micro = 2 if _has_batchnorm(model) and not config.sync_bn else 1
    per_process = config.batch_size // info.world_size
    if per_process // (1 if auto_accum else config.accum_steps) < min_micro:
        return config  # _train_sampler says what is wrong
    batch = max(min_micro, min(MEASURE_BATCH, per_process // (1 if auto_accum else config.accum_steps)))
    try:
        task = task if task is not None else Task()
        images, labels = task.collate([bundle.train[i % len(bundle.train)] for i in range(batch)])
        factor = (2 if getattr(config, "opt", "sgd") == "adamw" else int(config.momentum > 0))
        factor += int(bool(getattr(config, "ema_decay", 0)))
        memory = measure_step(model, images, labels, device, config, factor, task=task)
        available, where = available_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), memory_limit)
        choice: Tuple[Optional[int], Optional[str]] = plan_micro_batches(
            memory, available, where, config.batch_size, info.world_size, None if auto_accum else config.accum_steps,
            min_micro)
    except BadInputError as e:
        choice = (None, str(e))
    choices = all_gather_object(choice, info)
    failed = [message for accum, message in choices if accum is None]
    if failed:
        raise BadInputError(failed[0] if choice[0] is None or not info.enabled else f"another rank: {failed[0]}")
    accum = max(a for a, _ in choices if a is not None)
    note = next((message for a, message in choices if a == accum and message), None)
    if note is not None and accum != config.accum_steps:
        notes.append(note)
    return dataclasses.replace(config, accum_steps=accum)


def _train_sampler(bundle: DataBundle, model: nn.Module, config: TrainConfig, info: DistInfo) -> ResumableSampler:
    """The training order of this process; bad input when an epoch has no full batch, or when a
    micro-batch of one image would break BatchNorm."""
    sampler = ResumableSampler(len(bundle.train), config.batch_size, info.world_size, info.rank,
                               config.accum_steps, seed=config.seed)
    if sampler.steps_per_epoch < 1:
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
    return sampler


def _train_loader(bundle: DataBundle, sampler: ResumableSampler, config: TrainConfig, device: torch.device,
                  task: Task) -> DataLoader:
    # Its own generator: iterating it draws nothing from the global RNG, which dropout uses and
    # resume restores.
    return DataLoader(SeededSamples(bundle.train), batch_size=sampler.micro_batch, sampler=sampler,
                      num_workers=config.workers, pin_memory=device.type == "cuda", drop_last=True,
                      generator=torch.Generator(), worker_init_fn=ignore_sigint, collate_fn=task.collate)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _set_bn_momentum(model: nn.Module, momentum: Optional[float], notes: List[str]) -> None:
    """--bn-momentum: every BatchNorm layer's running statistics move by ``momentum`` per training
    batch for this run (an attribute, not in the state_dict: a resumed run sets it again from its
    config). Says which momenta it replaced."""
    if momentum is None:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        notes.append("--bn-momentum has no effect: the model has no BatchNorm layer")
        return
    before = sorted({m.momentum for m in norms}, key=lambda v: (v is None, v or 0.0))
    for m in norms:
        m.momentum = momentum
    notes.append(f"--bn-momentum {momentum:g} in {len(norms)} BatchNorm layers (the model's: "
                 f"{', '.join('cumulative' if v is None else f'{v:g}' for v in before)})")


def _diverged(e: NonFiniteLoss, run_dir: Path, optimizer: torch.optim.Optimizer) -> WorkFailedError:
    """The error (exit 1) of a run whose loss became NaN/Inf; the model was not updated by it."""
    kept = f"{run_dir / LAST} keeps the last good state" if (run_dir / LAST).exists() else "no checkpoint was written"
    return WorkFailedError(
        f"training diverged: the loss became {e.value} at epoch {e.epoch + 1} step {e.step + 1} (lr "
        f"{max(g['lr'] for g in optimizer.param_groups):.4g}); stopped before updating the model, {kept}; "
        "lower --lr or disable --amp"
    )
