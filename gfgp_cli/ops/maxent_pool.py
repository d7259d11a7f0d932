"""Max-entropy pooling (PAPER.md section 1): the functional op, its checks and its autograd.

For one channel of one sample and one window R of valid (non-padded) positions::

    y = sum_i x_i exp(lam x_i) / sum_j exp(lam x_j)                    i, j in R
    dL/dx_i  = g p_i (1 + lam (x_i - y))        p_i = exp(lam x_i) / sum_j exp(lam x_j)
    dL/dlam  = g sum_i p_i (x_i - y)^2          (centred variance, not E[x^2] - y^2)

The op is registered as ``torch.ops.gfgp.maxent_pool2d`` (a ``torch.library`` custom op with a
fake kernel and a registered backward, itself the op ``torch.ops.gfgp.maxent_pool2d_backward``),
so FX, ``torch.export`` and ``torch.compile`` see one node. The kernels here are the portable
reference path: windows are strided *views* of the input (no copy), the window maximum of
``lam * x`` is subtracted before ``exp`` (finite for every finite input), and nothing but the
input, lam and the output is saved for backward: backward recomputes the weights.
"""

from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["maxent_pool2d", "pool_output_size", "check_pool_geometry"]

_IntOrPair = Union[int, Sequence[int]]

# Floating dtypes the op accepts; the half types compute exp and sums in float32.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _pair(value: _IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
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


def _lam_as_4d(lam: Union[float, Tensor], x: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    """Check lam's shape/dtype/device against x and return it as a 4-D tensor."""
    n, c = x.shape[0], x.shape[1]
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        return torch.full((1, 1, 1, 1), float(lam), dtype=x.dtype, device=x.device)
    if not isinstance(lam, Tensor):
        raise ValueError(f"lam must be a float or a Tensor, got {type(lam).__name__}")
    if lam.dtype != x.dtype:
        raise ValueError(f"lam must have the dtype of x: got lam.dtype={lam.dtype}, x.dtype={x.dtype}")
    if lam.device != x.device:
        raise ValueError(f"lam must be on the device of x: got lam.device={lam.device}, x.device={x.device}")
    if lam.dim() == 0:
        return lam.reshape(1, 1, 1, 1)
    allowed = [(1, 1, 1, 1), (1, c, 1, 1), (n, c, 1, 1), (n, 1, 1, 1), (n, c, out_hw[0], out_hw[1])]
    if tuple(lam.shape) not in allowed:
        raise ValueError(
            f"lam has shape {tuple(lam.shape)}, but for x of shape {tuple(x.shape)} it must be a float, "
            f"a 0-d tensor or one of {', '.join(str(a) for a in allowed)}"
        )
    return lam


@torch.fx.wrap
def maxent_pool2d(
    x: Tensor,
    lam: Union[float, Tensor],
    kernel_size: _IntOrPair,
    stride: _IntOrPair | None = None,
    padding: _IntOrPair = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """Max-entropy pooling: the softmax(lam * x)-weighted mean of each window.

    Kobayashi, "Global Feature Guided Local Pooling", ICCV 2019 (PAPER.md section 1). lam = 0 is
    ``F.avg_pool2d(..., count_include_pad=False)``; lam -> +inf approaches ``F.max_pool2d``.

    Args:
        x (Tensor[N, C, H, W]): input, float32, float64, float16 or bfloat16 (the half types
            compute exp and sums in float32 and return their own dtype).
        lam (float or Tensor): the inverse temperature, same dtype and device as ``x``: a float,
            a 0-d tensor, Tensor[1, 1, 1, 1], Tensor[1, C, 1, 1], Tensor[N, C, 1, 1],
            Tensor[N, 1, 1, 1] or Tensor[N, C, out_h, out_w] (one lam per output window).
        kernel_size (int or (int, int)): window size.
        stride (int or (int, int), optional): default ``kernel_size``.
        padding (int or (int, int)): implicit padding on both sides, at most half the kernel.
            Padded positions take part in nothing.
        ceil_mode (bool): ceil instead of floor in the output-size rule, as in ``nn.AvgPool2d``.

    Returns:
        Tensor[N, C, out_h, out_w]: always the shape of ``F.avg_pool2d`` with the same geometry,
        ``out = floor((H + 2 padding - kernel) / stride) + 1`` (ceil in ceil mode).

    Examples::

        >>> x = torch.randn(2, 8, 7, 7)
        >>> maxent_pool2d(x, torch.rand(2, 8, 1, 1), 3, 2, padding=1).shape
        torch.Size([2, 8, 4, 4])
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {shape}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    kernel, stride_, pad = check_pool_geometry(kernel_size, stride, padding)
    out_hw = (
        pool_output_size(x.shape[2], kernel[0], stride_[0], pad[0], ceil_mode),
        pool_output_size(x.shape[3], kernel[1], stride_[1], pad[1], ceil_mode),
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for kernel_size={kernel}, "
            f"padding={pad}: the output would be {out_hw}"
        )
    lam4 = _lam_as_4d(lam, x, out_hw)
    return torch.ops.gfgp.maxent_pool2d(x, lam4, list(kernel), list(stride_), list(pad), bool(ceil_mode))


# --------------------------------------------------------------------------------------------
# Reference kernels (any device). Windows are views: x_padded.unfold(2, kh, sh).unfold(3, kw, sw).


def _window_views(
    x: Tensor, kernel: List[int], stride: List[int], padding: List[int], ceil_mode: bool
) -> Tuple[Tensor, Tensor, Tuple[int, int, int, int]]:
    """Return (windows of x in float32/64, validity mask of the windows, the F.pad amounts).

    windows: Tensor[N, C, out_h, out_w, kh, kw] (a strided view of the padded input);
    mask: Tensor[out_h, out_w, kh, kw] bool, False at padded positions.
    """
    h, w = x.shape[-2:]
    out_h = pool_output_size(h, kernel[0], stride[0], padding[0], ceil_mode)
    out_w = pool_output_size(w, kernel[1], stride[1], padding[1], ceil_mode)
    # Pad (or crop: negative) the bottom/right so that exactly out_h x out_w windows fit.
    bottom = (out_h - 1) * stride[0] + kernel[0] - h - padding[0]
    right = (out_w - 1) * stride[1] + kernel[1] - w - padding[1]
    pads = (padding[1], right, padding[0], bottom)
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


@torch.library.custom_op("gfgp::maxent_pool2d", mutates_args=())
def _maxent_pool2d_op(
    x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool
) -> Tensor:
    windows, mask, _ = _window_views(x, kernel_size, stride, padding, ceil_mode)
    p = _weights(windows, mask, lam)
    # masked positions hold x = 0 (F.pad) and p = 0, so the plain sum is over valid positions.
    return (p * windows).sum(dim=(-2, -1)).to(x.dtype)


@_maxent_pool2d_op.register_fake
def _(x, lam, kernel_size, stride, padding, ceil_mode):
    out_h = pool_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], ceil_mode)
    out_w = pool_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], ceil_mode)
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


def _reduce_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the tensor that was broadcast."""
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


@torch.library.custom_op("gfgp::maxent_pool2d_backward", mutates_args=())
def _maxent_pool2d_backward_op(
    grad: Tensor,
    x: Tensor,
    lam: Tensor,
    out: Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    ceil_mode: bool,
) -> Tuple[Tensor, Tensor]:
    windows, mask, pads = _window_views(x, kernel_size, stride, padding, ceil_mode)
    p = _weights(windows, mask, lam)
    ct = windows.dtype
    g = grad.to(ct)[..., None, None]
    d = windows - out.to(ct)[..., None, None]  # x_i - y
    lam6 = lam.to(ct)[..., None, None]
    grad_windows = g * p * (1 + lam6 * d)  # dL/dx_i per window, PAPER.md section 1
    grad_lam = (grad.to(ct) * (p * d * d).sum(dim=(-2, -1)))  # centred variance
    # Scatter-add the windows back onto the padded input, then drop the padding.
    n, c, out_h, out_w, kh, kw = grad_windows.shape
    padded_hw = (x.shape[2] + pads[2] + pads[3], x.shape[3] + pads[0] + pads[1])
    cols = grad_windows.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, out_h * out_w)
    grad_padded = F.fold(cols, padded_hw, (kh, kw), stride=tuple(stride))
    grad_x = F.pad(grad_padded.reshape(n, c, *padded_hw), tuple(-p_ for p_ in pads))
    return grad_x.to(x.dtype), _reduce_to_shape(grad_lam, lam.shape).to(lam.dtype)


@_maxent_pool2d_backward_op.register_fake
def _(grad, x, lam, out, kernel_size, stride, padding, ceil_mode):
    return torch.empty_like(x), torch.empty_like(lam)


def _setup_context(ctx, inputs, output):
    x, lam, kernel_size, stride, padding, ceil_mode = inputs
    ctx.save_for_backward(x, lam, output)
    ctx.geometry = (kernel_size, stride, padding, ceil_mode)


def _backward(ctx, grad):
    x, lam, out = ctx.saved_tensors
    grad_x, grad_lam = torch.ops.gfgp.maxent_pool2d_backward(grad.contiguous(), x, lam, out, *ctx.geometry)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_lam if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
    )


_maxent_pool2d_op.register_autograd(_backward, setup_context=_setup_context)
