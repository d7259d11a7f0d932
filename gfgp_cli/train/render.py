"""Terminal output of ``gfgp train`` / ``gfgp eval`` / ``gfgp plot``: rich tables on stdout, or --json."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from ..console import err, out, print_json, print_table
from .tasks import task_for

__all__ = ["render_train_result", "render_eval", "render_plots"]


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_train_result(result, as_json: bool = False) -> None:
    if as_json:
        print_json(dataclasses.asdict(result))
    else:
        task = task_for(result.task)
        rows = [("run directory", result.run_dir), ("epochs", f"{result.epochs}/{result.total_epochs}")]
        if result.final:
            rows += task.summary_rows(result.final)
        if result.best_value is not None:
            rows.append((f"best val {task.primary_label}", f"{result.best_value:.2f} (epoch {result.best_epoch})"))
        print_table("gfgp train", ["", "value"], rows)
    if result.interrupted:
        epoch, step = result.stopped_at
        err.print(f"interrupted: saved {result.run_dir}/last.pt at epoch {epoch + 1} step {step}; "
                  f"continue with the same command and --resume", markup=False)


def render_eval(metrics: Dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        print_json(metrics)
        return
    # Clip data (a video model) says so: "(validation, 16-frame 32px clips)".
    frames = metrics.get("frames")
    size = f"{metrics['image_size']}px" if frames is None else f"{frames}-frame {metrics['image_size']}px clips"
    samples = "images" if frames is None else "clips"
    columns = task_for(metrics.get("task", "classification")).eval_columns
    headers = [samples, *(header for _, header in columns)]
    values = [f"{metrics[key]:.4f}" if key == "loss" else _pct(metrics[key]) for key, _ in columns]
    print_table(f"gfgp eval: {metrics['checkpoint']} on {metrics['data']} (validation, {size})", headers,
                [(metrics["images"], *values)], justify_right=headers)


def render_plots(paths: List, as_json: bool = False) -> None:
    if as_json:
        print_json([str(p) for p in paths])
        return
    for p in paths:
        out.print(str(p), markup=False, highlight=False)
