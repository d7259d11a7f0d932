"""Pools with TensorFlow's "SAME" padding: the padding is computed from each input's size.

A "SAME" pool of kernel ``k`` and stride ``s`` keeps ``ceil(n / s)`` outputs of a side of
``n``: it pads that side by ``pad = max((ceil(n / s) - 1) s + k - n, 0)`` in all, ``pad // 2``
before and the rest after, then pools without padding. Libraries that port TensorFlow models
build it as a subclass of ``nn.MaxPool2d`` / ``nn.AvgPool2d`` whose ``forward`` pads first (timm's
``MaxPool2dSame`` and ``AvgPool2dSame``), so the module's ``padding`` attribute (0) does not
describe what it computes, and a replacement built from the attributes would not keep the sizes.

For max pooling, and for average pooling that leaves the padding out of its counts, the same
result comes from a plain pool with the symmetric padding ``pad // 2`` and ``ceil_mode=True``
(:func:`same_geometry`): every window starts where the "SAME" window starts, and the ceil mode
adds the last window exactly when the "SAME" pool padded after more than before. So a pooling
layer that takes a padding and a ceil mode computes the "SAME" pool once it gets them per input.

:func:`as_same_pool` checks a pool module against that definition by running it (no
library is known here); :class:`SamePool` is the reference, and what the ``max``/``avg``
factories of a caller can return for such a site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

__all__ = ["SamePool", "same_padding", "same_geometry", "as_same_pool"]

_MAX_POOLS = (nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool2d, nn.AvgPool3d)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(before, after)``: the "SAME" padding of a side of ``size`` for ``kernel`` and ``stride``."""
    pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


def same_geometry(spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """``(padding, ceil_mode)`` of the plain pool that computes the "SAME" pool on ``spatial``.

    ``padding`` is ``pad // 2`` per dim and ``ceil_mode`` True. With a stride of 2 or more this
    holds for every size; at stride 1 an even kernel pads once more after than before, which the
    ceil mode cannot add (ValueError; a stride-1 pool does not downsample).
    """
    padding = tuple(same_padding(n, k, s)[0] for n, k, s in zip(spatial, kernel, stride))
    for n, k, s, p in zip(spatial, kernel, stride, padding):
        out = (n + 2 * p - k + s - 1) // s + 1
        if out * s >= n + p + s:  # the ceil-mode rule drops a last window that starts in the padding
            out -= 1
        if out != math.ceil(n / s):
            raise ValueError(f"the 'SAME' padding {same_padding(n, k, s)} of a side of {n} (kernel {k}, stride {s}) "
                             "has no symmetric form: use a stride of 2 or more, or an odd kernel")
    return padding, True


class SamePool(nn.Module):
    """Max or average pooling with "SAME" padding, 2-D or 3-D (``len(kernel_size)`` dims).

    ``kind`` is ``"max"`` or ``"avg"``. Max pooling pads with -inf. Average pooling with
    ``count_include_pad=True`` pads with zeros and counts them (every window divides by its full
    size, as a pool over an explicitly padded input does); with False the padding is left out.

    Shape:
        input Tensor[N, C, *spatial] -> Tensor[N, C, *ceil(spatial / stride)].
    """

    def __init__(self, kind: str, kernel_size: Sequence[int], stride: Sequence[int] | None = None,
                 count_include_pad: bool = True) -> None:
        super().__init__()
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        self.kind = kind
        self.kernel_size = tuple(kernel_size)
        self.dims = len(self.kernel_size)
        if self.dims not in (2, 3):
            raise ValueError(f"kernel_size must have 2 or 3 entries, got {kernel_size!r}")
        self.stride = tuple(_ntuple(self.dims)(stride)) if stride is not None else self.kernel_size
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[2:]
        if self.kind == "avg" and self.count_include_pad:
            pads: list[int] = []
            for n, k, s in reversed(list(zip(spatial, self.kernel_size, self.stride))):  # F.pad: last dim first
                pads += same_padding(n, k, s)
            pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
            return pool(F.pad(x, pads), self.kernel_size, self.stride)
        padding, ceil_mode = same_geometry(spatial, self.kernel_size, self.stride)
        if self.kind == "max":
            max_pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
            return max_pool(x, self.kernel_size, self.stride, padding, ceil_mode=ceil_mode)
        avg_pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        return avg_pool(x, self.kernel_size, self.stride, padding, ceil_mode, count_include_pad=False)

    def extra_repr(self) -> str:
        s = f"{self.kind!r}, kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"
        return s + (", count_include_pad=False" if self.kind == "avg" and not self.count_include_pad else "")


def _check_sizes(kernel: Sequence[int], stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Input sizes that meet every residue of the size modulo the stride, per dim, with other sides
    differing (a padding computed from the wrong dim shows): ``k, k+1, ..., k+2s-1``."""
    ranges = [list(range(k, k + 2 * s)) for k, s in zip(kernel, stride)]
    count = max(len(r) for r in ranges)
    return [tuple(r[(i + shift) % len(r)] for shift, r in enumerate(ranges)) for i in range(count)]


def as_same_pool(pool: nn.Module, in_shape: Sequence[int]) -> SamePool | str:
    """The :class:`SamePool` that ``pool`` (a max/avg pool module, 2-D or 3-D) computes for
    every input size, or why there is none (one line).

    Checked by running it in float64 on random inputs with ``in_shape``'s channels (batch 1) at
    sizes that meet every residue modulo the stride (:func:`_check_sizes`), against the
    :class:`SamePool` of its ``kernel_size`` and ``stride``; an average pool may count its
    padding or not, whatever its ``count_include_pad`` says (a forward that pads explicitly
    counts the zeros). Needs padding 0, dilation 1 and no ceil mode in the module's attributes.
    """
    is_max = isinstance(pool, _MAX_POOLS)
    if not is_max and not isinstance(pool, _AVG_POOLS):
        return f"{type(pool).__name__} is not a max or average pool"
    dims = 2 if isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)) else 3
    ntuple = _ntuple(dims)
    kernel = tuple(ntuple(pool.kernel_size))
    stride = tuple(ntuple(pool.stride)) if pool.stride is not None else kernel
    extras = [max(ntuple(pool.padding)) > 0, bool(pool.ceil_mode)]
    if is_max:
        extras += [max(ntuple(pool.dilation)) > 1, bool(pool.return_indices)]
    else:
        extras += [pool.divisor_override is not None]
    name = type(pool).__name__
    if any(extras):
        return f"{name} overrides its forward and has padding, dilation, ceil mode or other options set"
    candidates = [SamePool("max", kernel, stride)] if is_max else [
        SamePool("avg", kernel, stride, count_include_pad=flag) for flag in (True, False)]
    generator = torch.Generator().manual_seed(0)
    channels = int(in_shape[1]) if len(in_shape) > 1 else 1
    for spatial in _check_sizes(kernel, stride):
        x = torch.randn((1, channels, *spatial), generator=generator, dtype=torch.float64)
        try:
            with torch.no_grad():
                actual = pool(x)
        except Exception as e:  # noqa: BLE001 - a forward that fails at a size is no "SAME" pool
            return f"{name}'s forward fails on an input of spatial size {spatial}: {type(e).__name__}"
        shape = actual.shape if isinstance(actual, Tensor) else None
        with torch.no_grad():
            candidates = [c for c in candidates if (y := c(x)).shape == shape
                          and torch.allclose(actual, y, rtol=1e-12, atol=1e-12)]
        if not candidates:
            base = next(b for b in _MAX_POOLS + _AVG_POOLS if isinstance(pool, b)).__name__
            return f"{name} overrides {base}.forward and is no 'SAME' pool (spatial size {spatial})"
    return candidates[0]
