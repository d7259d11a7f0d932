"""Verification of an exported file against PyTorch: the same random inputs through both.

The file runs in onnxruntime with the providers of :func:`.runtime.verification_providers`
(CUDA only when torch sees a GPU, else CPU), or in another runtime (OpenVINO, :mod:`.runtime`);
the model runs in PyTorch eval mode on its own device. Every output is compared (nested tuples,
lists and dicts flattened in order).

The rule (:func:`judge`). The reference is the model run in float64 (a copy, on its device), the
exact answer as far as float32 is concerned; PyTorch's own float32 error ``e32`` is max |PyTorch
float32 - PyTorch float64|. A runtime passes when

    max |runtime - PyTorch float64| <= max(RTOL x output scale, FLOAT32_ERROR_FACTOR x e32)

(output scale: max |float64 output| over the compared inputs). The first term is the fixed
tolerance of earlier releases; the second lets a model whose outputs are small next to its
activations (a float32 error of 3.5e-4 of the output on mobilenet_v3_small or efficientnet_b0 with
realistic BatchNorm statistics) pass when the runtime is as close to the exact answer as float32
PyTorch is, while a true mismatch (a wrong op: an error of the output's own size) still fails. A
model that cannot run in float64 is judged against its float32 outputs by the first term alone
(``reference`` "float32"). Also the seeded random inputs the export traces with.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import WorkFailedError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["RTOL", "FP16_RTOL", "FLOAT32_ERROR_FACTOR", "Comparison", "Reference", "reference_outputs", "judge", "random_input",
           "random_inputs", "open_session", "compare", "compare_with_pytorch", "flatten_outputs", "detail"]

# The fixed part of the tolerance: max |runtime - reference| <= RTOL * (output scale).
RTOL = 1e-4
# The fixed part for a float16 file (--fp16): float16 keeps 11 significant bits (a rounding error
# of 5e-4 per op), so a network's output is ~1e-3 of its scale from float64; 1e-2 leaves room and
# still fails a wrong op.
FP16_RTOL = 1e-2
# The part derived from float32's own error: a runtime computing in float32 may be this many times
# as far from the float64 result as PyTorch float32 is (it rounds in another order: BatchNorm
# folded into the convolutions, fused ops), and no more.
FLOAT32_ERROR_FACTOR = 4.0


@dataclasses.dataclass
class Comparison:
    """The outcome of a verification: the ExportReport fields of the same names, and why it failed."""

    provider: str  # onnxruntime's execution provider used (another runtime: its device, "CPU")
    # batch size -> max |runtime - reference|; inputs of several sizes (a dynamic-size file): "batch@size" -> ...
    max_abs_diffs: Dict[Any, float]
    tolerance: float  # max(rtol * output scale, FLOAT32_ERROR_FACTOR * float32_error)
    passed: bool
    failure: Optional[str] = None  # why it did not pass, in one line (None: passed)
    float32_error: Optional[float] = None  # max |PyTorch float32 - PyTorch float64| (None: no float64 run)
    reference: str = "float64"  # what the runtime was compared with: PyTorch "float64", or "float32"
    rtol: float = RTOL
    runtime: str = "onnxruntime"  # or "openvino"

    @property
    def label(self) -> str:
        """The runtime and its provider, as messages name them: "onnxruntime (CPUExecutionProvider)"."""
        return f"{self.runtime} ({self.provider})"

    def report_fields(self) -> Dict[str, Any]:
        """The ExportReport fields of this comparison."""
        return {"provider": self.provider, "max_abs_diffs": self.max_abs_diffs, "tolerance": self.tolerance,
                "passed": self.passed, "float32_error": self.float32_error, "reference": self.reference}

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_abs_diffs"] = {str(k): v for k, v in self.max_abs_diffs.items()}
        return d


@dataclasses.dataclass
class Reference:
    """PyTorch's outputs on the verification inputs, computed once and judged against every runtime."""

    cases: List[Tuple[int, int]]  # (batch, image size) of each input set
    inputs: List[List[np.ndarray]]  # per case: the model's positional inputs (float32)
    outputs: List[List[np.ndarray]]  # per case: the reference outputs (float64 arrays)
    float32_error: Optional[float]  # max |PyTorch float32 - PyTorch float64| (None: float64 did not run)
    scale: float  # max |reference output|

    @property
    def kind(self) -> str:
        return "float32" if self.float32_error is None else "float64"

    def tolerance(self, rtol: float = RTOL) -> float:
        fixed = rtol * max(self.scale, 1e-6)  # the floor keeps an all-zero output from needing exact equality
        return fixed if self.float32_error is None else max(fixed, FLOAT32_ERROR_FACTOR * self.float32_error)


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


def open_session(path: Path, providers: Optional[Sequence] = None, kernel: bool = False) -> Any:
    """An onnxruntime session of the file at ``path`` with every graph optimisation on, as a user
    loads it (constant folding is what exposes some invalid graphs); ``providers`` default to
    :func:`.runtime.verification_providers`; ``kernel`` registers gfgp's kernel library
    (:mod:`.ort_kernel`).

    Raises:
        WorkFailedError: onnxruntime cannot load the file (one line with onnxruntime's reason).
    """
    from .runtime import make_session

    try:
        return make_session(str(path), providers=providers, kernel=kernel)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/...; all mean "cannot load"
        raise WorkFailedError(f"onnxruntime cannot load the exported model ({detail(e)})") from e


def reference_outputs(model: "nn.Module", cases: Sequence[Tuple[int, int]], channels: int, seed: int,
                      device: "torch.device", inputs: int = 1, frames: Optional[int] = None) -> Reference:
    """Run ``model`` (in eval mode) in float32 and, on a float64 copy, in float64 on the random
    inputs (``inputs`` tensors, :func:`random_inputs`; clips of ``frames`` frames for a video
    model) of each ``(batch, size)`` in ``cases``.

    The float64 copy is made once and dropped before returning. A model that does not run in
    float64 (an op without a double kernel) leaves ``float32_error`` None and its float32 outputs
    as the reference.
    """
    import torch

    xs_all = [random_inputs(inputs, batch, channels, size, seed + 1, device, frames)  # seed + 1: not the trace's
              for batch, size in cases]
    with torch.no_grad():
        float32 = [[t.detach().double().cpu().numpy() for t in flatten_outputs(model(*xs))] for xs in xs_all]
    exact: Optional[List[List[np.ndarray]]] = None
    try:
        double = copy.deepcopy(model).double()
        with torch.no_grad():
            exact = [[t.detach().cpu().numpy() for t in flatten_outputs(double(*(x.double() for x in xs)))]
                     for xs in xs_all]
        del double
    except (RuntimeError, TypeError, NotImplementedError, MemoryError):  # no float64 kernel, or no room for the copy
        exact = None
    error: Optional[float] = None
    if exact is not None:
        if any(len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)) for a, b in zip(float32, exact)):
            exact = None  # a model whose float64 run returns something else: judged by float32 alone
        else:
            error = max((_max_abs_diff(a, b) for outs32, outs64 in zip(float32, exact) for a, b in zip(outs32, outs64)),
                        default=0.0)
    outputs = exact if exact is not None else float32
    scale = max((float(np.abs(o).max()) for outs in outputs for o in outs if o.size), default=0.0)
    return Reference(cases=list(cases), inputs=[[x.cpu().numpy() for x in xs] for xs in xs_all], outputs=outputs,
                     float32_error=error, scale=scale)


def judge(reference: Reference, run: Callable[[List[np.ndarray]], Sequence[np.ndarray]], runtime: str,
          provider: str, rtol: float = RTOL) -> Comparison:
    """Run ``run`` (a runtime on the exported file: positional inputs -> outputs) on every case of
    ``reference`` and judge its outputs by the module's rule (``rtol``: its fixed part; a file
    computing in float16 is judged with a looser one).

    Returns:
        Comparison: ``passed`` False, with ``failure`` saying why, when the outputs differ in
        number or shape, or by more than the tolerance.

    Raises:
        WorkFailedError: the runtime fails to run the file (a file that loads but does not run).
    """
    diffs: Dict[Any, float] = {}
    tolerance = reference.tolerance(rtol)
    common = {"provider": provider, "runtime": runtime, "tolerance": tolerance, "float32_error": reference.float32_error,
              "reference": reference.kind, "rtol": rtol}
    label = f"{runtime} ({provider})"
    sizes = len({size for _, size in reference.cases})
    where: Dict[Any, Tuple[int, int]] = {}
    for (batch, size), xs, expected in zip(reference.cases, reference.inputs, reference.outputs):
        key = batch if sizes == 1 else f"{batch}@{size}"
        where[key] = (batch, size)
        try:
            got = list(run(xs))
        except Exception as e:  # each runtime raises its own exception types
            raise WorkFailedError(f"{label} fails to run the exported model at batch {batch}, "
                                  f"{size}x{size} ({detail(e)})") from e
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            failure = (f"{label} returned outputs of shapes {[g.shape for g in got]} for batch {batch}, "
                       f"PyTorch {[e.shape for e in expected]}")
            return Comparison(max_abs_diffs=diffs, passed=False, failure=failure, **common)
        diffs[key] = max((_max_abs_diff(g, e) for g, e in zip(got, expected)), default=0.0)
    passed = all(d <= tolerance for d in diffs.values())
    failure = None
    if not passed:
        worst = max(diffs, key=diffs.__getitem__)
        batch, size = where[worst]
        bound = f"{rtol:g} x output scale {reference.scale:.3g}"
        if reference.float32_error is not None:
            bound = (f"the larger of {bound} and {FLOAT32_ERROR_FACTOR:g} x PyTorch's own float32 error "
                     f"{reference.float32_error:.3g}")
        failure = (f"{label} differs from PyTorch {reference.kind}: max abs diff {diffs[worst]:.3g} at batch {batch} "
                   f"({size}x{size}) exceeds the tolerance {tolerance:.3g} ({bound})")
    return Comparison(max_abs_diffs=diffs, passed=passed, failure=failure, **common)


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| in float64; inf when it is not finite (a NaN fails too); 0 for empty tensors."""
    if not want.size:
        return 0.0
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(d.max()) if np.isfinite(d).all() else float("inf")


def compare(model: "nn.Module", session: Any, batches: Sequence[int], channels: int, size: int, seed: int,
            device: "torch.device", inputs: int = 1, frames: Optional[int] = None) -> Comparison:
    """Run ``session`` (an exported file in onnxruntime) and ``model`` on the same random inputs
    of each batch size in ``batches`` (:func:`reference_outputs`) and judge it (:func:`judge`).

    Raises:
        WorkFailedError: onnxruntime fails to run the file (a file that loads but does not run).
    """
    from .runtime import run_session

    reference = reference_outputs(model, [(b, size) for b in batches], channels, seed, device, inputs, frames)
    return judge(reference, lambda xs: run_session(session, xs), "onnxruntime", session.get_providers()[0])


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


def detail(e: BaseException) -> str:
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
