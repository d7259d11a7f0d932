"""``gfgp plot``: PNG curves of a run, and where each GFGP layer sits between average and max pooling.

Curves come from RUN_DIR/metrics.jsonl: ``loss.png`` (train and val loss), ``accuracy.png``
(the task's metrics: train top-1, val top-1 and top-5 of a classifier; train and val mIoU and val
pixel accuracy of a segmentation model; val mAP@[.5:.95] and mAP@.5 of a detector) and ``lr.png``
(log scale). Given data, ``lam.png`` shows the
distribution of lam (docs/method.md section 2: lam = 0 is average pooling, large lam approaches max
pooling) of every max-entropy pooling layer over one batch of validation images. matplotlib is
used through its object API (no pyplot, no global backend state), rendering with Agg.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .._io import atomic_open
from ..errors import BadInputError

__all__ = ["collect_lam", "plot_run", "plot_curves", "plot_lam"]


def collect_lam(model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """lam of every GFGP / max-entropy pooling layer for ``images`` (eval mode), flattened.

    Returns a dict from the layer's qualified name to a 1-D tensor: N*C values for GFGPPool2d
    (lam is Tensor[N, C, 1, 1]), C values for MaxEntPool2d (Tensor[1, C, 1, 1]). Computed by a
    forward pre-hook that evaluates ``module.lam(x)`` on the layer's own input.
    """
    from ..nn import GFGPPool2d, MaxEntPool2d

    found: Dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (GFGPPool2d, MaxEntPool2d)):
            def hook(mod, args, name=name):
                found[name] = mod.lam(args[0]).detach().float().flatten().cpu()
            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def _read_history(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise BadInputError(f"run directory {run_dir} does not exist; give the --out folder of `gfgp train`")
    if not path.exists():
        raise BadInputError(f"{run_dir} has no metrics.jsonl; give the --out folder of `gfgp train`")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path} is malformed (line {e.lineno}: {e.msg})") from e


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


#: The metrics panel of each task's runs: (ylabel, [(row key, label)]).
_METRIC_PANELS = {
    "classification": ("accuracy (%)", [("train_top1", "train top-1"), ("val_top1", "val top-1"),
                                        ("val_top5", "val top-5")]),
    "segmentation": ("mIoU, pixel accuracy (%)", [("train_miou", "train mIoU"), ("val_miou", "val mIoU"),
                                                  ("val_pixel_acc", "val pixel acc")]),
    "detection": ("COCO box mAP (%)", [("val_map", "val mAP@[.5:.95]"), ("val_map50", "val mAP@.5")]),
}


def plot_curves(history: List[dict], out: Path, title: str = "") -> List[Path]:
    """loss.png, accuracy.png and lr.png from per-epoch metrics rows; accuracy.png shows the
    metrics of the run's task (top-1/top-5, mIoU and pixel accuracy, or mAP), and loss.png the
    losses the rows hold (a detector has no validation loss)."""
    from .tasks import task_of_row

    epochs = [r["epoch"] for r in history]
    task = task_of_row(history[0]).name
    ylabel, metrics = _METRIC_PANELS[task]
    losses = [(key, label) for key, label in (("train_loss", "train"), ("val_loss", "val")) if key in history[0]]
    panels = [
        ("loss.png", "loss", "training loss" if task == "detection" else "cross-entropy loss", losses, False),
        ("accuracy.png", "accuracy" if task == "classification" else "metrics", ylabel, metrics, False),
        ("lr.png", "learning rate", "learning rate", [("lr", "lr")], True),
    ]
    written = []
    for filename, name, ylabel, series, log in panels:
        fig, ax = _figure(f"{title} {name}".strip(), ylabel)
        for key, label in series:
            ax.plot(epochs, [r.get(key) for r in history], marker="o", markersize=3, label=label)
        if log:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend()
        _save(fig, out / filename)
        written.append(out / filename)
    return written


def plot_lam(lams: Dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """Box plot of lam per layer, in network order."""
    if not lams:
        raise BadInputError("the model has no GFGP or max-entropy pooling layer, so there is no lam to plot")
    from matplotlib.figure import Figure

    names = list(lams)
    fig = Figure(figsize=(max(6, 1.2 * len(names) + 2), 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot([lams[n].numpy() for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("lam  (0 = average pooling, larger = closer to max)")
    ax.set_title(title or "lam of each pooling layer over validation images")
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:  # a full disk leaves the previous PNG, not half of one
        fig.savefig(f, format="png")


def plot_run(run_dir, out=None, checkpoint=None, data: Optional[str] = None, image_size: Optional[int] = None,
             batch_size: int = 64, device: str = "cpu") -> List[Path]:
    """Write the run's PNGs to ``out`` (default: RUN_DIR); with ``data``, also lam.png for
    ``checkpoint`` (default RUN_DIR/best.pt, else last.pt). Returns the paths written."""
    from .evaluation import load_trained, prepare_data
    from .runtime import resolve_device
    from .state import BEST, LAST

    run_dir = Path(run_dir)
    history = _read_history(run_dir)
    out = Path(out) if out is not None else run_dir
    lam_input = None
    if data is None:
        if not history:
            raise BadInputError(f"{run_dir} has no finished epoch yet; nothing to plot (give --data for the lam plot)")
    else:  # every input of the lam plot is checked (and the model run) before any file is written
        if batch_size < 2:
            raise BadInputError(f"--batch-size must be at least 2, got {batch_size}")
        if image_size is not None and image_size < 1:
            raise BadInputError(f"--image-size must be a positive integer, got {image_size}")
        if checkpoint is None:
            checkpoint = run_dir / BEST if (run_dir / BEST).exists() else run_dir / LAST
        model, spec, trained_size = load_trained(checkpoint)
        dev = resolve_device(device)
        model.to(dev)
        bundle, _ = prepare_data(model, spec, data, image_size or trained_size, dev, download=False)
        # evenly spaced over the set, so that sorted sets (ImageFolder) give every class
        indices = torch.linspace(0, len(bundle.val) - 1, min(batch_size, len(bundle.val))).long().unique().tolist()
        images = torch.stack([bundle.val[i][0] for i in indices]).to(dev)
        lams = collect_lam(model, images)
        if not lams:
            raise BadInputError("the model has no GFGP or max-entropy pooling layer, so there is no lam to plot")
        lam_input = (lams,
                     f"lam over {len(indices)} {bundle.name} validation images ({Path(checkpoint).name})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create the plot folder {out}: {e.strerror or e}") from e
    written = plot_curves(history, out, title=run_dir.name) if history else []
    if lam_input is not None:
        written.append(plot_lam(lam_input[0], out / "lam.png", title=lam_input[1]))
    return written
