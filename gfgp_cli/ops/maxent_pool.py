"""Max-entropy pooling (docs/method.md section 1): the functional ops, their checks and autograd.

For one channel of one sample and one window R of valid (non-padded) positions::

    y = sum_i x_i exp(lam x_i) / sum_j exp(lam x_j)                    i, j in R
    dL/dx_i  = g p_i (1 + lam (x_i - y))        p_i = exp(lam x_i) / sum_j exp(lam x_j)
    dL/dlam  = g sum_i p_i (x_i - y)^2          (centred variance, not E[x^2] - y^2)

Windows are 2-D (``maxent_pool2d`` on Tensor[N, C, H, W]) or 3-D (``maxent_pool3d`` on
Tensor[N, C, T, H, W], for video and volumes). Each is registered as a ``torch.library`` custom
op, ``torch.ops.gfgp.maxent_pool2d`` / ``torch.ops.gfgp.maxent_pool3d``, with a fake kernel and a
registered backward (itself the op ``torch.ops.gfgp.maxent_pool2d_backward`` /
``..._3d_backward``), so FX, ``torch.export`` and ``torch.compile`` see one node. Both ranks run
the same kernels, which :mod:`gfgp_cli.ops.dispatch` selects for the input (a fast path for CPU
and for CUDA tensors, the reference kernels of :mod:`gfgp_cli.ops.reference` elsewhere); every
implementation shifts by the window maximum of ``lam * x`` before ``exp`` and keeps nothing but
the input, lam and the output for backward, which recomputes the weights.
"""

from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import dispatch
from .geometry import check_pool_geometry, output_size, pool_output_size

__all__ = ["maxent_pool2d", "maxent_pool3d", "pool_output_size", "check_pool_geometry"]

_IntOrTuple = Union[int, Sequence[int]]

# Floating dtypes the op accepts; the half types compute exp and sums in float32.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _lam_full_rank(lam: Union[float, Tensor], x: Tensor, out: Tuple[int, ...]) -> Tensor:
    """Check lam's shape/dtype/device against x and return it with x's number of dims."""
    n, c, ones = x.shape[0], x.shape[1], (1,) * len(out)
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        return torch.full((1, 1, *ones), float(lam), dtype=x.dtype, device=x.device)
    if not isinstance(lam, Tensor):
        raise ValueError(f"lam must be a float or a Tensor, got {type(lam).__name__}")
    if lam.dtype != x.dtype:
        raise ValueError(f"lam must have the dtype of x: got lam.dtype={lam.dtype}, x.dtype={x.dtype}")
    if lam.device != x.device:
        raise ValueError(f"lam must be on the device of x: got lam.device={lam.device}, x.device={x.device}")
    if lam.dim() == 0:
        return lam.reshape(1, 1, *ones)
    allowed = [(1, 1, *ones), (1, c, *ones), (n, c, *ones), (n, 1, *ones), (n, c, *out)]
    if tuple(lam.shape) not in allowed:
        raise ValueError(
            f"lam has shape {tuple(lam.shape)}, but for x of shape {tuple(x.shape)} it must be a float, "
            f"a 0-d tensor or one of {', '.join(str(a) for a in allowed)}"
        )
    return lam


def _checked(x: Tensor, lam, kernel_size, stride, padding, ceil_mode, dims: int):
    """The op's arguments validated and normalised: (x, lam with x's rank, kernel, stride, padding, ceil)."""
    layout = "[N, C, H, W]" if dims == 2 else "[N, C, T, H, W]"
    if not isinstance(x, Tensor) or x.dim() != dims + 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a {dims + 2}-D tensor {layout}, got {shape}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    kernel, stride_, pad = check_pool_geometry(kernel_size, stride, padding, dims=dims)
    out = output_size(x.shape[2:], kernel, stride_, pad, ceil_mode)
    if min(out) < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for kernel_size={kernel}, "
            f"padding={pad}: the output would be {out}"
        )
    return x, _lam_full_rank(lam, x, out), list(kernel), list(stride_), list(pad), bool(ceil_mode)


def _traced_call(fn, x, lam, kernel_size, stride, padding, ceil_mode):
    """Under symbolic tracing (any torch.fx Tracer) record one call of ``fn``, as ``torch.fx.wrap``
    would but wherever the caller imported it from; None when nothing is being traced."""
    if isinstance(x, torch.fx.Proxy) or isinstance(lam, torch.fx.Proxy):
        proxy = x if isinstance(x, torch.fx.Proxy) else lam
        return proxy.tracer.create_proxy("call_function", fn, (x, lam, kernel_size, stride, padding, ceil_mode), {})
    return None


def maxent_pool2d(
    x: Tensor,
    lam: Union[float, Tensor],
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple | None = None,
    padding: _IntOrTuple = 0,
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
    traced = _traced_call(maxent_pool2d, x, lam, kernel_size, stride, padding, ceil_mode)
    if traced is not None:
        return traced
    return torch.ops.gfgp.maxent_pool2d(*_checked(x, lam, kernel_size, stride, padding, ceil_mode, dims=2))


def maxent_pool3d(
    x: Tensor,
    lam: Union[float, Tensor],
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple | None = None,
    padding: _IntOrTuple = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """Max-entropy pooling over (T, H, W) windows: :func:`maxent_pool2d` for video and volumes.

    The same formula, gradients and stability rules; lam = 0 is
    ``F.avg_pool3d(..., count_include_pad=False)``; lam -> +inf approaches ``F.max_pool3d``.

    Args:
        x (Tensor[N, C, T, H, W]): input, float32, float64, float16 or bfloat16.
        lam (float or Tensor): a float, a 0-d tensor, Tensor[1, 1, 1, 1, 1], Tensor[1, C, 1, 1, 1],
            Tensor[N, C, 1, 1, 1], Tensor[N, 1, 1, 1, 1] or Tensor[N, C, out_t, out_h, out_w].
        kernel_size (int or (int, int, int)): window size ``(t, h, w)``, e.g. ``(1, 2, 2)`` to pool
            frames spatially only.
        stride, padding, ceil_mode: as for :func:`maxent_pool2d`, per dim ``(t, h, w)``.

    Returns:
        Tensor[N, C, out_t, out_h, out_w]: the shape of ``F.avg_pool3d`` with the same geometry.

    Examples::

        >>> x = torch.randn(2, 8, 4, 7, 7)
        >>> maxent_pool3d(x, torch.rand(2, 8, 1, 1, 1), (1, 3, 3), (1, 2, 2), padding=(0, 1, 1)).shape
        torch.Size([2, 8, 4, 4, 4])
    """
    traced = _traced_call(maxent_pool3d, x, lam, kernel_size, stride, padding, ceil_mode)
    if traced is not None:
        return traced
    return torch.ops.gfgp.maxent_pool3d(*_checked(x, lam, kernel_size, stride, padding, ceil_mode, dims=3))

# --------------------------------------------------------------------------------------------
# The custom ops. Their schemas are part of the interface (ONNX export keys on them).


def _output_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last (3-D: channels_last_3d) output for such input (as F.max_pool2d/3d), else contiguous."""
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.dim() in (4, 5) and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        return fmt
    return torch.contiguous_format


def _like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` with the strides of ``torch.empty_like(like)`` (what the fake kernel returns)."""
    target = torch.empty_like(like)
    return value if value.stride() == target.stride() else target.copy_(value)


def _define_ops(dims: int):
    """Register ``gfgp::maxent_pool{dims}d`` and its backward op; return the forward op."""
    name = f"gfgp::maxent_pool{dims}d"

    def op(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
           ceil_mode: bool) -> Tensor:
        out = dispatch.select(x).forward(x, lam, kernel_size, stride, padding, ceil_mode)
        # Every implementation returns the layout the fake kernel promises (compiled graphs rely on it).
        return out.contiguous(memory_format=_output_memory_format(x))

    def fake(x, lam, kernel_size, stride, padding, ceil_mode):
        out = output_size(x.shape[2:], kernel_size, stride, padding, ceil_mode)
        return x.new_empty((x.shape[0], x.shape[1], *out)).contiguous(memory_format=_output_memory_format(x))

    def backward_op(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
                    padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
        grad_x, grad_lam = dispatch.select(x).backward(grad, x, lam, out, kernel_size, stride, padding, ceil_mode)
        return _like(grad_x, x), _like(grad_lam, lam)

    def backward_fake(grad, x, lam, out, kernel_size, stride, padding, ceil_mode):
        return torch.empty_like(x), torch.empty_like(lam)

    def setup_context(ctx, inputs, output):
        x, lam, kernel_size, stride, padding, ceil_mode = inputs
        ctx.save_for_backward(x, lam, output)
        ctx.geometry = (kernel_size, stride, padding, ceil_mode)
        # Backward runs with the implementation that was in force at forward time.
        ctx.implementation = dispatch.current_implementation()

    def backward(ctx, grad):
        x, lam, out = ctx.saved_tensors
        with dispatch.use_implementation(ctx.implementation):
            grad_x, grad_lam = backward_custom(grad, x, lam, out, *ctx.geometry)
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_lam if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )

    forward_custom = torch.library.custom_op(name, op, mutates_args=())
    forward_custom.register_fake(fake)
    backward_custom = torch.library.custom_op(f"{name}_backward", backward_op, mutates_args=())
    backward_custom.register_fake(backward_fake)
    forward_custom.register_autograd(backward, setup_context=setup_context)
    return forward_custom


_maxent_pool2d_op = _define_ops(2)
_maxent_pool3d_op = _define_ops(3)
