"""The reference kernels of max-entropy pooling: portable, plain PyTorch, any device, 2-D and 3-D.

Windows are strided *views* of the padded input (``unfold``, no copy of the input), the window
maximum of ``lam * x`` is subtracted before ``exp`` (finite for every finite input), and
backward recomputes the weights from the input, lam and the output. The temporaries are
(window size) times the output (the weights of every window); nothing of that is kept for
backward. A 4-D input ``[N, C, H, W]`` is computed as the 5-D input ``[N, C, 1, H, W]`` with a
temporal kernel of 1, so one code path defines both ops. These kernels define the op's
semantics; the fast paths are tested against them.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import window_pads

__all__ = ["forward", "backward", "unsupported", "build_error"]

_WINDOW_DIMS = (-3, -2, -1)


def unsupported(x: Tensor) -> None:
    """The reference kernels take every device and dtype the op accepts."""
    return None


def build_error() -> None:
    """Nothing to build."""
    return None


def _as_3d(x: Tensor, lam: Tensor, kernel: List[int], stride: List[int], padding: List[int]):
    """A 2-D problem as the 3-D one with T = 1 and a temporal kernel of 1 (views, no copies)."""
    if x.dim() == 5:
        return x, lam, list(kernel), list(stride), list(padding)
    return x.unsqueeze(2), lam.unsqueeze(2), [1, *kernel], [1, *stride], [0, *padding]


def _window_views(
    x: Tensor, kernel: List[int], stride: List[int], padding: List[int], ceil_mode: bool
) -> Tuple[Tensor, Tensor, Tuple[int, ...]]:
    """Return (windows of x in float32/64, validity mask of the windows, the F.pad amounts).

    x: Tensor[N, C, T, H, W]; windows: Tensor[N, C, OT, OH, OW, kt, kh, kw] (a strided view of the
    padded input); mask: Tensor[OT, OH, OW, kt, kh, kw] bool, False at padded positions.
    """
    spatial = tuple(x.shape[2:])
    _, pads = window_pads(spatial, kernel, stride, padding, ceil_mode)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = F.pad(x.to(compute_dtype), pads)
    ones = F.pad(torch.ones((1, 1, *spatial), dtype=torch.uint8, device=x.device), pads)
    windows, mask = xp, ones
    for d in range(3):
        windows = windows.unfold(2 + d, kernel[d], stride[d])
        mask = mask.unfold(2 + d, kernel[d], stride[d])
    return windows, mask[0, 0].bool(), pads


def _weights(windows: Tensor, mask: Tensor, lam: Tensor) -> Tensor:
    """p = softmax over each window of lam * x, padded positions excluded (weight exactly 0)."""
    z = windows * lam.to(windows.dtype)[..., None, None, None]
    z = z.masked_fill(~mask, float("-inf"))
    # Subtract the window's true maximum (at least one valid position per window, since
    # padding <= kernel / 2 and ceil-mode windows start inside the input), so exp never overflows
    # and the sum is >= 1: no 0/0 for any finite input.
    z = z - z.amax(dim=_WINDOW_DIMS, keepdim=True)
    e = torch.exp(z)
    return e / e.sum(dim=_WINDOW_DIMS, keepdim=True)


def _reduce_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the tensor that was broadcast."""
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def forward(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
            ceil_mode: bool) -> Tensor:
    """y = sum_i p_i x_i per window (docs/method.md section 1); Tensor[N, C, *out], x's dtype.

    ``x`` is Tensor[N, C, H, W] with pairs or Tensor[N, C, T, H, W] with (t, h, w) triples.
    """
    x5, lam5, kernel, stride, padding = _as_3d(x, lam, kernel_size, stride, padding)
    windows, mask, _ = _window_views(x5, kernel, stride, padding, ceil_mode)
    p = _weights(windows, mask, lam5)
    # masked positions hold x = 0 (F.pad) and p = 0, so the plain sum is over valid positions.
    y = (p * windows).sum(dim=_WINDOW_DIMS).to(x.dtype)
    return y if x.dim() == 5 else y.squeeze(2)


def _scatter_windows(grad_windows: Tensor, padded: Tuple[int, int, int], stride: List[int]) -> Tensor:
    """The transpose of the window views: sum each window's values back onto the padded input.

    grad_windows: Tensor[N, C, OT, OH, OW, kt, kh, kw] -> Tensor[N, C, Tp, Hp, Wp]. Each temporal
    offset is one ``F.fold`` over (h, w) with the OT output frames in the batch.
    """
    n, c, ot, oh, ow, kt, kh, kw = grad_windows.shape
    tp, hp, wp = padded
    out = grad_windows.new_zeros((n, c, tp, hp, wp))
    for a in range(kt):
        cols = grad_windows[..., a, :, :].permute(0, 2, 1, 5, 6, 3, 4).reshape(n * ot, c * kh * kw, oh * ow)
        frames = F.fold(cols, (hp, wp), (kh, kw), stride=(stride[1], stride[2]))
        out[:, :, a: a + (ot - 1) * stride[0] + 1: stride[0]] += frames.reshape(n, ot, c, hp, wp).transpose(1, 2)
    return out


def backward(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
             padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx, dL/dlam) with the formulas of docs/method.md section 1 (centred variance for lam)."""
    x5, lam5, kernel, stride_, padding_ = _as_3d(x, lam, kernel_size, stride, padding)
    if x.dim() == 4:
        grad, out = grad.unsqueeze(2), out.unsqueeze(2)
    windows, mask, pads = _window_views(x5, kernel, stride_, padding_, ceil_mode)
    p = _weights(windows, mask, lam5)
    ct = windows.dtype
    g = grad.to(ct)[..., None, None, None]
    d = windows - out.to(ct)[..., None, None, None]  # x_i - y
    grad_windows = g * p * (1 + lam5.to(ct)[..., None, None, None] * d)  # dL/dx_i per window
    grad_lam = grad.to(ct) * (p * d * d).sum(dim=_WINDOW_DIMS)  # centred variance
    # Scatter-add the windows back onto the padded input, then drop the padding.
    padded = tuple(size + pads[2 * (2 - i)] + pads[2 * (2 - i) + 1] for i, size in enumerate(x5.shape[2:]))
    grad_padded = _scatter_windows(grad_windows, padded, stride_)
    grad_x = F.pad(grad_padded, tuple(-p_ for p_ in pads))
    grad_lam = _reduce_to_shape(grad_lam, lam5.shape)
    if x.dim() == 4:
        grad_x, grad_lam = grad_x.squeeze(2), grad_lam.squeeze(2)
    return grad_x.to(x.dtype), grad_lam.to(lam.dtype)
