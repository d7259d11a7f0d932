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

Everything is tensors and plain values, so it loads with ``weights_only=True``. Files are written
with :func:`gfgp_cli.checkpoint.write_checkpoint` (temp file, fsync, rename); ``best.pt`` is a
hard link to the ``last.pt`` it equals, swapped in atomically too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import torch

from ..checkpoint import write_checkpoint
from ..spec import ConversionSpec

__all__ = ["capture_rng", "restore_rng", "save_run_checkpoint", "promote_to_best", "LAST", "BEST"]

LAST, BEST = "last.pt", "best.pt"


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


def save_run_checkpoint(run_dir: Path, spec: ConversionSpec, state_dict: Dict[str, Any], training: Dict[str, Any]) -> Path:
    """Atomically write the model (``spec``, ``state_dict``) and its ``training`` state to RUN_DIR/last.pt."""
    return write_checkpoint(Path(run_dir) / LAST, spec, state_dict, **training)


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
        from ..checkpoint import read_checkpoint

        data = read_checkpoint(last)
        rest = {k: v for k, v in data.items() if k not in ("format", "version", "spec", "state_dict")}
        write_checkpoint(best, data["spec"], data["state_dict"], **rest)
    return best
