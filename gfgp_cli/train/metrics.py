"""Metrics: top-k counts, an epoch's running sums, the per-epoch log files and the progress display.

Files in the run directory (rank 0 only): ``metrics.csv`` and ``metrics.jsonl`` (one row per
epoch, rebuilt from the checkpoint's history on resume, so an interrupted epoch never appears
twice) and TensorBoard event files under ``tb/`` when tensorboard is installed.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from .._io import atomic_write_text

__all__ = ["topk_correct", "Meters", "MetricsLog", "Progress", "METRIC_COLUMNS", "EMA_COLUMNS"]

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                  "images_per_s", "epoch_time_s")
EMA_COLUMNS = ("ema_val_loss", "ema_val_top1", "ema_val_top5")  # runs with --ema-decay


def topk_correct(output: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[int]:
    """Number of samples whose target is among the k highest scores, for each k (k capped at the
    number of classes)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # Tensor[N, maxk]
    hit = pred.eq(target[:, None])
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@dataclass
class Meters:
    """Running sums over an epoch (per process; :meth:`totals` is what gets reduced)."""

    loss_sum: float = 0.0
    correct1: int = 0
    correct5: int = 0
    count: int = 0

    def update(self, loss: float, output: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        c1, c5 = topk_correct(output.detach(), target)
        self.loss_sum += loss * n
        self.correct1 += c1
        self.correct5 += c5
        self.count += n

    def totals(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.correct1, self.correct5, self.count], dtype=torch.float64)

    @staticmethod
    def summary(totals: torch.Tensor) -> Dict[str, float]:
        """loss (mean) and top-1/top-5 accuracy (percent) from summed totals."""
        loss_sum, c1, c5, n = totals.tolist()
        n = max(n, 1.0)
        return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": int(totals[3])}

    def state(self) -> Dict[str, Any]:
        return asdict(self)


class MetricsLog:
    """metrics.csv + metrics.jsonl (+ TensorBoard when installed), one row per finished epoch."""

    def __init__(self, run_dir: Path, history: List[Dict[str, Any]], tensorboard: bool = True,
                 columns: Sequence[str] = METRIC_COLUMNS) -> None:
        self.run_dir, self.columns = Path(run_dir), tuple(columns)
        self._rewrite(history)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step drops events a killed run logged past its last checkpoint
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=len(history) + 1)

    def _rewrite(self, history: List[Dict[str, Any]]) -> None:
        for name, text in (("metrics.csv", self._csv(history)), ("metrics.jsonl", self._jsonl(history))):
            atomic_write_text(self.run_dir / name, text)

    def _csv(self, rows: List[Dict[str, Any]]) -> str:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    @staticmethod
    def _jsonl(rows: List[Dict[str, Any]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    def append(self, row: Dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n").writerow(row)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Per-epoch progress on stderr: rich bars on a terminal, a few plain log lines otherwise.

    Silent on ranks other than 0.
    """

    def __init__(self, enabled: bool = True, lines_per_epoch: int = 4) -> None:
        from ..console import err

        self.console = err
        self.enabled = enabled
        self.rich = enabled and err.is_terminal
        self.lines_per_epoch = lines_per_epoch
        self._bar = None
        self._task = None
        self._t0 = 0.0
        self._images = 0

    def start(self, label: str, total: int, done: int = 0) -> None:
        self._label, self._total, self._t0, self._images = label, total, time.perf_counter(), 0
        if not self.enabled:
            return
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=done, info="")

    def update(self, done: int, images: int, info: Dict[str, float]) -> None:
        self._images += images
        if not self.enabled:
            return
        rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
        text = "  ".join(f"{k} {v:.4g}" for k, v in info.items()) + f"  {rate:.0f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=text)
        elif done == self._total or done % max(1, self._total // self.lines_per_epoch) == 0:
            self.console.print(f"{self._label} {done}/{self._total}  {text}", markup=False)

    def images_per_s(self) -> float:
        return self._images / max(time.perf_counter() - self._t0, 1e-9)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False)
