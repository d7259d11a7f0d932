"""Skip pools: keep the first element of every stride cell (docs/method.md section 3), 2-D and 3-D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SkipPool", "SkipPool2d", "SkipPool3d", "skip_pool"]


class SkipPool(nn.Module):
    """Spatial subsampling ``x[:, :, ::s_1, ..., ::s_d]`` over the last ``dims`` dims.

    A convolution with stride ``s`` equals the same convolution at stride 1 followed by a skip
    pool of stride ``s`` for every input size: the strided output size ``floor((H' - 1) / s) + 1``
    equals ``ceil(H' / s)``, the number of rows this module keeps from the stride-1 output of
    height ``H'`` (per dim). Use :class:`SkipPool2d` or :class:`SkipPool3d` (or
    :func:`skip_pool`, which picks one by the stride's length); the passes match this base class.

    The output is a contiguous tensor in the input's memory format (channels-last stays
    channels-last), not the strided view ``x[..., ::2, ::2]`` is: what follows may call
    ``.view()`` on it (timm's EVA reshapes its patch embedding's output so), and kernels that
    take a different code path for a non-contiguous input (BatchNorm's, attention's) round as
    they did on the strided conv's output, which keeps a decomposition exact in float32.
    """

    dims = 0  # spatial dims; set by the subclasses

    def __init__(self, stride: int | Sequence[int]) -> None:
        super().__init__()
        try:
            values = (stride,) * self.dims if isinstance(stride, int) else tuple(stride)
        except TypeError:
            values = ()
        if len(values) != self.dims or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                               for s in values):
            raise ValueError(f"{type(self).__name__}: stride must be a positive int or a tuple of {self.dims} of them, "
                             f"got {stride!r}")
        self.stride: tuple[int, ...] = values

    def forward(self, x: Tensor) -> Tensor:
        # graph_passes.move_pools relies on the last dims being spatial and dim 1 being C.
        if x.dim() != self.dims + 2:
            layout = "(N, C, H, W)" if self.dims == 2 else "(N, C, T, H, W)"
            raise ValueError(f"{type(self).__name__} expects a {self.dims + 2}-D input {layout}, "
                             f"got shape {tuple(x.shape)}")
        kept = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        return kept.contiguous(memory_format=_memory_format(x, self.dims))

    def extra_repr(self) -> str:
        return f"stride={self.stride[0]}" if len(set(self.stride)) == 1 else f"stride={self.stride}"


_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def _memory_format(x: Tensor, dims: int) -> torch.memory_format:
    """Channels-last for an input stored channels-last (and not also plain contiguous), else contiguous."""
    channels_last = _CHANNELS_LAST[dims]
    if x.is_contiguous(memory_format=channels_last) and not x.is_contiguous():
        return channels_last
    return torch.contiguous_format


class SkipPool2d(SkipPool):
    """``x[..., ::stride_h, ::stride_w]``: the skip pool of a strided ``nn.Conv2d``.

    Args:
        stride (int or tuple[int, int]): subsampling step ``(stride_h, stride_w)``, each >= 1.

    Shape:
        - input: ``Tensor[N, C, H, W]``
        - output: ``Tensor[N, C, ceil(H / stride_h), ceil(W / stride_w)]``

    Examples::

        >>> SkipPool2d(2)(torch.randn(1, 8, 7, 6)).shape
        torch.Size([1, 8, 4, 3])
    """

    dims = 2


class SkipPool3d(SkipPool):
    """``x[..., ::stride_t, ::stride_h, ::stride_w]``: the skip pool of a strided ``nn.Conv3d``.

    Args:
        stride (int or tuple[int, int, int]): subsampling step ``(stride_t, stride_h, stride_w)``.

    Shape:
        - input: ``Tensor[N, C, T, H, W]``
        - output: ``Tensor[N, C, ceil(T / stride_t), ceil(H / stride_h), ceil(W / stride_w)]``

    Examples::

        >>> SkipPool3d((1, 2, 2))(torch.randn(1, 8, 5, 7, 6)).shape
        torch.Size([1, 8, 5, 4, 3])
    """

    dims = 3


def skip_pool(stride: Sequence[int]) -> SkipPool:
    """A :class:`SkipPool2d` for a pair, a :class:`SkipPool3d` for a triple."""
    kinds: dict[int, type[SkipPool]] = {2: SkipPool2d, 3: SkipPool3d}
    if len(stride) not in kinds:
        raise ValueError(f"a skip pool has 2 or 3 spatial dims, got stride={tuple(stride)}")
    return kinds[len(stride)](tuple(stride))
