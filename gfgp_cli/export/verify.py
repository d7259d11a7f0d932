"""Verification of an exported file against PyTorch: the same random inputs through both.

The file runs in onnxruntime with the providers of :func:`.runtime.verification_providers`
(CUDA only when torch sees a GPU, else CPU); the model runs in PyTorch eval mode on its own
device. Every output is compared (nested tuples, lists and dicts flattened in order); the test
is max |onnxruntime - PyTorch| <= :data:`RTOL` times the output scale. Also the seeded random
inputs the export traces with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import WorkFailedError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["RTOL", "Comparison", "random_input", "random_inputs", "compare_with_pytorch", "flatten_outputs"]

# Verification tolerance in float32: max |onnxruntime - PyTorch| <= RTOL * (output scale), the
# output scale being max |PyTorch output| over the compared batches.
RTOL = 1e-4


@dataclasses.dataclass
class Comparison:
    """A passed verification (a failed one raises): the ExportReport fields of the same names."""

    provider: str  # onnxruntime execution provider used
    max_abs_diffs: Dict[int, float]  # batch size -> max |onnxruntime - PyTorch|
    tolerance: float  # RTOL * output scale
    passed: bool


def random_input(batch: int, channels: int, size: int, seed: int, device: "torch.device",
                 frames: Optional[int] = None) -> "torch.Tensor":
    """Tensor[batch, channels, size, size] (with ``frames``: a clip, Tensor[batch, channels,
    frames, size, size]) of N(0, 1), the same for the same arguments.

    Drawn on the CPU from a private generator and then moved, so it does not depend on the
    device or touch the global RNG; the seed mixes in the batch so each batch size differs.
    """
    import torch

    generator = torch.Generator().manual_seed(seed * 1000 + batch)
    shape = (batch, channels, size, size) if frames is None else (batch, channels, frames, size, size)
    return torch.randn(*shape, generator=generator).to(device)


def random_inputs(count: int, batch: int, channels: int, size: int, seed: int, device: "torch.device",
                  frames: Optional[int] = None) -> tuple:
    """``count`` different :func:`random_input` tensors: the positional inputs of a model that
    takes several images (an optical-flow model's two frames); the first is ``random_input``'s."""
    return tuple(random_input(batch, channels, size, seed + 7919 * i, device, frames) for i in range(count))


def compare_with_pytorch(model: "nn.Module", path: Path, batches: Sequence[int], channels: int, size: int, seed: int,
                         device: "torch.device", inputs: int = 1, frames: Optional[int] = None) -> Comparison:
    """Run the file at ``path`` in onnxruntime and ``model`` (in eval mode) on the same random
    inputs (``inputs`` tensors, :func:`random_inputs`; clips of ``frames`` frames for a video
    model) of each batch size in ``batches``.

    Raises:
        WorkFailedError: onnxruntime cannot load the file, outputs of other shapes, or a
            difference above the tolerance (in each case the file is left in place for
            inspection, and the message says so).
    """
    import torch

    from .runtime import make_session, run_session

    try:
        session = make_session(str(path))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/...; all mean "cannot load"
        detail = " ".join(str(e).split())[:300]
        raise WorkFailedError(f"onnxruntime cannot load the exported model ({detail}); the file was kept at {path}") from e
    provider = session.get_providers()[0]
    diffs: Dict[int, float] = {}
    scale = 0.0
    for batch in batches:
        # seed + 1: not the input the model was traced on
        xs = random_inputs(inputs, batch, channels, size, seed + 1, device, frames)
        with torch.no_grad():
            expected = [t.detach().float().cpu().numpy() for t in flatten_outputs(model(*xs))]
        got = run_session(session, [x.cpu().numpy() for x in xs])
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise WorkFailedError(
                f"onnxruntime returned outputs of shapes {[g.shape for g in got]} for batch {batch}, "
                f"PyTorch {[e.shape for e in expected]}; the file was kept at {path}"
            )
        diff = 0.0
        for g, want in zip(got, expected):
            if want.size:
                d = np.abs(g.astype(np.float64) - want.astype(np.float64))
                diff = max(diff, float(d.max()) if np.isfinite(d).all() else float("inf"))  # NaN fails too
                scale = max(scale, float(np.abs(want).max()))
        diffs[batch] = diff
    tolerance = RTOL * max(scale, 1e-6)  # the floor keeps an all-zero output from needing exact equality
    passed = all(d <= tolerance for d in diffs.values())
    if not passed:
        worst = max(diffs, key=diffs.__getitem__)
        raise WorkFailedError(
            f"onnxruntime ({provider}) differs from PyTorch: max abs diff {diffs[worst]:.3g} "
            f"at batch {worst} exceeds the tolerance {tolerance:.3g} ({RTOL:g} x output scale {scale:.3g}); "
            f"the file was kept at {path}"
        )
    return Comparison(provider=provider, max_abs_diffs=diffs, tolerance=tolerance, passed=passed)


def flatten_outputs(output: Any) -> List["torch.Tensor"]:
    """The tensors of a model's output in order (a dict by its values), as the ONNX outputs are."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in flatten_outputs(item)]
    raise WorkFailedError(f"the model returned {type(output).__name__}; export_onnx compares tensor outputs only")
