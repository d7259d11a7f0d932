"""``gfgp bench export``: onnxruntime CPU latency of the exported model next to PyTorch eager.

Both run in this process on the CPU with the same number of threads, on the same input; the
timed calls alternate (torch, onnxruntime, torch, ...) so that load from other processes hits both
alike. Medians are reported side by side with their ratio; nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import BadInputError

__all__ = ["BenchExportResult", "bench_export"]


@dataclasses.dataclass
class BenchExportResult:
    """Median latencies (ms) of one forward pass of a batch, PyTorch eager vs onnxruntime CPU."""

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

    @property
    def ratio(self) -> float:
        """onnxruntime median / PyTorch median: below 1 means onnxruntime is faster."""
        return self.ort_ms / self.torch_ms

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


def bench_export(
    checkpoint_or_model: Union[str, os.PathLike, "object"],
    batch: int = 8,
    image_size: int = 224,
    repeats: int = 10,
    warmup: int = 2,
    threads: Optional[int] = None,
    opset: Optional[int] = None,
    frames: Optional[int] = None,
) -> BenchExportResult:
    """Export ``checkpoint_or_model`` (a gfgp checkpoint path or an nn.Module) to a temporary ONNX
    file and time PyTorch eager and onnxruntime (CPU provider) on the same Tensor[batch, C, S, S]
    (a video model: Tensor[batch, C, frames, S, S], ``frames`` as in :func:`.export_onnx`).

    ``threads`` defaults to ``torch.get_num_threads()`` and is used by both.
    """
    import numpy as np
    import torch
    from torch import nn

    from ..checkpoint import load
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
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()  # the benchmark is on the CPU; leave the caller's model where it is
    else:
        raise BadInputError(f"bench_export needs a checkpoint path or an nn.Module, got {type(checkpoint_or_model).__name__}")
    threads = int(threads or torch.get_num_threads())
    frames = resolve_frames(model, frames)

    with tempfile.TemporaryDirectory(prefix="gfgp-bench-") as folder:
        path = Path(folder) / "model.onnx"
        report = export_onnx(model, path, image_size=image_size, opset=opset, verify=False, frames=frames)
        session = make_session(str(path), providers=["CPUExecutionProvider"], threads=threads)

    was_training, previous_threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads)
    try:
        x = random_input(batch, resolve_in_channels(model, frames), image_size, 0, torch.device("cpu"), frames)
        feed = [x.numpy()]

        def run_torch():
            with torch.no_grad():
                return model(x)

        for _ in range(warmup):
            run_torch()
            run_session(session, feed)
        torch_times, ort_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            expected = run_torch()
            t1 = time.perf_counter()
            got = run_session(session, feed)
            t2 = time.perf_counter()
            torch_times.append((t1 - t0) * 1e3)
            ort_times.append((t2 - t1) * 1e3)
        expected_np = (expected if isinstance(expected, torch.Tensor) else expected[0]).numpy()
        diff = float(np.abs(got[0].astype(np.float64) - expected_np).max())
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return BenchExportResult(
        model=label,
        batch=batch,
        image_size=image_size,
        threads=threads,
        repeats=repeats,
        torch_ms=statistics.median(torch_times),
        ort_ms=statistics.median(ort_times),
        torch_times_ms=[round(t, 3) for t in torch_times],
        ort_times_ms=[round(t, 3) for t in ort_times],
        max_abs_diff=diff,
        onnx_bytes=report.file_bytes,
        maxent_layers=report.maxent_layers,
    )
