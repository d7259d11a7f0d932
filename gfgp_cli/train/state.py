"""Training state in gfgp checkpoints: what ``last.pt`` / ``best.pt`` hold so that resume is exact.

A run checkpoint is a gfgp model checkpoint (``spec``, ``state_dict``) plus::

    config      the resolved TrainConfig (dict)
    epoch       0-based epoch to continue
    step        optimizer steps already done in that epoch (0 at an epoch boundary)
    optimizer, scheduler, scaler    their state_dicts
    rng         per process: torch (CPU and every CUDA device), python and numpy generator states
    meters      per process: the epoch's running sums so far (so its train metrics come out the same)
    history     one dict of metrics per finished epoch (metrics.csv/jsonl are rebuilt from it)
    best        {"epoch", "top1"} of the best validation top-1 so far
    ema_state_dict  with --ema-decay: the EMA model's state_dict (the model's keys)

Everything is tensors and plain values, so it loads with ``weights_only=True``. Files are written
with :func:`gfgp_cli.checkpoint.write_checkpoint` (temp file, fsync, rename); ``best.pt`` is a
hard link to the ``last.pt`` it equals, swapped in atomically too. With --ema-decay, ``ema.pt``
(:func:`save_ema_checkpoint`) is a model checkpoint of the EMA weights, for ``gfgp eval`` and
``gfgp export``.

This module is the one place that puts these entries together (:func:`save_run_checkpoint`) and
reads them back (:func:`read_run_checkpoint`, :func:`saved_config`, :func:`rebuild_model`,
:func:`resume_training`, :func:`saved_rng`, :func:`trained_image_size`); the spec itself is
a typed :class:`~gfgp_cli.spec.ConversionSpec` read by :func:`gfgp_cli.checkpoint.read_checkpoint`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..checkpoint import load, read_checkpoint, write_checkpoint
from ..errors import BadInputError
from ..spec import ConversionSpec
from .config import TrainConfig, config_from_dict
from .distributed import DistInfo
from .metrics import Meters

__all__ = ["capture_rng", "restore_rng", "process_state", "save_run_checkpoint", "promote_to_best",
           "read_run_checkpoint", "saved_config", "rebuild_model", "resume_training", "saved_rng",
           "trained_image_size", "save_ema_checkpoint", "LAST", "BEST", "EMA"]

LAST, BEST, EMA = "last.pt", "best.pt", "ema.pt"


def capture_rng() -> Dict[str, Any]:
    """Every random generator a training step may draw from, as tensors and plain values."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


# --- writing ---------------------------------------------------------------------------------------


def process_state(meters: Meters) -> Dict[str, Any]:
    """This process's share of a checkpoint: its generators and the epoch's partial sums (every
    rank's goes in, gathered by the caller)."""
    return {"rng": capture_rng(), "meters": meters.state()}


def save_run_checkpoint(run_dir: Path, spec: ConversionSpec, state_dict: Dict[str, Any], *, config: TrainConfig,
                        epoch: int, step: int, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                        per_rank: List[Dict[str, Any]], history: List[Dict[str, Any]],
                        best: Dict[str, Any], ema_state_dict: Optional[Dict[str, Any]] = None) -> Path:
    """Atomically write the model (``spec``, ``state_dict``) and its training state to
    RUN_DIR/last.pt: the checkpoint's payload (its entries: the module docstring), built here only.
    ``per_rank`` is :func:`process_state` of every rank, in rank order; ``ema_state_dict`` the EMA
    model's (None without one)."""
    ema = {} if ema_state_dict is None else {"ema_state_dict": ema_state_dict}
    return write_checkpoint(Path(run_dir) / LAST, spec, state_dict, **{
        "config": config.to_dict(),
        "epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "rng": [r["rng"] for r in per_rank], "meters": [r["meters"] for r in per_rank],
        "history": history, "best": best, **ema})


def save_ema_checkpoint(run_dir: Path, spec: ConversionSpec, ema_state_dict: Dict[str, Any], *,
                        config: TrainConfig, epoch: int) -> Path:
    """Atomically write RUN_DIR/ema.pt: a model checkpoint of the EMA weights (loadable like any
    gfgp checkpoint), with the run's ``config`` (so ``gfgp eval`` uses the image size it trained
    at) and ``epoch`` (epochs finished) but no state to resume from."""
    return write_checkpoint(Path(run_dir) / EMA, spec, ema_state_dict, config=config.to_dict(), epoch=epoch,
                            ema_decay=config.ema_decay)


def promote_to_best(run_dir: Path) -> Path:
    """Make best.pt the current last.pt: a hard link swapped in by rename (a copy where links fail)."""
    run_dir = Path(run_dir)
    last, best = run_dir / LAST, run_dir / BEST
    tmp = run_dir / f".{BEST}.link.tmp"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(last, tmp)
        os.replace(tmp, best)
    except OSError:
        data = read_checkpoint(last)
        rest = {k: v for k, v in data.items() if k not in ("format", "version", "spec", "state_dict")}
        write_checkpoint(best, data["spec"], data["state_dict"], **rest)
    return best


# --- reading ---------------------------------------------------------------------------------------


def read_run_checkpoint(path: Path) -> Dict[str, Any]:
    """A run's last.pt, read; bad input when it holds a model but no training state."""
    state = read_checkpoint(path)
    if "config" not in state:
        raise BadInputError(f"{path} holds a model but no training state; start a new run with --force")
    return state


def saved_config(state: Dict[str, Any]) -> TrainConfig:
    """The TrainConfig a run checkpoint was written with."""
    return config_from_dict(state["config"])


def rebuild_model(state: Dict[str, Any], module: Optional[nn.Module]) -> nn.Module:
    """The model stored in a (read) run checkpoint; an in-memory ``module`` gets the stored weights."""
    if module is None:
        return load(state)
    module.load_state_dict(state["state_dict"], strict=True)
    return module


def resume_training(state: Optional[Dict[str, Any]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    info: DistInfo, ema: Optional[AveragedModel] = None, meters: Any = None,
                    primary: str = "top1") -> Tuple[int, int, Any, List[Dict[str, Any]], Dict[str, Any]]:
    """``(start_epoch, start_step, meters, history, best)``: those of a new run for ``state``
    None; else the saved ones, with the optimizer, scheduler, scaler and ``ema`` (the
    AveragedModel of --ema-decay, None without one) restored in place. ``meters``: empty meters
    of the run's task (default: classification's :class:`Meters`), ``primary`` the metric best.pt
    follows (``best`` holds its value under that name)."""
    meters = meters if meters is not None else Meters()
    if state is None:
        return 0, 0, meters, [], {"epoch": None, primary: None}
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if "ema_state_dict" not in state:
            raise BadInputError("the run's last.pt holds no EMA weights; it was started without --ema-decay")
        ema.module.load_state_dict(state["ema_state_dict"], strict=True)
    meters = _restore_meters(state["meters"], info, meters)
    return int(state["epoch"]), int(state["step"]), meters, list(state["history"]), dict(state["best"])


def saved_rng(state: Optional[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """Every saved process's generator states (None for a new run)."""
    return None if state is None else state["rng"]


def trained_image_size(data: Dict[str, Any]) -> Optional[int]:
    """The image size a run trained at (None for a checkpoint without training state)."""
    config = data.get("config")
    return config.get("image_size") if isinstance(config, dict) else None


def _restore_meters(saved: List[Dict[str, Any]], info: DistInfo, empty: Any) -> Any:
    """This rank's partial sums (``empty``: the task's meters, whose ``restored`` sums saved
    states); on another world size rank 0 carries the total (the sums are only ever reduced)."""
    if len(saved) == info.world_size:
        return empty.restored([saved[info.rank]])
    if not info.is_main:
        return empty
    return empty.restored(saved)
