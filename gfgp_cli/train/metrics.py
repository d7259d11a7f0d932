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
from typing import Any, Dict, List, Optional, Sequence, Tuple

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

    def running(self) -> Dict[str, float]:
        """The running metrics the progress shows."""
        n = max(self.count, 1)
        return {"loss": self.loss_sum / n, "top1": 100.0 * self.correct1 / n}

    def restored(self, states: List[Dict[str, Any]]) -> "Meters":
        """Meters holding the sum of saved :meth:`state` s (one per rank of a saved run)."""
        total = type(self)()
        for m in states:
            for key, value in m.items():
                setattr(total, key, getattr(total, key) + value)
        return total


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
    """Progress of a run on stderr, with the time left (ETA) in the epoch and in the whole run.

    On a terminal: a rich bar for each epoch's training and for its validation (transient; the
    epoch's summary line stays). Elsewhere (a pipe, a log file): plain lines, one at the end of
    each epoch's training and in between at most ``lines_per_epoch`` per phase (at every
    1/lines_per_epoch of it), none sooner than ``min_interval_s`` after the last, so a log gets the
    same numbers without a line per step::

        epoch 2/5 22/22  loss 0.9  top1 71.4  1412 img/s  ETA epoch 0:00:01 run 0:00:09

    The epoch's ETA covers its remaining steps and its validation (as long as the last epoch's
    took); the run's adds the epochs left at this pace. Nothing is printed when ``enabled`` is
    False (ranks other than 0). ``terminal`` (default: whether ``console`` is one) chooses the
    display; ``console`` defaults to gfgp's stderr console.
    """

    def __init__(self, enabled: bool = True, lines_per_epoch: int = 10, *, terminal: Optional[bool] = None,
                 console: Any = None, min_interval_s: float = 10.0) -> None:
        if console is None:
            from ..console import err as console
        self.console = console
        self.enabled = enabled
        self.rich = enabled and (console.is_terminal if terminal is None else terminal)
        self.lines_per_epoch = max(1, lines_per_epoch)
        self.min_interval_s = min_interval_s
        self._bar: Any = None  # the rich display of the phase, and its rows
        self._task: Any = None
        self._run_task: Any = None
        # the phase running: "train" (an epoch's steps) or "val"; its steps or batches
        self._phase, self._name, self._label = "train", "", ""
        self._total = self._done = self._first = 0
        self._t0 = self._last_line = 0.0
        self._images = 0
        self._running = False
        self._train_rate = 0.0
        # what the ETAs are made of
        self._epoch: Optional[int] = None  # 0-based epoch being run (None: not told, no run ETA)
        self._epochs: Optional[int] = None
        self._steps = 0  # training steps per epoch
        self._step_s: Optional[float] = None  # seconds per training step (this epoch's pace, else the last's)
        self._batch_s: Optional[float] = None  # seconds per validation batch
        self._val_s: Optional[float] = None  # seconds the last epoch's validation took, all its phases
        self._val_s_epoch = 0.0  # this epoch's finished validation phases

    # -- phases -------------------------------------------------------------------------------

    def start(self, label: str, total: int, done: int = 0, *, epoch: Optional[int] = None,
              epochs: Optional[int] = None) -> None:
        """An epoch's training, ``label`` (e.g. "epoch 2/5"): ``total`` steps, ``done`` of them
        already (a resumed epoch). ``epoch`` (0-based) of ``epochs`` gives the run's ETA."""
        if self._val_s_epoch:
            self._val_s, self._val_s_epoch = self._val_s_epoch, 0.0
        self._label, self._steps, self._epoch, self._epochs = label, total, epoch, epochs
        self._begin("train", "", total, done)

    def start_validation(self, total: int, name: str = "val") -> None:
        """A validation (``total`` batches) of the epoch last started, shown as "<label> <name>"."""
        self._begin("val", name, total, 0)

    def _begin(self, phase: str, name: str, total: int, done: int) -> None:
        self._phase, self._name, self._total, self._done, self._first = phase, name, total, done, done
        self._t0 = self._last_line = time.perf_counter()
        self._images, self._running = 0, True
        if not self.rich:
            return
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress
        from rich.table import Column

        # Two rows: the phase's (steps, running metrics, its epoch's ETA) and the run's (epochs, ETA).
        self._bar = RichProgress(TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                                 BarColumn(bar_width=16), TextColumn("{task.fields[count]}"),
                                 TextColumn("{task.fields[info]}"), TextColumn("{task.fields[eta]}"),
                                 console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self._where(), total=total, completed=done, count=f"{done}/{total}", info="",
                                        eta="")
        self._run_task = None
        if self._epoch is not None and self._epochs is not None:
            self._run_task = self._bar.add_task("run", total=self._epochs * max(self._steps, 1), count="", info="",
                                                eta="")
            self._show_run(done)

    def _show_run(self, done: int) -> None:
        """The run's row: epochs finished of all, and the run's ETA."""
        if self._run_task is None:
            return
        steps = max(self._steps, 1)
        finished = self._epoch * steps + (done if self._phase == "train" else steps)
        run = self.eta()[1]
        self._bar.update(self._run_task, completed=finished, count=f"{self._epoch}/{self._epochs} epochs",
                         eta="" if run is None else f"ETA {_clock(run)}")

    def update(self, done: int, images: int, info: Dict[str, float]) -> None:
        """``done`` steps (validation: batches) of the phase finished, with ``images`` more images;
        ``info``: running metrics to show."""
        now = time.perf_counter()
        self._images += images
        self._done = done
        if done > self._first:
            pace = (now - self._t0) / (done - self._first)
            if self._phase == "train":
                self._step_s = pace
            else:
                self._batch_s = pace
        if not self.enabled:
            return
        rate = self._images / max(now - self._t0, 1e-9)
        text = "  ".join([f"{k} {v:.4g}" for k, v in info.items()] + [f"{rate:.0f} img/s"])
        if self._bar is not None:
            epoch = self.eta()[0]
            self._bar.update(self._task, completed=done, count=f"{done}/{self._total}", info=text,
                             eta="" if epoch is None else f"ETA {_clock(epoch)}")
            self._show_run(done)
            return
        every = max(1, self._total // self.lines_per_epoch)
        end_of_training = self._phase == "train" and done == self._total
        if end_of_training or (done % every == 0 and now - self._last_line >= self.min_interval_s):
            self._last_line = now
            eta = self.eta_text()
            self.console.print(f"{self._where()} {done}/{self._total}  {text}" + (f"  {eta}" if eta else ""),
                               markup=False)

    def stop(self) -> None:
        """The phase ended (or an error stopped it); safe to call twice."""
        if self._running:
            seconds = time.perf_counter() - self._t0
            if self._phase == "train":
                self._train_rate = self._images / max(seconds, 1e-9)
            else:
                self._val_s_epoch += seconds
            self._running = False
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def images_per_s(self) -> float:
        """Training images per second of the epoch's steps (those run so far while they run)."""
        if self._running and self._phase == "train":
            return self._images / max(time.perf_counter() - self._t0, 1e-9)
        return self._train_rate

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False)

    def _where(self) -> str:
        return f"{self._label} {self._name}" if self._name else self._label

    # -- time left ----------------------------------------------------------------------------

    def eta(self) -> Tuple[Optional[float], Optional[float]]:
        """``(epoch, run)``: seconds left in the epoch (its validation included) and in the run;
        None where not known yet (before the first step; the run's without ``epochs``)."""
        if self._step_s is None:
            return None, None
        left = max(self._total - self._done, 0)
        if self._phase == "train":
            val = self._val_estimate()
            epoch = left * self._step_s + val
        else:
            val = self._val_estimate()
            # this phase's batches left, or what the last epoch's validation had left at this point
            # (an EMA model's validation may follow)
            spent = self._val_s_epoch + time.perf_counter() - self._t0
            epoch = max(left * (self._batch_s or 0.0), val - spent)
        if self._epoch is None or self._epochs is None:
            return epoch, None
        later = max(self._epochs - self._epoch - 1, 0)
        return epoch, epoch + later * (self._steps * self._step_s + val)

    def eta_text(self) -> str:
        """"ETA epoch h:mm:ss run h:mm:ss" (empty before the first step)."""
        epoch, run = self.eta()
        if epoch is None:
            return ""
        return f"ETA epoch {_clock(epoch)}" + (f" run {_clock(run)}" if run is not None else "")

    def _val_estimate(self) -> float:
        """Seconds of one epoch's validation: the last epoch's; during the first, this one's
        phases so far with the running one at its pace; 0 before any."""
        if self._val_s is not None:
            return self._val_s
        if self._phase == "val" and self._batch_s is not None:
            return self._val_s_epoch + self._total * self._batch_s
        return self._val_s_epoch


def _clock(seconds: float) -> str:
    """h:mm:ss, as rich shows times."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
