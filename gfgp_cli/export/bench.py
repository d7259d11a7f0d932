"""``gfgp bench export``: onnxruntime CPU latency of the exported model next to PyTorch eager, and
next to onnxruntime on the original model.

Every contender runs in this process on the CPU with the same number of threads, on the same
input: PyTorch eager on the converted model, onnxruntime on its export, and (when the model's
conversion spec can rebuild it: a torchvision, timm or factory source) onnxruntime on the
ORIGINAL, unconverted architecture exported the same way. The timed calls are interleaved, the
order rotating from round to round as in :func:`gfgp_cli.bench.timing.interleaved_medians`, so
that load from other processes hits every contender alike. Medians are reported side by side
with their ratios; the converted model's time over the original's is shown next to its MACs
over the original's (``torch.utils.flop_counter``, one image; the pooling op itself is not
counted), as ``gfgp bench model`` does for training. Nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import BadInputError

__all__ = ["BenchExportResult", "bench_export", "original_model"]


@dataclasses.dataclass
class BenchExportResult:
    """Median latencies (ms) of one forward pass of a batch: PyTorch eager and onnxruntime CPU on
    the converted model, onnxruntime CPU on the original one (None when it cannot be rebuilt:
    ``original_note`` says why)."""

    model: str
    batch: int
    image_size: int
    threads: int
    repeats: int
    torch_ms: float
    ort_ms: float
    torch_times_ms: List[float]
    ort_times_ms: List[float]
    max_abs_diff: float  # between the two outputs on the benchmark input
    onnx_bytes: int
    maxent_layers: int
    macs: Optional[int] = None  # of the converted model, one image
    original: Optional[str] = None  # the original model, described
    original_ort_ms: Optional[float] = None
    original_ort_times_ms: Optional[List[float]] = None
    original_macs: Optional[int] = None
    original_onnx_bytes: Optional[int] = None
    original_note: Optional[str] = None  # why there is no original row
    # onnxruntime with gfgp's kernel library registered (.ort_kernel), on the same file; None: not timed
    kernel_ort_ms: Optional[float] = None
    kernel_ort_times_ms: Optional[List[float]] = None
    kernel_max_abs_diff: Optional[float] = None  # its output against eager's on the benchmark input
    kernel_note: Optional[str] = None  # why it was not timed (not asked for, the library does not build)

    @property
    def ratio(self) -> float:
        """onnxruntime median / PyTorch median: below 1 means onnxruntime is faster."""
        return self.ort_ms / self.torch_ms

    @property
    def time_ratio(self) -> Optional[float]:
        """onnxruntime on the converted model / onnxruntime on the original (medians)."""
        return None if self.original_ort_ms is None else self.ort_ms / self.original_ort_ms

    @property
    def macs_ratio(self) -> Optional[float]:
        """MACs of the converted model / MACs of the original."""
        return None if not self.original_macs or self.macs is None else self.macs / self.original_macs

    @property
    def time_per_macs_ratio(self) -> Optional[float]:
        """time ratio / MACs ratio: what the converted model costs beyond the MACs it adds (1: nothing)."""
        time_ratio, macs_ratio = self.time_ratio, self.macs_ratio
        return None if time_ratio is None or not macs_ratio else time_ratio / macs_ratio

    @property
    def kernel_time_ratio(self) -> Optional[float]:
        """onnxruntime with the kernel library on the converted model / onnxruntime on the original."""
        return None if self.original_ort_ms is None or self.kernel_ort_ms is None else self.kernel_ort_ms / self.original_ort_ms

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "time_ratio": self.time_ratio,
                "macs_ratio": self.macs_ratio, "time_per_macs_ratio": self.time_per_macs_ratio,
                "kernel_time_ratio": self.kernel_time_ratio}


def original_model(model: "object") -> Tuple[Optional["object"], str]:
    """``(the original, unconverted model the conversion spec of ``model`` records, its description)``,
    built with its builder's initial weights (what a speed comparison needs), or ``(None, why not)``:
    no spec, or a spec converted from the user's own module instance (pass ``original=``)."""
    from ..conversion import build_model
    from ..spec import ModuleSource, TorchvisionSource, spec_of

    try:
        spec = spec_of(model)
    except BadInputError:
        return None, "the model has no gfgp conversion spec; pass original= to compare with it"
    source = spec.source
    if isinstance(source, ModuleSource):
        return None, f"converted from your own module {source.qualname}; pass original= to compare with it"
    if isinstance(source, TorchvisionSource):
        built, _ = build_model(source.name, **source.kwargs)
    else:
        built, _ = build_model(source)
    return built, f"{source.describe()} (original)"


def _interleaved_times(contenders: Mapping[str, Callable[[], Any]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Wall times (ms) of each contender over ``repeats`` rounds; round r starts at contender
    ``r % len(contenders)`` (the order of :func:`gfgp_cli.bench.timing.interleaved_medians`, which
    keeps only the medians; the result here keeps every time)."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            contenders[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def bench_export(
    checkpoint_or_model: Union[str, os.PathLike, "object"],
    batch: int = 8,
    image_size: int = 224,
    repeats: int = 10,
    warmup: int = 2,
    threads: Optional[int] = None,
    opset: Optional[int] = None,
    frames: Optional[int] = None,
    original: Union[bool, "object"] = True,
    ort_kernel: bool = True,
) -> BenchExportResult:
    """Export ``checkpoint_or_model`` (a gfgp checkpoint path or an nn.Module) to a temporary ONNX
    file and time PyTorch eager and onnxruntime (CPU provider) on the same Tensor[batch, C, S, S]
    (a video model: Tensor[batch, C, frames, S, S], ``frames`` as in :func:`.export_onnx`), and
    onnxruntime on the original model exported the same way.

    ``threads`` defaults to ``torch.get_num_threads()`` and is used by all. ``original``: True
    (default) rebuilds the original from the model's conversion spec (:func:`original_model`), an
    nn.Module is the original to compare with, False times no original. ``ort_kernel`` also times
    onnxruntime on the same file with gfgp's kernel library registered (:mod:`.ort_kernel`; left
    out, with ``kernel_note`` saying why, where the library cannot be built).
    """
    import numpy as np
    import torch
    from torch import nn

    from ..checkpoint import load
    from ..conversion import _macs
    from .checks import resolve_frames, resolve_in_channels
    from .onnx_export import export_onnx
    from .runtime import make_session, run_session
    from .verify import random_input

    for name, value, low in (("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadInputError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        label = Path(checkpoint_or_model).name
        model = load(checkpoint_or_model)
    elif isinstance(checkpoint_or_model, nn.Module):
        label = type(checkpoint_or_model).__name__
        model = checkpoint_or_model
    else:
        raise BadInputError(f"bench_export needs a checkpoint path or an nn.Module, got {type(checkpoint_or_model).__name__}")
    if isinstance(original, nn.Module):
        base, original_label = original, f"{type(original).__name__} (original)"
    elif original is True:
        base, original_label = original_model(model)
    elif original is False:
        base, original_label = None, "not asked for"
    else:
        raise BadInputError(f"original must be True, False or an nn.Module, got {type(original).__name__}")
    models = {"converted": model, **({"original": base} if base is not None else {})}
    for key, m in models.items():
        if any(p.device.type != "cpu" for p in m.parameters()):
            models[key] = copy.deepcopy(m).cpu()  # the benchmark is on the CPU; leave the caller's model where it is
    model = models["converted"]
    threads = int(threads or torch.get_num_threads())
    frames = resolve_frames(model, frames)

    sessions, reports = {}, {}
    with tempfile.TemporaryDirectory(prefix="gfgp-bench-") as folder:
        for key, m in models.items():
            path = Path(folder) / f"{key}.onnx"
            reports[key] = export_onnx(m, path, image_size=image_size, opset=opset, verify=False, frames=frames)
            sessions[key] = make_session(str(path), providers=["CPUExecutionProvider"], threads=threads)
        kernel_note = None if ort_kernel else "not asked for (--no-ort-kernel)"
        if ort_kernel:
            from . import ort_kernel as kernel_library

            kernel_note = kernel_library.build_error()
        if kernel_note is None:
            sessions["kernel"] = make_session(str(Path(folder) / "converted.onnx"), providers=["CPUExecutionProvider"],
                                              threads=threads, kernel=True)

    modes = {key: m.training for key, m in models.items()}
    previous_threads = torch.get_num_threads()
    for m in models.values():
        m.eval()
    torch.set_num_threads(threads)
    try:
        channels = resolve_in_channels(model, frames)
        x = random_input(batch, channels, image_size, 0, torch.device("cpu"), frames)
        one = random_input(1, channels, image_size, 0, torch.device("cpu"), frames)
        macs = {key: _macs(m, one) for key, m in models.items()}
        feed = [x.numpy()]
        outputs: Dict[str, Any] = {}

        def run_torch():
            with torch.no_grad():
                outputs["torch"] = model(x)

        def run_ort(key):
            def run():
                outputs[key] = run_session(sessions[key], feed)
            return run

        contenders = {"torch": run_torch, "ort": run_ort("converted")}
        if "kernel" in sessions:
            contenders["kernel"] = run_ort("kernel")
        if "original" in sessions:
            contenders["original"] = run_ort("original")
        times = _interleaved_times(contenders, repeats, warmup)
        expected = outputs["torch"]
        expected_np = (expected if isinstance(expected, torch.Tensor) else expected[0]).numpy()
        diff = float(np.abs(outputs["converted"][0].astype(np.float64) - expected_np).max())
        kernel_diff = (float(np.abs(outputs["kernel"][0].astype(np.float64) - expected_np).max())
                       if "kernel" in outputs else None)
    finally:
        torch.set_num_threads(previous_threads)
        for key, m in models.items():
            m.train(modes[key])
    has_original = "original" in times
    return BenchExportResult(
        model=label,
        batch=batch,
        image_size=image_size,
        threads=threads,
        repeats=repeats,
        torch_ms=statistics.median(times["torch"]),
        ort_ms=statistics.median(times["ort"]),
        torch_times_ms=[round(t, 3) for t in times["torch"]],
        ort_times_ms=[round(t, 3) for t in times["ort"]],
        max_abs_diff=diff,
        onnx_bytes=reports["converted"].file_bytes,
        maxent_layers=reports["converted"].maxent_layers,
        macs=macs["converted"],
        original=original_label if has_original else None,
        original_ort_ms=statistics.median(times["original"]) if has_original else None,
        original_ort_times_ms=[round(t, 3) for t in times["original"]] if has_original else None,
        original_macs=macs.get("original"),
        original_onnx_bytes=reports["original"].file_bytes if has_original else None,
        original_note=None if has_original else original_label,
        kernel_ort_ms=statistics.median(times["kernel"]) if "kernel" in times else None,
        kernel_ort_times_ms=[round(t, 3) for t in times["kernel"]] if "kernel" in times else None,
        kernel_max_abs_diff=kernel_diff,
        kernel_note=kernel_note,
    )
