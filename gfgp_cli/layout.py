"""The layout check: does the converted layout (with plain skip pools) compute the original model?

Every task's outputs are compared leaf by leaf, each in units of its own scale
(``max|actual - expected| / max|expected|``): classification logits, segmentation's ``out`` and
``aux``, RAFT's list of flow predictions; for detection, each image's detections are compared
as a set (a box of one may be listed in another order by the other when two scores tie), and
the feature maps of every converted part (a detection backbone with its FPN) are compared too.
A structure that differs (another number of boxes, another key) is an error of ``inf``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graph_passes import describe_example, example_args

__all__ = ["LayoutCheck", "output_error", "detections_error", "layout_check", "cast_example"]

_INF = math.inf


@dataclass
class LayoutCheck:
    """The result: the largest error over every example and output, and what was compared."""

    max_error: float = 0.0
    examples: List[str] = field(default_factory=list)


def _tensor_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return _INF
    if expected.numel() == 0:
        return 0.0
    if not expected.is_floating_point():
        return 0.0 if torch.equal(expected, actual) else _INF
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    return diff / scale if scale > 0 else diff


def _is_detections(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(d, dict) and {"boxes", "scores", "labels"} <= set(d) for d in value))


def detections_error(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor]) -> float:
    """One image's detections compared as a set, in units of each output's scale.

    Each actual detection is paired with an expected one of the same label, closest pairs
    first (box distance over the box scale, plus score difference), each expected detection
    used once; then every per-detection output (boxes, scores, masks, keypoints) is compared
    pair by pair. Random weights can give many boxes clipped to the same image border with
    scores equal to 1e-14, which two runs may list in any order: a pairing, not an order.
    """
    if set(expected) != set(actual) or len(expected["scores"]) != len(actual["scores"]):
        return _INF
    n = len(expected["scores"])
    if n == 0:
        return 0.0
    box_scale = float(expected["boxes"].abs().max()) or 1.0
    same_label = actual["labels"][:, None] == expected["labels"][None, :]
    distance = (torch.cdist(actual["boxes"].double(), expected["boxes"].double(), p=math.inf) / box_scale
                + (actual["scores"][:, None] - expected["scores"][None, :]).abs().double())
    distance = distance.masked_fill(~same_label, _INF)
    order = distance.flatten().argsort()
    finite = int(torch.isfinite(distance).sum())  # pairs of different labels sort last, never paired
    partner, taken, paired = [-1] * n, [False] * n, 0
    for flat in order[:finite].tolist():  # greedy pairing, closest first
        i, j = divmod(flat, n)
        if partner[i] < 0 and not taken[j]:
            partner[i], taken[j] = j, True
            paired += 1
            if paired == n:
                break
    if paired < n:
        return _INF  # some detection has no counterpart of its label
    index = torch.tensor(partner)
    return max(_tensor_error(expected[k][index], actual[k]) for k in expected)


def output_error(expected: Any, actual: Any) -> float:
    """The largest error between two outputs of any structure: tensors, mappings (an
    ``OrderedDict`` and a ``dict`` with the same keys are the same structure), lists and
    tuples, detections (:func:`detections_error`), and plain values (equal or not)."""
    if _is_detections(expected):
        if not _is_detections(actual) or len(actual) != len(expected):
            return _INF
        return max(detections_error(e, a) for e, a in zip(expected, actual))
    if isinstance(expected, torch.Tensor):
        return _tensor_error(expected, actual) if isinstance(actual, torch.Tensor) else _INF
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping) or set(expected) != set(actual):
            return _INF
        return max((output_error(expected[k], actual[k]) for k in expected), default=0.0)
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(expected) != len(actual):
            return _INF
        return max((output_error(e, a) for e, a in zip(expected, actual)), default=0.0)
    return 0.0 if expected == actual else _INF


def _part_outputs(model: nn.Module, parts: Iterable[str], args: tuple) -> tuple[Any, Dict[str, Any]]:
    """``model(*args)`` and the first output of each named submodule (forward hooks)."""
    seen: Dict[str, Any] = {}
    handles = [model.get_submodule(q).register_forward_hook(lambda m, a, out, q=q: seen.setdefault(q, out))
               for q in parts if q]
    try:
        return model(*args), seen
    finally:
        for h in handles:
            h.remove()


def cast_example(example: Any, dtype: torch.dtype) -> Any:
    """An example input (tensor or tuple of arguments) with its floating tensors cast to ``dtype``."""
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, example)


def layout_check(original: nn.Module, converted: nn.Module, examples: Iterable[Any],
                 parts: Iterable[str] = ("",)) -> LayoutCheck:
    """Run both models in eval mode on every example (a tensor or a tuple of positional
    arguments) and compare their outputs, and the outputs of the converted ``parts``, with
    :func:`output_error`.

    An example the original model itself refuses (a ViT at another size) is skipped; the first
    example must run. Run it on float64 models and examples (:func:`cast_example`) where the
    outputs are ranked (detections after score sorting and NMS): float32 rounding could reorder them.
    """
    parts = list(parts)
    original.eval()
    converted.eval()
    check = LayoutCheck()
    for i, example in enumerate(examples):
        args = example_args(example)
        with torch.no_grad():
            try:
                expected, expected_parts = _part_outputs(original, parts, args)
            except Exception:  # noqa: BLE001 - the original model does not take this size
                if i == 0:
                    raise
                continue
            actual, actual_parts = _part_outputs(converted, parts, args)
        errors = [output_error(expected, actual)] + [output_error(expected_parts[q], actual_parts.get(q)) for q in expected_parts]
        check.max_error = max(check.max_error, *errors)
        check.examples.append(describe_example(example))
    return check


def own_rounding(model: nn.Module, example: Any) -> float:
    """How far ``model``'s float32 eval output on ``example`` is from its float64 output, in
    units of the output scale (:func:`output_error`). Where this exceeds a tolerance, a float32
    comparison of the model with a rewrite of it cannot decide: compare in float64."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double().eval()(*example_args(cast_example(example, torch.float64)))
        rounded = copy.deepcopy(model).float().eval()(*example_args(cast_example(example, torch.float32)))
    return output_error(exact, cast_example(rounded, torch.float64))
