"""Max-entropy pooling (docs/method.md section 1): the functional op, its checks and its autograd.

For one channel of one sample and one window R of valid (non-padded) positions::

    y = sum_i x_i exp(lam x_i) / sum_j exp(lam x_j)                    i, j in R
    dL/dx_i  = g p_i (1 + lam (x_i - y))        p_i = exp(lam x_i) / sum_j exp(lam x_j)
    dL/dlam  = g sum_i p_i (x_i - y)^2          (centred variance, not E[x^2] - y^2)

The op is registered as ``torch.ops.gfgp.maxent_pool2d`` (a ``torch.library`` custom op with a
fake kernel and a registered backward, itself the op ``torch.ops.gfgp.maxent_pool2d_backward``),
so FX, ``torch.export`` and ``torch.compile`` see one node. Both ops run the kernels that
:mod:`gfgp_cli.ops.dispatch` selects for the input (a fast path for CPU and for CUDA tensors, the
reference kernels of :mod:`gfgp_cli.ops.reference` elsewhere); every implementation shifts by the
window maximum of ``lam * x`` before ``exp`` and keeps nothing but the input, lam and the output
for backward, which recomputes the weights.
"""

from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import dispatch
from .geometry import check_pool_geometry, pool_output_size

__all__ = ["maxent_pool2d", "pool_output_size", "check_pool_geometry"]

_IntOrPair = Union[int, Sequence[int]]

# Floating dtypes the op accepts; the half types compute exp and sums in float32.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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


def maxent_pool2d(
    x: Tensor,
    lam: Union[float, Tensor],
    kernel_size: _IntOrPair,
    stride: _IntOrPair | None = None,
    padding: _IntOrPair = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """Max-entropy pooling: the softmax(lam * x)-weighted mean of each window.

    Kobayashi, "Global Feature Guided Local Pooling", ICCV 2019 (docs/method.md section 1). lam = 0 is
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
    if isinstance(x, torch.fx.Proxy) or isinstance(lam, torch.fx.Proxy):
        # Symbolic tracing (any torch.fx Tracer): record one call of this function, as
        # ``torch.fx.wrap`` would, but wherever the caller imported it from.
        proxy = x if isinstance(x, torch.fx.Proxy) else lam
        args = (x, lam, kernel_size, stride, padding, ceil_mode)
        return proxy.tracer.create_proxy("call_function", maxent_pool2d, args, {})
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
# The custom ops. Their schemas are part of the interface (ONNX export keys on them).


@torch.library.custom_op("gfgp::maxent_pool2d", mutates_args=())
def _maxent_pool2d_op(
    x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool
) -> Tensor:
    out = dispatch.select(x).forward(x, lam, kernel_size, stride, padding, ceil_mode)
    # Every implementation returns the layout the fake kernel promises (compiled graphs rely on it).
    return out.contiguous(memory_format=_output_memory_format(x))


def _output_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last output for channels_last input (as F.max_pool2d), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@_maxent_pool2d_op.register_fake
def _(x, lam, kernel_size, stride, padding, ceil_mode):
    out_h = pool_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], ceil_mode)
    out_w = pool_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], ceil_mode)
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w)).contiguous(memory_format=_output_memory_format(x))


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
    grad_x, grad_lam = dispatch.select(x).backward(grad, x, lam, out, kernel_size, stride, padding, ceil_mode)
    return _like(grad_x, x), _like(grad_lam, lam)


def _like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` with the strides of ``torch.empty_like(like)`` (what the fake kernel returns)."""
    target = torch.empty_like(like)
    return value if value.stride() == target.stride() else target.copy_(value)


@_maxent_pool2d_backward_op.register_fake
def _(grad, x, lam, out, kernel_size, stride, padding, ceil_mode):
    return torch.empty_like(x), torch.empty_like(lam)


def _setup_context(ctx, inputs, output):
    x, lam, kernel_size, stride, padding, ceil_mode = inputs
    ctx.save_for_backward(x, lam, output)
    ctx.geometry = (kernel_size, stride, padding, ceil_mode)
    # Backward runs with the implementation that was in force at forward time.
    ctx.implementation = dispatch.current_implementation()


def _backward(ctx, grad):
    x, lam, out = ctx.saved_tensors
    with dispatch.use_implementation(ctx.implementation):
        grad_x, grad_lam = torch.ops.gfgp.maxent_pool2d_backward(grad, x, lam, out, *ctx.geometry)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_lam if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
    )


_maxent_pool2d_op.register_autograd(_backward, setup_context=_setup_context)
