"""The run folder of ``gfgp train`` and what a run reports.

- :func:`hold_run_dir`: the run folder's lock (one training per folder; a stale lock of a killed
  run is taken over) and the removal of temporary files a killed write left;
- :data:`RUN_FILES` and :func:`prepare_run_dir` (create, clear with --force, write config.json);
- :class:`TrainResult`, what :func:`~gfgp_cli.train.loop.train` returns;
- :class:`RunRecorder`, the epoch driver's hooks for a training run: last.pt at the points the
  driver picks, best.pt, one metrics row per epoch (metrics.csv/jsonl, TensorBoard), the epoch
  line on stderr, and the result.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .._io import atomic_write_text, check_free_space, ensure_writable_dir, format_bytes, remove_stale_temp_files
from ..errors import BadInputError, DiskFullError
from ..spec import ConversionSpec
from .config import TrainConfig
from .distributed import DistInfo, all_gather_object, run_on_main
from .engine import EpochEnd, EpochHooks
from .metrics import Meters, MetricsLog, Progress
from .state import BEST, LAST, process_state, promote_to_best, save_ema_checkpoint, save_run_checkpoint
from .tasks import Task

__all__ = ["RUN_FILES", "LOCK", "TrainResult", "hold_run_dir", "prepare_run_dir", "RunRecorder",
           "check_checkpoint_space", "checkpoint_size_estimate"]

# Files a run writes; a folder holding any of them is an existing run.
RUN_FILES = (LAST, BEST, "ema.pt", "config.json", "metrics.csv", "metrics.jsonl")
# The lock file of a run folder: held (flock) by the one process training into it; it records who.
LOCK = ".gfgp-train.lock"


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, notes: List[str]) -> Iterator[None]:
    """Hold ``run_dir`` for one training run: take its lock, remove stale temporary files.

    The lock is an ``flock`` on RUN_DIR/.gfgp-train.lock, so the kernel releases it when the
    holder exits in any way (SIGKILL included): a lock file left by a killed run is stale and is
    taken over (a note says so). While another process holds it, BadInputError (exit 2) names
    that process (pid, host, start time, command). On file systems where ``flock`` is not
    shared, a holder on this host that is still alive is refused by its pid. The folder is
    created if missing, and removed again at the end if the run wrote nothing into it.

    Temporary files (``.last.pt.*.tmp`` ...) left by a process killed during a write are
    removed once the lock is held: no other process can be writing them.
    """
    created = not run_dir.exists()
    ensure_writable_dir(run_dir, "the run directory")
    path = run_dir / LOCK
    fd = _lock(path)
    try:
        previous = _holder(fd)
        if previous and _alive_here(previous):
            raise BadInputError(_in_use(run_dir, previous))
        if previous:
            notes.append(f"took over the stale lock of pid {previous.get('pid')} on {previous.get('host')} "
                         f"(started {previous.get('started')}), which no longer runs")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["gfgp", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        count, size = remove_stale_temp_files(run_dir, RUN_FILES)
        if count:
            notes.append(f"removed {count} temporary file(s) ({format_bytes(size)}) left by an interrupted write")
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still held: a process waiting on the old file re-checks the inode
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: a run that wrote nothing leaves no folder


def _lock(path: Path) -> int:
    """An fd of ``path`` holding its exclusive flock (the file is re-created when the holder we
    waited on removed it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BadInputError(_in_use(path.parent, holder)) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file after we opened it: take the new one


def _holder(fd: int) -> Dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive_here(holder: Dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(run_dir: Path, holder: Dict[str, Any]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
           f"{holder.get('command')}") if holder else "another process"
    return (f"{run_dir} is in use by another training run ({who}); wait for it to finish or stop it, "
            "or choose another --out")


def checkpoint_size_estimate(run_dir: Path, model: nn.Module, config: Optional[TrainConfig] = None) -> int:
    """Bytes the next last.pt (and ema.pt) will take: the current files' size, else the model's
    weights, the optimizer's buffers (one per parameter for SGD with momentum, two for AdamW), the
    EMA copy and its ema.pt, plus 1 MiB of training state."""
    last = run_dir / LAST
    if last.exists():
        ema = run_dir / "ema.pt"
        return last.stat().st_size + (ema.stat().st_size if ema.exists() else 0)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = 2 if config is not None and config.opt == "adamw" else int(config is None or config.momentum > 0)
    copies = 1 + (2 if config is not None and config.ema_decay else 0)  # the model, and the EMA in last.pt and ema.pt
    return copies * weights + buffers * params + (1 << 20)


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
    task: str = "classification"  # the task's losses and metrics (.tasks)
    best_metric: str = "top1"  # the validation metric best.pt follows
    best_value: Optional[float] = None  # its best value (best_top1 for a classifier)


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
                 history: List[Dict[str, Any]], best: Dict[str, Any], result: TrainResult,
                 ema: Optional[AveragedModel] = None, task: Optional[Task] = None) -> None:
        self.run_dir, self.spec, self.model, self.config = run_dir, spec, model, config
        self.task = task if task is not None else Task()
        self.ema = ema  # the EMA model (optim.build_ema): saved in last.pt and as ema.pt, its metrics in the rows
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
            try:
                save_run_checkpoint(self.run_dir, self.spec, self.model.state_dict(), config=self.config,
                                    epoch=epoch, step=step, optimizer=self.optimizer, scheduler=self.scheduler,
                                    scaler=self.scaler, per_rank=per_rank, history=self.history, best=self.best,
                                    ema_state_dict=None if self.ema is None else self.ema.module.state_dict())
            except DiskFullError as e:
                raise DiskFullError(f"no space left on device writing {e.path}; {self._kept()}", path=e.path) from e

    def finished(self, end: EpochEnd) -> None:
        # The row and the best epoch go into the epoch-end checkpoint, so they are recorded first.
        train_m, val_m = end.train, end.val
        self._row = {"epoch": end.epoch + 1, "lr": max(end.lrs), "lrs": end.lrs, **self.task.row(train_m, val_m),
                     "images_per_s": round(end.images_per_s, 1),
                     "epoch_time_s": round(time.perf_counter() - end.started, 3)}
        if end.ema_val is not None:
            self._row.update(self.task.ema_row(end.ema_val))
        self.history.append(self._row)
        key = self.task.primary
        value = val_m[key]
        self._improved = self.best.get(key) is None or value > self.best[key]
        if self._improved:
            self.best = {"epoch": end.epoch + 1, key: value}

    def saved(self, end: EpochEnd) -> None:
        # best.pt and the metrics files only ever point at a checkpoint already on disk.
        row = self._row
        if self.info.is_main:
            if self._improved:
                promote_to_best(self.run_dir)
            if self.ema is not None:
                try:
                    save_ema_checkpoint(self.run_dir, self.spec, self.ema.module.state_dict(), config=self.config,
                                        epoch=end.epoch + 1)
                except DiskFullError as e:
                    raise DiskFullError(f"no space left on device writing {e.path}; {self._kept()}", path=e.path) from e
            self.log.append(row)
        self.progress.log(
            f"epoch {end.epoch + 1}/{self.config.epochs}  lr {row['lr']:.4g}  {self.task.epoch_text(row)}  "
            f"{end.images_per_s:.0f} img/s  {row['epoch_time_s']:.1f} s"
        )
        self.result.epochs, self.result.final = end.epoch + 1, row
        self.result.best_top1, self.result.best_epoch = self.best.get("top1"), self.best["epoch"]
        self.result.best_value = self.best.get(self.task.primary)
        if end.epoch + 1 < self.config.epochs:
            run_on_main(lambda: self.check_space(f"the checkpoint of epoch {end.epoch + 2}"), self.info)

    def check_space(self, what: str) -> None:
        check_checkpoint_space(self.run_dir, self.model, self.config, what)

    def _kept(self) -> str:
        return _space_advice(self.run_dir, self.config)


def check_checkpoint_space(run_dir: Path, model: nn.Module, config: TrainConfig, what: str) -> None:
    """Refuse (DiskFullError, exit 1) to go on when the next last.pt could not be written: its
    temporary file needs the full size while the old last.pt is still there. Run before the
    first epoch and after every epoch, so that a full disk costs no epoch of work."""
    check_free_space(run_dir, checkpoint_size_estimate(run_dir, model, config), what, advice=_space_advice(run_dir, config))


def _space_advice(run_dir: Path, config: TrainConfig) -> str:
    last = run_dir / LAST
    if not last.exists():
        return "free some space and start the run again"
    return (f"{last} ({format_bytes(last.stat().st_size)}) is intact; free some space and continue with "
            f"`gfgp train --resume {run_dir}`")
