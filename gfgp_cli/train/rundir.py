"""The run folder of ``gfgp train`` and what a run reports.

- :data:`RUN_FILES` and :func:`prepare_run_dir` (create, clear with --force, write config.json);
- :class:`TrainResult`, what :func:`~gfgp_cli.train.loop.train` returns;
- :class:`RunRecorder`, the epoch driver's hooks for a training run: last.pt at the points the
  driver picks, best.pt, one metrics row per epoch (metrics.csv/jsonl, TensorBoard), the epoch
  line on stderr, and the result.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._io import atomic_write_text, ensure_writable_dir
from ..spec import ConversionSpec
from .config import TrainConfig
from .distributed import DistInfo, all_gather_object
from .engine import EpochEnd, EpochHooks
from .metrics import Meters, MetricsLog, Progress
from .state import BEST, LAST, process_state, promote_to_best, save_run_checkpoint

__all__ = ["RUN_FILES", "TrainResult", "prepare_run_dir", "RunRecorder"]

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


def prepare_run_dir(run_dir: Path, config: TrainConfig, notes: List[str], force: bool) -> None:
    """Create the run folder, prove it is writable, clear an old run (--force), record the config."""
    ensure_writable_dir(run_dir, "the run directory")
    if force:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    text = json.dumps({**config.to_dict(), "notes": notes}, indent=2) + "\n"
    atomic_write_text(run_dir / "config.json", text)


class RunRecorder(EpochHooks):
    """Checkpoints, metrics and the result of one training run (see the module docstring).

    Its trainer evaluates every epoch (has a val_loader): a row needs the validation metrics.
    ``history`` and ``best`` are the run's so far (restored on resume); ``log`` is None on ranks
    other than 0, which write nothing.
    """

    def __init__(self, run_dir: Path, spec: ConversionSpec, model: nn.Module, config: TrainConfig,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler, info: DistInfo, progress: Progress, log: Optional[MetricsLog],
                 history: List[Dict[str, Any]], best: Dict[str, Any], result: TrainResult) -> None:
        self.run_dir, self.spec, self.model, self.config = run_dir, spec, model, config
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.info, self.progress, self.log = info, progress, log
        self.history, self.best, self.result = history, best, result
        self._row: Dict[str, Any] = {}
        self._improved = False

    def save(self, epoch: int, step: int, meters: Meters) -> None:
        # Every rank's generators and partial sums go into the checkpoint (collective: all ranks
        # call save at the same points); rank 0 writes.
        per_rank = all_gather_object(process_state(meters), self.info)
        if self.info.is_main:
            save_run_checkpoint(self.run_dir, self.spec, self.model.state_dict(), config=self.config, epoch=epoch,
                                step=step, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                                per_rank=per_rank, history=self.history, best=self.best)

    def finished(self, end: EpochEnd) -> None:
        # The row and the best epoch go into the epoch-end checkpoint, so they are recorded first.
        train_m, val_m = end.train, end.val
        self._row = {"epoch": end.epoch + 1, "lr": max(end.lrs), "lrs": end.lrs,
                     "train_loss": train_m["loss"], "train_top1": train_m["top1"], "train_top5": train_m["top5"],
                     "val_loss": val_m["loss"], "val_top1": val_m["top1"], "val_top5": val_m["top5"],
                     "images_per_s": round(end.images_per_s, 1),
                     "epoch_time_s": round(time.perf_counter() - end.started, 3)}
        self.history.append(self._row)
        self._improved = self.best["top1"] is None or val_m["top1"] > self.best["top1"]
        if self._improved:
            self.best = {"epoch": end.epoch + 1, "top1": val_m["top1"]}

    def saved(self, end: EpochEnd) -> None:
        # best.pt and the metrics files only ever point at a checkpoint already on disk.
        row, train_m, val_m = self._row, end.train, end.val
        if self.info.is_main:
            if self._improved:
                promote_to_best(self.run_dir)
            self.log.append(row)
        self.progress.log(
            f"epoch {end.epoch + 1}/{self.config.epochs}  lr {row['lr']:.4g}  train loss {train_m['loss']:.4f} "
            f"top1 {train_m['top1']:.2f}%  val loss {val_m['loss']:.4f} top1 {val_m['top1']:.2f}% "
            f"top5 {val_m['top5']:.2f}%  {end.images_per_s:.0f} img/s  {row['epoch_time_s']:.1f} s"
        )
        self.result.epochs, self.result.final = end.epoch + 1, row
        self.result.best_top1, self.result.best_epoch = self.best["top1"], self.best["epoch"]
