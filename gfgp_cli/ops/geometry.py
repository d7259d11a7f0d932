"""Pooling geometry shared by every max-entropy pooling kernel: argument checks and output size."""

from __future__ import annotations

import numbers
from typing import Sequence, Tuple, Union

__all__ = ["check_pool_geometry", "pool_output_size", "window_pads"]

_IntOrPair = Union[int, Sequence[int]]


def _pair(value: _IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, (int, numbers.Integral)):
        return int(value), int(value)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(items[0]), int(items[1])


def check_pool_geometry(
    kernel_size: _IntOrPair, stride: _IntOrPair | None = None, padding: _IntOrPair = 0
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Normalise and validate pooling geometry; ``stride=None`` means ``stride=kernel_size``.

    Returns ``(kernel, stride, padding)`` as pairs. Raises ValueError, naming the argument, for a
    kernel or stride below 1, a negative padding, or a padding above half the kernel (a window
    made only of padding would have no valid position).
    """
    kernel = _pair(kernel_size, "kernel_size")
    stride_ = kernel if stride is None else _pair(stride, "stride")
    pad = _pair(padding, "padding")
    if min(kernel) < 1:
        raise ValueError(f"kernel_size must be >= 1, got kernel_size={kernel}")
    if min(stride_) < 1:
        raise ValueError(f"stride must be >= 1, got stride={stride_}")
    if min(pad) < 0 or pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise ValueError(
            f"padding must be between 0 and half the kernel, got padding={pad} for kernel_size={kernel}"
        )
    return kernel, stride_, pad


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (the rule of ``F.avg_pool2d``/``F.max_pool2d``, dilation 1).

    ``out = floor_or_ceil((size + 2 padding - kernel) / stride) + 1``; in ceil mode the last
    window must start inside the input or the left padding, else it is dropped.
    """
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def window_pads(h: int, w: int, kernel, stride, padding, ceil_mode: bool) -> Tuple[int, int, Tuple[int, int, int, int]]:
    """``(out_h, out_w, pads)``: the output size and the ``F.pad`` amounts (left, right, top, bottom).

    After ``F.pad(x, pads)`` exactly ``out_h x out_w`` windows tile the padded input from its
    top-left corner; right/bottom may be negative (a crop: rows no window reaches).
    """
    out_h = pool_output_size(h, kernel[0], stride[0], padding[0], ceil_mode)
    out_w = pool_output_size(w, kernel[1], stride[1], padding[1], ceil_mode)
    bottom = (out_h - 1) * stride[0] + kernel[0] - h - padding[0]
    right = (out_w - 1) * stride[1] + kernel[1] - w - padding[1]
    return out_h, out_w, (padding[1], right, padding[0], bottom)
