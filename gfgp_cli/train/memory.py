"""Will a training step fit in memory? Measure one, then split the batch into micro-batches that fit.

A converted model runs its early convolutions at full resolution, so its activations are several
times those of the original, and a batch that trains the original can exhaust the machine's
memory (the kernel's OOM killer ends the process without a message). Before the first step,
:func:`plan_micro_batches` measures one forward+backward of the model at a small batch on the
training device, extrapolates to the requested batch, and, like Composer's
``device_train_microbatch_size="auto"``, splits each batch into the smallest number of equal
micro-batches that fit, accumulating their gradients so that the global batch and the learning
rate stay what the user asked. With ``--accum-steps`` given, that choice is checked instead.

The measurement (:func:`measure_step`):

- CUDA: the peak of ``torch.cuda.max_memory_allocated`` over the step.
- CPU (Linux): the peak resident memory of the process over the step (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``, with freed heap memory first returned by ``malloc_trim``),
  which also counts what is not a tensor (oneDNN's scratch buffers, allocator overhead).
- Elsewhere: twice the bytes autograd saves for the backward (a coarser estimate, and said so).

Everything the measured step grows with the batch is charged to the samples (``per_sample`` =
(peak - gradients) / batch): an overestimate at small batches, so the plan errs on the safe side.
The step runs on a copy of the model (its weights' memory is there before the measurement starts,
so it is not counted) with the random generators put back afterwards, so a run with the check is
bit-identical to one without it and no module of the model sees an extra forward.

Available memory (:func:`available_memory`): on CUDA the device's free memory plus what torch
holds unused; on the CPU the least of the kernel's ``MemAvailable``, the cgroup's limit, the
address-space limit (``ulimit -v``) and ``--memory-limit``, shared by the processes of this node;
of that, :data:`USABLE` is planned for (data loading and fragmentation need the rest).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .._io import format_bytes
from ..cpu_memory import memory_limits
from ..errors import BadInputError
from .config import TrainConfig
from .runtime import autocast, to_channels_last

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["StepMemory", "USABLE", "available_memory", "measure_step", "step_growth", "plan_micro_batches",
           "parse_size"]

USABLE = 0.85  # of the available memory, what the training step may plan to use
MEASURE_BATCH = 8  # samples of the measured step (fewer where the batch is smaller): at 4, allocator
# effects make the per-sample memory of a CPU step come out about 10% low


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training step: ``fixed`` bytes plus ``per_sample`` bytes per sample."""

    fixed: int  # gradients and optimizer state: independent of the batch
    per_sample: int
    how: str  # how it was measured, for messages

    def need(self, micro_batch: int) -> int:
        return self.fixed + self.per_sample * micro_batch


def parse_size(text: str) -> int:
    """``"23.1GiB"``, ``"512MiB"``, ``"8G"``, ``"1e9"`` -> bytes (binary units; "B" optional)."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    for suffix, f in (("K", 2**10), ("M", 2**20), ("G", 2**30), ("T", 2**40)):
        if s.endswith(suffix):
            s, factor = s[:-1], f
            break
    try:
        value = float(s) * factor
    except ValueError:
        raise BadInputError(f"--memory-limit must be a size such as 8GiB or 512MiB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"--memory-limit must be a positive size, got {text!r}")
    return int(value)


# --- what is available ---------------------------------------------------------------------------


def _status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: torch.device, local_processes: int = 1,
                     limit: Optional[int] = None) -> Tuple[int, str]:
    """``(bytes, what limits it)`` this process may use for training: on CUDA the device's free
    memory plus what torch holds unused; on the CPU the least of
    :func:`gfgp_cli.cpu_memory.memory_limits` (the machine's shares divided among the
    ``local_processes`` of this node) and ``limit`` less what the process already holds."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + unused, f"free memory of {device}"
    shared = ("available memory", "the cgroup's memory limit", "physical memory")
    candidates = [(b // local_processes if what in shared else b, what) for b, what in memory_limits()]
    if limit is not None:
        candidates.append((max(0, limit - (_status("VmRSS:") or 0)), "--memory-limit"))
    return min(candidates) if candidates else (1 << 62, "no known limit")


# --- measuring one step -----------------------------------------------------------------------------


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def _cpu_peak_reset() -> Optional[Callable[[], int]]:
    """Reset the process's peak resident memory; returns a reader of the growth since, or None
    where the kernel does not offer it."""
    if platform.system() != "Linux":
        return None
    if platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)  # freed heap pages back to the kernel: reuse must show as growth
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status("VmRSS:")
    if base is None:
        return None
    return lambda: max(0, (_status("VmHWM:") or base) - base)


def measure_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 config: TrainConfig, state_factor: int, task: Optional["Task"] = None) -> StepMemory:
    """Memory of a forward+backward of ``model`` (train mode) on ``images``; ``state_factor`` is
    the optimizer's state per parameter byte (SGD with momentum 1, AdamW 2, plus 1 for an EMA
    copy). The step leaves no trace (see the module docstring).

    With 4 or more images, steps on the first half and on all of them are measured, and the
    larger of two per-sample figures is kept: the growth between the two steps per added sample
    (memory the process already holds and reuses drops out of it) and the whole step's growth
    over the gradients per sample (which charges fixed costs to the samples). ``task`` (default:
    classification) moves the batch and computes the loss; ``images`` and ``labels`` are its batch."""
    task = task if task is not None else _classification()
    images, labels = task.to_device(images, labels, device, config)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    batch = len(images)
    sizes = [batch // 2, batch] if batch >= 4 else [batch]
    model = copy.deepcopy(model).train()  # the steps run on a copy: the model keeps no trace of them
    if config.channels_last:
        to_channels_last(model)
    with _rng_kept(device):
        measured = [step_growth(model, images[:n], labels[:n], device, config, grads, task) for n in sizes]
    del model
    how = measured[-1][1]
    per_sample = max(0, measured[-1][0] - grads) / batch
    if len(sizes) == 2:
        per_sample = max(per_sample, (measured[1][0] - measured[0][0]) / (sizes[1] - sizes[0]))
    return StepMemory(fixed=grads * (1 + state_factor), per_sample=math.ceil(per_sample),
                      how=f"{how} of steps at batch {' and '.join(map(str, sizes))}")


def step_growth(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                config: Optional[TrainConfig] = None, grads: int = 0, task: Optional["Task"] = None) -> Tuple[int, str]:
    """``(bytes one forward+backward of ``model`` adds at its peak, how it was measured)``;
    gradients are cleared first, so their memory is part of it. ``grads``: their bytes, for the
    estimate where the peak cannot be read. ``task``: whose loss (default: cross-entropy on logits)."""
    task = task if task is not None else _classification()
    step_criterion = task.criterion(None)

    def criterion_of(images, labels):
        return task.forward(model, images, labels, step_criterion)[0]
    for p in model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with autocast(device, config):
            loss = criterion_of(images, labels)
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, f"peak allocated on {device}"
    growth = _cpu_peak_reset()
    if growth is not None:
        with autocast(device, config):
            loss = criterion_of(images, labels)
        loss.backward()
        return growth(), "peak resident memory"
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, config):
        loss = criterion_of(images, labels)
    loss.backward()
    return 2 * sum(saved.values()) + grads, "estimated from the tensors autograd saves"


def _classification() -> "Task":
    from .tasks import Task

    return Task()


# --- the plan ------------------------------------------------------------------------------------------


def plan_micro_batches(memory: StepMemory, available: int, where: str, batch_size: int, world_size: int,
                       accum_steps: Optional[int], min_micro: int) -> Tuple[int, Optional[str]]:
    """``(accumulation steps, note)`` for a global ``batch_size`` over ``world_size`` processes.

    ``accum_steps`` None: the fewest equal micro-batches that fit in ``USABLE * available`` (the
    note says so when more than one is needed). Given: checked. BadInputError (exit 2) with the
    accumulation (or batch size) that fits when the batch cannot fit as asked, or when not even a
    micro-batch of ``min_micro`` samples fits."""
    usable = int(available * USABLE)
    per_process = batch_size // world_size
    options = [a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a >= min_micro]
    fitting = [a for a in options if memory.need(per_process // a) <= usable]
    scope = " per process" if world_size > 1 else ""
    size = f"{format_bytes(usable)}{scope} ({int(USABLE * 100)}% of {where}, {format_bytes(available)})"
    largest = _largest_fitting(memory, usable, min_micro)
    if largest < min_micro:
        raise BadInputError(
            f"not even a micro-batch of {min_micro} fits: it needs about {format_bytes(memory.need(min_micro))} "
            f"and {size} is usable; use a smaller --image-size, --activation-checkpointing or a device with "
            f"more memory [{memory.how}: {format_bytes(memory.per_sample)} per sample]"
        )
    if accum_steps is not None:
        micro = per_process // accum_steps
        if memory.need(micro) <= usable:
            return accum_steps, None
        hint = (f"use --accum-steps {fitting[0]} (micro-batches of {per_process // fitting[0]})" if fitting
                else f"lower --batch-size to {largest * world_size}")
        raise BadInputError(
            f"--batch-size {batch_size} with --accum-steps {accum_steps} runs micro-batches of {micro}{scope}, "
            f"which need about {format_bytes(memory.need(micro))}; {size} is usable: {hint} "
            f"[{memory.how}: {format_bytes(memory.per_sample)} per sample]"
        )
    if not fitting:
        raise BadInputError(
            f"no equal split of --batch-size {batch_size} into micro-batches of {min_micro} or more fits in {size}; "
            f"use a --batch-size that splits into micro-batches of at most {largest}, e.g. {largest * world_size}"
        )
    accum = fitting[0]
    if accum == 1:
        return 1, None
    return accum, (f"batch {batch_size} does not fit in {format_bytes(usable)}{scope}: {accum} micro-batches of "
                   f"{per_process // accum} ({memory.how}: {format_bytes(memory.per_sample)} per sample)")


def _largest_fitting(memory: StepMemory, usable: int, min_micro: int) -> int:
    if memory.per_sample <= 0:
        return 1 << 30
    return max(0, (usable - memory.fixed) // memory.per_sample)
