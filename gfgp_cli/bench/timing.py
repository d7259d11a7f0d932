"""Timing and memory helpers shared by the benchmarks.

Contenders are timed *interleaved*: every repeat runs each contender once, in an order that
rotates from repeat to repeat, so that a change of machine load (other processes, frequency
scaling, a warm cache) touches all contenders alike; each contender's result is its median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Mapping

import torch

from ..devices import resolve_device

__all__ = ["interleaved_medians", "saved_tensor_bytes", "device_sync", "describe_device", "resolve_device"]


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_medians(
    contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2,
    sync: Callable[[], None] = lambda: None,
) -> Dict[str, float]:
    """Median wall time in seconds of each contender, measured interleaved.

    Each contender first runs ``warmup`` times (untimed, also interleaved), then ``repeats``
    timed rounds follow; round r starts at contender ``r % len(contenders)``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync()
    times: Dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs: the sum over unique storages.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted by its
    storage, once, whatever number of views of it are saved (the input saved by several nodes
    counts once). Storages alive before the call (the inputs) count too: backward needs them.
    """
    storages: Dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def describe_device(device: torch.device) -> str:
    """A one-line description of the device the benchmark ran on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import platform

    from ..cpu_memory import allocator_description

    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__}); {allocator_description()}")
