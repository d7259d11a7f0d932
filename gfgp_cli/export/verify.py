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

__all__ = ["RTOL", "Comparison", "random_input", "random_inputs", "open_session", "compare", "compare_with_pytorch",
           "flatten_outputs"]

# Verification tolerance in float32: max |onnxruntime - PyTorch| <= RTOL * (output scale), the
# output scale being max |PyTorch output| over the compared batches.
RTOL = 1e-4


@dataclasses.dataclass
class Comparison:
    """The outcome of a verification: the ExportReport fields of the same names, and why it failed."""

    provider: str  # onnxruntime execution provider used
    max_abs_diffs: Dict[int, float]  # batch size -> max |onnxruntime - PyTorch|
    tolerance: float  # RTOL * output scale
    passed: bool
    failure: Optional[str] = None  # why it did not pass, in one line (None: passed)

    def report_fields(self) -> Dict[str, Any]:
        """The ExportReport fields of this comparison."""
        return {"provider": self.provider, "max_abs_diffs": self.max_abs_diffs, "tolerance": self.tolerance,
                "passed": self.passed}


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


def open_session(path: Path, providers: Optional[Sequence] = None) -> Any:
    """An onnxruntime session of the file at ``path`` with every graph optimisation on, as a user
    loads it (constant folding is what exposes some invalid graphs); ``providers`` default to
    :func:`.runtime.verification_providers`.

    Raises:
        WorkFailedError: onnxruntime cannot load the file (one line with onnxruntime's reason).
    """
    from .runtime import make_session

    try:
        return make_session(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/...; all mean "cannot load"
        raise WorkFailedError(f"onnxruntime cannot load the exported model ({_detail(e)})") from e


def compare(model: "nn.Module", session: Any, batches: Sequence[int], channels: int, size: int, seed: int,
            device: "torch.device", inputs: int = 1, frames: Optional[int] = None) -> Comparison:
    """Run ``session`` (an exported file in onnxruntime) and ``model`` (in eval mode) on the same
    random inputs (``inputs`` tensors, :func:`random_inputs`; clips of ``frames`` frames for a
    video model) of each batch size in ``batches``.

    Returns:
        Comparison: ``passed`` False, with ``failure`` saying why, when the outputs differ in
        number or shape, or by more than the tolerance.

    Raises:
        WorkFailedError: onnxruntime fails to run the file (a file that loads but does not run).
    """
    import torch

    from .runtime import run_session

    provider = session.get_providers()[0]
    diffs: Dict[int, float] = {}
    scale = 0.0
    for batch in batches:
        # seed + 1: not the input the model was traced on
        xs = random_inputs(inputs, batch, channels, size, seed + 1, device, frames)
        with torch.no_grad():
            expected = [t.detach().float().cpu().numpy() for t in flatten_outputs(model(*xs))]
        try:
            got = run_session(session, [x.cpu().numpy() for x in xs])
        except Exception as e:  # onnxruntime's own exception types
            raise WorkFailedError(f"onnxruntime ({provider}) fails to run the exported model at batch {batch} "
                                  f"({_detail(e)})") from e
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            failure = (f"onnxruntime returned outputs of shapes {[g.shape for g in got]} for batch {batch}, "
                       f"PyTorch {[e.shape for e in expected]}")
            return Comparison(provider=provider, max_abs_diffs=diffs, tolerance=float("nan"), passed=False,
                              failure=failure)
        diff = 0.0
        for g, want in zip(got, expected):
            if want.size:
                d = np.abs(g.astype(np.float64) - want.astype(np.float64))
                diff = max(diff, float(d.max()) if np.isfinite(d).all() else float("inf"))  # NaN fails too
                scale = max(scale, float(np.abs(want).max()))
        diffs[batch] = diff
    tolerance = RTOL * max(scale, 1e-6)  # the floor keeps an all-zero output from needing exact equality
    passed = all(d <= tolerance for d in diffs.values())
    failure = None
    if not passed:
        worst = max(diffs, key=diffs.__getitem__)
        failure = (f"onnxruntime ({provider}) differs from PyTorch: max abs diff {diffs[worst]:.3g} "
                   f"at batch {worst} exceeds the tolerance {tolerance:.3g} ({RTOL:g} x output scale {scale:.3g})")
    return Comparison(provider=provider, max_abs_diffs=diffs, tolerance=tolerance, passed=passed, failure=failure)


def compare_with_pytorch(model: "nn.Module", path: Path, batches: Sequence[int], channels: int, size: int, seed: int,
                         device: "torch.device", inputs: int = 1, frames: Optional[int] = None) -> Comparison:
    """:func:`compare` on the file at ``path`` (opened by :func:`open_session`); a failure raises.

    Raises:
        WorkFailedError: onnxruntime cannot load or run the file, outputs of other shapes, or a
            difference above the tolerance (the file is left where it is, and the message says so).
    """
    try:
        comparison = compare(model, open_session(path), batches, channels, size, seed, device, inputs, frames)
    except WorkFailedError as e:
        raise WorkFailedError(f"{e}; the file was kept at {path}") from e
    if not comparison.passed:
        raise WorkFailedError(f"{comparison.failure}; the file was kept at {path}")
    return comparison


def _detail(e: BaseException) -> str:
    """onnxruntime's message in one line (its reason is often on the second line), at most 300 characters."""
    return " ".join(str(e).split())[:300] or type(e).__name__


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
