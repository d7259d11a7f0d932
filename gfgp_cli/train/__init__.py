"""Training, evaluation and plots for converted models (``gfgp train``, ``gfgp eval``, ``gfgp plot``).

- :mod:`.config`: the frozen :class:`TrainConfig`, the paper's recipes and the LR schedules.
- :mod:`.data`: ``--data SPEC`` (ImageFolder, CIFAR, scikit-learn digits, cluttered digits,
  FakeData; moving-digit clips for video models) and the resumable, sharded sampler.
- :mod:`.loop`: :func:`train` and :func:`main`, which put the pieces below together.
- :mod:`.engine`: :func:`train_one_epoch` and the epoch driver (shared with ``gfgp study``).
- :mod:`.optim`: the optimizer, its parameter groups and the LR schedule.
- :mod:`.runtime`: signals, seeding, determinism, devices, autocast, model wrappers.
- :mod:`.evaluation`: :func:`evaluate` and :func:`evaluate_checkpoint` (``gfgp eval``).
- :mod:`.rundir`: the run folder, the per-epoch checkpoints and metrics, :class:`TrainResult`.
- :mod:`.state`: what a run checkpoint holds so that ``--resume`` is exact (written and read there only).
- :mod:`.distributed`: torchrun / DDP plumbing.
- :mod:`.metrics`: top-k, metrics.csv/jsonl, TensorBoard, progress.
- :mod:`.plots`: PNG curves and the lam distribution of every GFGP layer.
"""

from .config import RECIPES, TrainConfig, lr_factor, resolve_config
from .data import DataBundle, load_data
from .loop import TrainResult, evaluate, evaluate_checkpoint, main, train, train_one_epoch
from .plots import collect_lam, plot_run

__all__ = [
    "RECIPES", "TrainConfig", "lr_factor", "resolve_config", "DataBundle", "load_data", "TrainResult", "evaluate",
    "evaluate_checkpoint", "main", "train", "train_one_epoch", "collect_lam", "plot_run",
]
