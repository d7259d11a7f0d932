"""Pooling geometry shared by every max-entropy pooling kernel: argument checks and output size."""

from __future__ import annotations

import numbers
from typing import Sequence, Tuple, Union

__all__ = ["check_pool_geometry", "pool_output_size", "output_size", "window_pads"]

_IntOrTuple = Union[int, Sequence[int]]


def _tuple(value: _IntOrTuple, name: str, dims: int) -> Tuple[int, ...]:
    what = "an int or a pair of ints" if dims == 2 else f"an int or a tuple of {dims} ints"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, (int, numbers.Integral)):
        return (int(value),) * dims
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if len(items) != dims or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return tuple(int(v) for v in items)


def check_pool_geometry(
    kernel_size: _IntOrTuple, stride: _IntOrTuple | None = None, padding: _IntOrTuple = 0, dims: int = 2
) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """Normalise and validate pooling geometry; ``stride=None`` means ``stride=kernel_size``.

    Returns ``(kernel, stride, padding)`` as tuples of ``dims`` ints (pairs for 2-D pooling,
    ``(t, h, w)`` triples for 3-D). Raises ValueError, naming the argument, for a kernel or
    stride below 1, a negative padding, or a padding above half the kernel (a window made only
    of padding would have no valid position).
    """
    kernel = _tuple(kernel_size, "kernel_size", dims)
    stride_ = kernel if stride is None else _tuple(stride, "stride", dims)
    pad = _tuple(padding, "padding", dims)
    if min(kernel) < 1:
        raise ValueError(f"kernel_size must be >= 1, got kernel_size={kernel}")
    if min(stride_) < 1:
        raise ValueError(f"stride must be >= 1, got stride={stride_}")
    if min(pad) < 0 or any(p > k // 2 for p, k in zip(pad, kernel)):
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


def output_size(spatial: Sequence[int], kernel, stride, padding, ceil_mode: bool) -> Tuple[int, ...]:
    """The pooled spatial size, :func:`pool_output_size` per dim (``(out_h, out_w)`` or ``(out_t, out_h, out_w)``)."""
    return tuple(pool_output_size(n, k, s, p, ceil_mode) for n, k, s, p in zip(spatial, kernel, stride, padding))


def window_pads(spatial: Sequence[int], kernel, stride, padding, ceil_mode: bool) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(out, pads)``: the output size and the ``F.pad`` amounts (last dim first, left then right).

    After ``F.pad(x, pads)`` exactly ``prod(out)`` windows tile the padded input from its first
    corner; a right amount may be negative (a crop: positions no window reaches). For 2-D input
    ``pads`` is ``(left, right, top, bottom)``; 3-D adds ``(front, back)``.
    """
    out = output_size(spatial, kernel, stride, padding, ceil_mode)
    pads: list = []
    for n, o, k, s_, p in reversed(list(zip(spatial, out, kernel, stride, padding))):
        pads += [p, (o - 1) * s_ + k - n - p]
    return out, tuple(pads)
