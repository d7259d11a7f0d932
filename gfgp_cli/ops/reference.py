"""The reference kernels of max-entropy pooling: portable, plain PyTorch, any device.

Windows are strided *views* of the padded input (``unfold``, no copy of the input), the window
maximum of ``lam * x`` is subtracted before ``exp`` (finite for every finite input), and
backward recomputes the weights from the input, lam and the output. The temporaries are
k*k times the output (the weights of every window); nothing of that is kept for backward.
These kernels define the op's semantics; the fast paths are tested against them.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import window_pads

__all__ = ["forward", "backward", "unsupported", "build_error"]


def unsupported(x: Tensor) -> None:
    """The reference kernels take every device and dtype the op accepts."""
    return None


def build_error() -> None:
    """Nothing to build."""
    return None


def _window_views(
    x: Tensor, kernel: List[int], stride: List[int], padding: List[int], ceil_mode: bool
) -> Tuple[Tensor, Tensor, Tuple[int, int, int, int]]:
    """Return (windows of x in float32/64, validity mask of the windows, the F.pad amounts).

    windows: Tensor[N, C, out_h, out_w, kh, kw] (a strided view of the padded input);
    mask: Tensor[out_h, out_w, kh, kw] bool, False at padded positions.
    """
    h, w = x.shape[-2:]
    _, _, pads = window_pads(h, w, kernel, stride, padding, ceil_mode)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = F.pad(x.to(compute_dtype), pads)
    ones = F.pad(torch.ones((1, 1, h, w), dtype=torch.uint8, device=x.device), pads)
    windows = xp.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
    mask = ones.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])[0, 0].bool()
    return windows, mask, pads


def _weights(windows: Tensor, mask: Tensor, lam: Tensor) -> Tensor:
    """p = softmax over each window of lam * x, padded positions excluded (weight exactly 0)."""
    z = windows * lam.to(windows.dtype)[..., None, None]
    z = z.masked_fill(~mask, float("-inf"))
    # Subtract the window's true maximum (at least one valid position per window, since
    # padding <= kernel / 2 and ceil-mode windows start inside the input), so exp never overflows
    # and the sum is >= 1: no 0/0 for any finite input.
    z = z - z.amax(dim=(-2, -1), keepdim=True)
    e = torch.exp(z)
    return e / e.sum(dim=(-2, -1), keepdim=True)


def _reduce_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the tensor that was broadcast."""
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def forward(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
            ceil_mode: bool) -> Tensor:
    """y = sum_i p_i x_i per window (docs/method.md section 1); Tensor[N, C, out_h, out_w], x's dtype."""
    windows, mask, _ = _window_views(x, kernel_size, stride, padding, ceil_mode)
    p = _weights(windows, mask, lam)
    # masked positions hold x = 0 (F.pad) and p = 0, so the plain sum is over valid positions.
    return (p * windows).sum(dim=(-2, -1)).to(x.dtype)


def backward(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
             padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx, dL/dlam) with the formulas of docs/method.md section 1 (centred variance for lam)."""
    windows, mask, pads = _window_views(x, kernel_size, stride, padding, ceil_mode)
    p = _weights(windows, mask, lam)
    ct = windows.dtype
    g = grad.to(ct)[..., None, None]
    d = windows - out.to(ct)[..., None, None]  # x_i - y
    lam6 = lam.to(ct)[..., None, None]
    grad_windows = g * p * (1 + lam6 * d)  # dL/dx_i per window, docs/method.md section 1
    grad_lam = (grad.to(ct) * (p * d * d).sum(dim=(-2, -1)))  # centred variance
    # Scatter-add the windows back onto the padded input, then drop the padding.
    n, c, out_h, out_w, kh, kw = grad_windows.shape
    padded_hw = (x.shape[2] + pads[2] + pads[3], x.shape[3] + pads[0] + pads[1])
    cols = grad_windows.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, out_h * out_w)
    grad_padded = F.fold(cols, padded_hw, (kh, kw), stride=tuple(stride))
    grad_x = F.pad(grad_padded.reshape(n, c, *padded_hw), tuple(-p_ for p_ in pads))
    return grad_x.to(x.dtype), _reduce_to_shape(grad_lam, lam.shape).to(lam.dtype)
