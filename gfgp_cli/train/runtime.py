"""Run-time setup of a training process: everything about *how* it runs, nothing about *what* it learns.

- stopping: :class:`StopControl`, set by the SIGINT/SIGTERM handler of :func:`stop_on_signals`;
  :func:`ignore_sigint` for DataLoader workers;
- randomness and kernels: :func:`seed_everything`, :func:`seed_process` (fresh, restored or
  reseeded on resume), :func:`determinism`, :func:`kept_num_threads`;
- the device: :func:`wants_cuda`, :func:`resolve_device`, :func:`collective_device`, :func:`to_device`;
- mixed precision: :func:`amp_dtype` (checks and notes), :func:`autocast`, :func:`grad_scaler`;
- model wrappers: :func:`sync_batchnorm`, :func:`wrap_model` (channels_last, DDP, torch.compile).

``--channels-last`` is rank-aware: a 4-D tensor (an image batch, a Conv2d weight) goes to
``torch.channels_last``, a 5-D one (a batch of clips, a Conv3d weight) to
``torch.channels_last_3d`` (:func:`channels_last_format`); other tensors are left as they are.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from ..devices import resolve_device as _resolve_device
from ..errors import BadInputError
from .config import TrainConfig
from .distributed import SINGLE_PROCESS, DistInfo
from .state import restore_rng

__all__ = [
    "StopControl", "stop_on_signals", "ignore_sigint", "seed_everything", "seed_process", "determinism",
    "kept_num_threads", "wants_cuda", "resolve_device", "collective_device", "to_device", "amp_dtype", "autocast",
    "grad_scaler", "sync_batchnorm", "wrap_model", "channels_last_format", "to_channels_last",
]


# --- stopping ----------------------------------------------------------------------------------


class StopControl:
    """Set by the SIGINT/SIGTERM handler; the loop stops after the current optimizer step."""

    stop = False


@contextlib.contextmanager
def stop_on_signals(control: StopControl) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM): finish the current step, save last.pt and return. A second
    Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if control.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        control.stop = True

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops cleanly after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- randomness, kernels, threads ----------------------------------------------------------------


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def seed_process(seed: int, info: DistInfo, saved_rng: Optional[Sequence[Dict[str, Any]]],
                 position: int) -> Optional[str]:
    """Seed this process's generators for a new run (``saved_rng`` None), restore them from a run
    saved by as many processes, or reseed them from ``position`` (steps done so far) for a run
    saved by another number; returns the note to show in that last case."""
    if saved_rng is None:
        seed_everything(seed + info.rank)  # one stream per process (dropout differs across ranks)
        return None
    if len(saved_rng) == info.world_size:
        restore_rng(saved_rng[info.rank])
        return None
    seed_everything(seed + info.rank + 1000 * position)
    return (f"note: resumed on {info.world_size} process(es) a run saved by {len(saved_rng)}: the data "
            "order is kept, the random generators are reseeded (not bit-exact)")


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """--deterministic: deterministic kernels only (restored afterwards); otherwise cuDNN autotuning."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1], previous[2]


@contextlib.contextmanager
def kept_num_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count afterwards: --threads applies to one run only
    (train() is a library call)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- the device ------------------------------------------------------------------------------------


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def resolve_device(device: str, info: DistInfo = SINGLE_PROCESS) -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch.device (under torchrun, cuda is cuda:LOCAL_RANK)."""
    return _resolve_device(device, info.local_rank if info.enabled else None)


def collective_device(device: torch.device, info: DistInfo) -> torch.device:
    """Small flag tensors live where the backend wants them (NCCL: GPU, gloo: CPU)."""
    return device if info.enabled and device.type == "cuda" else torch.device("cpu")


def to_device(images: torch.Tensor, device: torch.device, config: Optional[TrainConfig]) -> torch.Tensor:
    """An input batch on ``device``; with --channels-last in the channels-last format of its rank
    (images ``Tensor[N, C, H, W]``: channels_last; clips ``Tensor[N, C, T, H, W]``: channels_last_3d)."""
    images = images.to(device, non_blocking=True)
    if config is not None and config.channels_last:
        fmt = channels_last_format(images)
        if fmt is not None:
            images = images.contiguous(memory_format=fmt)
    return images


def channels_last_format(t: torch.Tensor) -> Optional[torch.memory_format]:
    """The channels-last memory format of a tensor's rank: ``channels_last`` for 4-D,
    ``channels_last_3d`` for 5-D, None (no such format) for any other rank."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def to_channels_last(model: nn.Module) -> nn.Module:
    """Every 4-D and 5-D parameter and buffer of ``model`` in the channels-last format of its rank
    (in place; :meth:`nn.Module.to` takes one format for every rank, which a model with Conv3d
    weights and 4-D tensors, or the reverse, cannot use)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        fmt = channels_last_format(t)
        return t if fmt is None else t.contiguous(memory_format=fmt)

    return model._apply(convert)


# --- mixed precision -----------------------------------------------------------------------------


def amp_dtype(device: torch.device, config: TrainConfig, notes: List[str]) -> Optional[torch.dtype]:
    """The autocast dtype of ``config`` on ``device`` (None without --amp); bad input for fp16 on
    the CPU, a note when a GPU without bfloat16 falls back to float16."""
    if not config.amp:
        return None
    dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise BadInputError("--amp-dtype fp16 needs CUDA; on the CPU autocast runs in bf16 (--amp-dtype bf16)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        notes.append("this GPU has no bfloat16: autocast uses float16 with a grad scaler")
        dtype = torch.float16
    return dtype


def autocast(device: torch.device, config: Optional[TrainConfig]):
    """The autocast context of a forward pass (a no-op without --amp)."""
    if config is None or not config.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A loss scaler, enabled only where it is needed: float16 autocast on CUDA."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


# --- model wrappers --------------------------------------------------------------------------------


def sync_batchnorm(model: nn.Module, config: TrainConfig, device: torch.device, info: DistInfo,
                   notes: List[str]) -> nn.Module:
    """--sync-bn: SyncBatchNorm across processes (CUDA only; a note for a single process)."""
    if not config.sync_bn:
        return model
    if device.type != "cuda":
        raise BadInputError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)")
    if info.enabled:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    notes.append("--sync-bn has no effect with a single process")
    return model


def wrap_model(model: nn.Module, config: TrainConfig, device: torch.device,
               info: DistInfo) -> Tuple[nn.Module, Optional[nn.parallel.DistributedDataParallel]]:
    """``(the module to run, its DDP wrapper or None)``: channels-last memory (in place, by rank:
    :func:`to_channels_last`), DDP under torchrun, then torch.compile. The unwrapped ``model`` is
    what checkpoints save."""
    if config.channels_last:
        to_channels_last(model)
    ddp = None
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model = ddp
    if config.compile:
        model = cast(nn.Module, torch.compile(model))
    return model, ddp
