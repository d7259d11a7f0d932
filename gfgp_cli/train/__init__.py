"""Training, evaluation and plots for converted models (``gfgp train``, ``gfgp eval``, ``gfgp plot``).

- :mod:`.config`: the frozen :class:`TrainConfig`, the paper's recipes and the LR schedules.
- :mod:`.data`: ``--data SPEC`` (ImageFolder, CIFAR, scikit-learn digits, FakeData) and the
  resumable, sharded sampler.
- :mod:`.loop`: :func:`train_one_epoch`, :func:`evaluate`, :func:`main`, :func:`train`,
  :func:`evaluate_checkpoint`.
- :mod:`.state`: what a run checkpoint holds so that ``--resume`` is exact.
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
