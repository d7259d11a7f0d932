"""Benchmarks measured side by side in one process and reported as ratios (``gfgp bench``).

- :func:`bench_pool`: ``maxent_pool2d`` against ``F.max_pool2d`` / ``F.avg_pool2d`` (time and
  bytes saved for backward).
- :func:`bench_model`: a training step of a converted model against the original torchvision model.
"""

from .pool import PoolCase, bench_pool, parse_case
from .timing import interleaved_medians, saved_tensor_bytes

__all__ = ["PoolCase", "bench_pool", "parse_case", "interleaved_medians", "saved_tensor_bytes", "bench_model"]


def __getattr__(name: str):
    # The model benchmark needs gfgp_cli.convert (and torchvision); import it only when asked.
    if name == "bench_model":
        from .model import bench_model

        return bench_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
