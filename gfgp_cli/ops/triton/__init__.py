"""The CUDA path of max-entropy pooling: Triton kernels (:mod:`.kernels`), imported lazily.

Nothing here imports Triton until a CUDA tensor needs it, so CPU-only installs never pay for
it. Covers 2-D pooling of Tensor[N, C, H, W] and 3-D pooling of Tensor[N, C, T, H, W] (one set
of kernels: 2-D input runs as 3-D with T = 1), float32, float16 and bfloat16 (float32
arithmetic), every lam shape, padding and ceil_mode, NCHW / channels_last and NCDHW /
channels_last_3d. Triton compiles each kernel variant at its first launch and
caches the build (its own cache, ``~/.triton/cache``); when that build fails the op warns once,
in one line, and runs the reference path from then on.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Type

import torch
from torch import Tensor

__all__ = ["forward", "backward", "unsupported", "build_error"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from . import kernels

    return kernels


def unsupported(x: Tensor) -> Optional[str]:
    """Why this path does not take ``x`` (None when it does)."""
    if x.device.type != "cuda":
        return f"it runs CUDA tensors only, got a {x.device.type} tensor"
    if x.dtype not in _DTYPES:
        return f"it runs float32, float16 and bfloat16, got {x.dtype}"
    return None


def build_error() -> Optional[str]:
    """Why the kernels cannot be loaded here (None when Triton imports)."""
    try:
        _kernels()
    except ImportError as e:
        return f"Triton is not importable: {e}"
    return None


def _build_errors() -> Tuple[Type[BaseException], ...]:
    """Exceptions that mean 'these kernels cannot be built here', not a bug in the inputs.

    Triton's own errors (compilation, ptxas, out of resources) and a failed compiler process
    (Triton builds a small C launcher at the first launch).
    """
    import subprocess

    from triton.errors import TritonError

    return TritonError, subprocess.CalledProcessError


def _run_or_fall_back(name: str, *args):
    from .. import dispatch, reference

    try:
        return getattr(_kernels(), f"launch_{name}")(*args)
    except _build_errors() as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        dispatch.mark_broken("triton", f"{type(e).__name__}: {first_line}")
        return getattr(reference, name)(*args)


def forward(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
            ceil_mode: bool) -> Tensor:
    """Tensor[N, C, *out] in x's dtype: x is Tensor[N, C, H, W] with pairs or Tensor[N, C, T, H, W]
    with (t, h, w) triples; channels_last (channels_last_3d) input gives such output."""
    return _run_or_fall_back("forward", x, lam, kernel_size, stride, padding, ceil_mode)


def backward(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
             padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx with x's dtype and strides, dL/dlam with lam's shape and dtype), 2-D or 3-D as ``forward``."""
    return _run_or_fall_back("backward", grad, x, lam, out, kernel_size, stride, padding, ceil_mode)
