"""SkipPool2d: keep the top-left element of every s_h x s_w cell (docs/method.md section 3)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["SkipPool2d"]


class SkipPool2d(nn.Module):
    """Spatial subsampling ``x[..., ::stride_h, ::stride_w]``.

    A convolution with stride ``s`` equals the same convolution at stride 1 followed by
    ``SkipPool2d(s)`` for every input size: the strided output size
    ``floor((H' - 1) / s) + 1`` equals ``ceil(H' / s)``, the number of rows this module keeps
    from the stride-1 output of height ``H'``.

    Args:
        stride (int or tuple[int, int]): subsampling step ``(stride_h, stride_w)``, each >= 1.

    Shape:
        - input: ``Tensor[N, C, H, W]``
        - output: ``Tensor[N, C, ceil(H / stride_h), ceil(W / stride_w)]``

    The output is a view of the input (no copy), like ``x[..., ::2, ::2]``.

    Examples::

        >>> SkipPool2d(2)(torch.randn(1, 8, 7, 6)).shape
        torch.Size([1, 8, 4, 3])
    """

    def __init__(self, stride: int | tuple[int, int]) -> None:
        super().__init__()
        stride_h, stride_w = _pair(stride)
        if not (isinstance(stride_h, int) and isinstance(stride_w, int)) or min(stride_h, stride_w) < 1:
            raise ValueError(f"SkipPool2d: stride must be a positive int or a pair of them, got {stride!r}")
        self.stride: tuple[int, int] = (stride_h, stride_w)

    def forward(self, x: Tensor) -> Tensor:
        # 4-D only: graph_passes.move_pools relies on dims -2/-1 being H/W and dim 1 being C.
        if x.dim() != 4:
            raise ValueError(f"SkipPool2d expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        return x[:, :, :: self.stride[0], :: self.stride[1]]

    def extra_repr(self) -> str:
        stride_h, stride_w = self.stride
        return f"stride={stride_h}" if stride_h == stride_w else f"stride={self.stride}"

