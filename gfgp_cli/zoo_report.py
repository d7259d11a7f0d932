"""One torchvision model through everything gfgp does: the rows of the zoo table.

``check_model(name)`` converts the model (paper layout, GFGP pools), runs the layout check of
its exact layout, one training-mode forward and backward, a checkpoint round trip, and an ONNX
export verified in onnxruntime; each step's result or the one-line reason it failed. Used by
``make test-zoo`` (tests/test_zoo_tasks.py) and by ``scripts/zoo_table.py`` (the README table).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch

from . import zoo
from .errors import BadInputError, WorkFailedError
from .layout import output_error

__all__ = ["check_model", "check_kwargs"]

def check_kwargs(name: str) -> Dict[str, Any]:
    """Constructor arguments of the zoo runs: a two-stage or one-stage detector resizes every
    image to ``min_size`` (800 by default; 320 keeps the float64 layout check of a ResNet-50 FPN
    detector under a minute on 2 cores). The conversion does not depend on it: the same sites
    and layout at every size. SSD models have their fixed size and take no such argument."""
    if zoo.task_of(name) == "detection" and not name.startswith("ssd"):
        return {"min_size": 320, "max_size": 320}
    return {}


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if not isinstance(e, (BadInputError, WorkFailedError)) else text[:300]


def check_model(name: str, export: bool = True, workdir: "str | Path | None" = None, **kwargs: Any) -> Dict[str, Any]:
    """Every step for one model; a dict of plain values (see the module docstring).

    ``kwargs`` are constructor arguments (``min_size=320`` for a detector), recorded in the row.

    Keys: ``task``; ``converts`` (bool) with ``gfgp_layers``, ``parts``, ``untraced`` and
    ``convert_s``; ``exact`` with ``exact_error`` (the layout check of placement ``exact``);
    ``trains`` (finite loss and gradients; every GFGP parameter has one, some non-zero);
    ``roundtrip`` (save + load give the same eval outputs); ``exports`` (True, False, or None
    when not tried) with ``export_note``; ``error`` (the first failure's reason) when a step failed.
    """
    from .checkpoint import load, save
    from .conversion import convert_with_report
    from .nn import GFGPPool2d

    row: Dict[str, Any] = {"model": name, "task": zoo.task_of(name), "converts": False, "kwargs": kwargs}
    task = row["task"]
    try:
        start = time.perf_counter()
        gm, report = convert_with_report(name, placement="paper", seed=0, **kwargs)
        row["convert_s"] = round(time.perf_counter() - start, 2)
        row.update(converts=True, parts=report.parts, untraced=len(report.untraced),
                   gfgp_layers=sum(isinstance(m, GFGPPool2d) for m in gm.modules()))
        _, exact = convert_with_report(name, pool="skip", placement="exact", seed=0, measure=True, **kwargs)
        row.update(exact=bool(exact.exact), exact_error=exact.exact_max_error, exact_inputs=exact.exact_examples)

        gm.train()
        args = zoo.training_example(name, task, 3, report.image_size, seed=1)
        loss = zoo.training_loss(gm(*args))
        loss.backward()
        grads = [p.grad for m in gm.modules() if isinstance(m, GFGPPool2d) for p in m.parameters()]
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in gm.parameters())
        # A model without GFGP layers (a ViT: its one strided conv is a patch embedding) trains as before.
        gfgp_ok = all(g is not None for g in grads) and (not grads or any(bool(g.abs().sum() > 0) for g in grads))
        row["trains"] = math.isfinite(loss.item()) and finite and gfgp_ok
        gm.zero_grad(set_to_none=True)

        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = save(gm, Path(tmp) / f"{name}.pt")
            loaded = load(path)
            gm.eval()
            example = zoo.example_input(task, 3, report.image_size, seed=2)
            example = example if isinstance(example, tuple) else (example,)
            with torch.no_grad():
                row["roundtrip"] = output_error(gm(*example), loaded(*example)) == 0.0
            del loaded
            if export:
                _export(row, path, Path(tmp), task, report.parts)
    except (BadInputError, WorkFailedError, RuntimeError, ValueError, TypeError) as e:
        row["error"] = _reason(e)
    return row


def _export(row: Dict[str, Any], checkpoint: Path, tmp: Path, task: str, parts: list) -> None:
    from .export import export_checkpoint

    part = None
    if task == "detection":  # refused whole, in one line; its converted part exports
        try:
            export_checkpoint(checkpoint, tmp / "whole.onnx")
        except BadInputError as e:
            row["export_note"] = f"whole model refused: {e}"
        part = next(p for p in parts if p)
    try:
        report = export_checkpoint(checkpoint, tmp / "model.onnx", part=part)
        row["exports"] = bool(report.passed)
        row["export_part"] = part
        row["export_diff"] = max(report.max_abs_diffs.values()) if report.max_abs_diffs else None
    except (BadInputError, WorkFailedError) as e:
        row["exports"] = False
        row["export_note"] = str(e)[:300]
