"""Keep freed CPU memory in the process for reuse (glibc malloc), as PyTorch's CPU tuning guides advise.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB, usually less) with a
fresh ``mmap`` and unmaps it on ``free``. A training step allocates and frees its activations
and gradients every time, so each large tensor is new memory again, and the kernel takes one
page fault, and zeroes one page, per 4 KiB of it on first touch. That costs about 25 ms per
100 MiB on this project's CPU machine, nothing on a GPU, and hits converted models hardest:
GFGP runs convolutions at full resolution, so their maps are 4x larger (ResNet-50's stem:
8 x 64 x 224 x 224 floats = 98 MiB per tensor at batch 8).

:func:`reuse_freed_memory` raises glibc's mmap and trim thresholds with ``mallopt`` so that
freed blocks stay in the heap and the next step reuses them (what jemalloc or tcmalloc do by
design). The price is memory: the process keeps what it used until it exits instead of handing
it back between steps, and blocks of different sizes fragment the heap somewhat (peak resident
memory of ``gfgp bench model resnet50``: 3.12 GiB instead of 2.75 GiB, +13%). It leaves the allocator alone where the user chose one
(a jemalloc, tcmalloc or mimalloc ``LD_PRELOAD``; ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_``; malloc settings in
``GLIBC_TUNABLES``) and where the C library is
not glibc. ``gfgp --release-cpu-memory ...`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

__all__ = ["reuse_freed_memory", "allocator_description", "memory_limits"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
# mallopt takes an int: blocks up to 2 GiB come from (and return to) the heap. glibc before 2.35
# refuses an mmap threshold above 32 MiB (its dynamic maximum on 64-bit): then 32 MiB, which
# still keeps most activations of a CPU training step in the heap.
_THRESHOLDS = (2**31 - 1, 32 * 2**20)
_ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state: Optional[str] = None  # what reuse_freed_memory() found or did, once it ran


def _user_choice() -> Optional[str]:
    """The allocator setting the user made through the environment, if any."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    chosen = [name for name in _ENV_SETTINGS if name in os.environ]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    return f"glibc malloc as set by {', '.join(chosen)}" if chosen else None


def reuse_freed_memory() -> str:
    """Make glibc's malloc keep freed blocks for reuse; returns :func:`allocator_description`.

    Idempotent; a no-op (described as such) outside Linux/glibc or where the user chose an
    allocator setting.
    """
    global _state
    if _state is not None:
        return _state
    user = _user_choice()
    if user is not None:
        _state = f"{user}: left as chosen"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "the C library's default allocator (not glibc: freed memory is not tuned)"
    else:
        _state = "glibc malloc defaults (mallopt refused the thresholds)"
        try:
            libc = ctypes.CDLL(None)
            for threshold in _THRESHOLDS:
                if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1:
                    size = "2 GiB" if threshold > 2**30 else f"{threshold // 2**20} MiB"
                    _state = f"glibc malloc, freed memory kept for reuse (mmap and trim thresholds {size})"
                    break
        except (OSError, AttributeError):
            pass
    return _state


def allocator_description() -> str:
    """One line saying how CPU memory is allocated in this process (for benchmark reports)."""
    if _state is not None:
        return _state
    return _user_choice() or "the C library's default allocator (freed large blocks go back to the OS)"


def memory_limits() -> "list[tuple[int, str]]":
    """``(bytes, what sets it)`` for every limit on the memory this process may still allocate
    that can be read: the kernel's ``MemAvailable`` (free memory plus caches it can drop), the
    memory cgroup's limit less its usage (a container's; v2 or v1), the address-space limit
    (``ulimit -v``) less the address space in use; where none can be read, the physical memory.
    The least of them is what is available; empty only where not even that is known."""
    import resource
    from pathlib import Path

    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [(int(line.split()[1]) * 1024, "available memory") for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max", or v1's "no limit" (a page-rounded 2**63)
            found.append((max(int(limit) - usage, 0), "the cgroup's memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/status") as f:
                size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            found.append((max(0, soft - size), "the address-space limit (ulimit -v)"))
        except (OSError, StopIteration, ValueError):
            pass
    if not found:
        try:
            found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"))
        except (ValueError, OSError, AttributeError):
            pass
    return found
