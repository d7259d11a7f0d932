"""Triton kernels of max-entropy pooling (docs/method.md section 1), forward and backward.

Imported only for CUDA tensors (see :mod:`gfgp_cli.ops.triton`), or directly by the tests, which
run the same launchers on CPU tensors under ``TRITON_INTERPRET=1``.

Layout of the work: every kernel is one-dimensional over the elements it writes, ``BLOCK`` of
them per program, visited in the memory order of the tensor written (channels fastest for
channels_last input, so neighbouring lanes load neighbouring addresses). Each lane computes one
element alone; nothing is shared between lanes, so there are no atomics and results are
deterministic. Arithmetic is float32 for every input dtype (float32, float16, bfloat16);
results are cast back on store.

- ``_forward_kernel``: one lane per output window. Pass 1 takes the window maximum m of lam * x
  over the valid positions; pass 2 sums e = exp(lam x - m) and e x (so the window's largest term
  is exp(0) = 1 and nothing overflows or divides 0 by 0); y = sum e x / sum e.
- ``_window_stats_kernel`` (backward, one lane per window): with y the saved output and g the
  upstream gradient, writes lse = m + log(sum e) and dL/dlam of the window,
  g / S * sum e (x - y)^2 (the centred form).
- ``_grad_input_kernel`` (backward, one lane per input position): gathers, over the at most
  ceil(KH / SH) * ceil(KW / SW) windows that contain the position, p = exp(lam x - lse) and
  dL/dx = sum g p (1 + lam (x - y)). Positions that no window contains get 0.

The kernels call only Triton builtins and their own ``@triton.jit`` helpers, never the
``@jit`` functions of ``triton.language.standard`` (``tl.zeros``, ``tl.cdiv``, ...): so the
interpreter can run them in a process that imported Triton before ``TRITON_INTERPRET`` was set
(the tests decorate a private copy of this file with the variable set).

Pointers: ``x_ptr`` Tensor[N, C, H, W], ``lam_ptr`` lam read as Tensor[N, C, OH, OW] through its
broadcast strides (0 on broadcast dims), ``y_ptr``/``g_ptr``/``lse_ptr``/``glam_ptr``
Tensor[N, C, OH, OW]; every tensor is addressed through its own four strides.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import pool_output_size

__all__ = ["launch_forward", "launch_backward", "DTYPES"]

# Input dtypes these kernels take (all computed in float32).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 256


@triton.jit
def _unravel(idx, C, D2, D3, CHANNELS_LAST: tl.constexpr):
    """(n, c, d2, d3) of flat index idx over [N, C, D2, D3] in NCHW or NHWC memory order."""
    if CHANNELS_LAST:
        c = idx % C
        t = idx // C
        d3 = t % D3
        t = t // D3
        d2 = t % D2
        n = t // D2
    else:
        d3 = idx % D3
        t = idx // D3
        d2 = t % D2
        t = t // D2
        c = t % C
        n = t // C
    return n, c, d2, d3


@triton.jit
def _window_tap(x_base, i, j, a, b, mask, H, W, sxh, sxw, SH, SW, PH, PW):
    """(x, valid) at tap (a, b) of each lane's window: x as float32 (0 where not valid); a tap is
    valid on an unmasked lane inside the input (padded positions take part in nothing)."""
    r = i * SH - PH + a
    col = j * SW - PW + b
    ok = mask & (r >= 0) & (r < H) & (col >= 0) & (col < W)
    return tl.load(x_base + r * sxh + col * sxw, mask=ok, other=0.0).to(tl.float32), ok


@triton.jit
def _window_max(x_base, lam, i, j, mask, H, W, sxh, sxw, SH, SW, PH, PW,
                KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """The maximum of lam * x over the valid positions of each lane's window (0 on masked lanes)."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            xv, ok = _window_tap(x_base, i, j, a, b, mask, H, W, sxh, sxw, SH, SW, PH, PW)
            m = tl.maximum(m, tl.where(ok, lam * xv, float("-inf")))
    # Every window has a valid position (padding <= kernel / 2); masked lanes get a finite 0.
    return tl.where(mask, m, 0.0)


@triton.jit
def _window_sums(x_base, lam, m, y, i, j, mask, H, W, sxh, sxw, SH, SW, PH, PW,
                 KH: tl.constexpr, KW: tl.constexpr, CENTRED: tl.constexpr, BLOCK: tl.constexpr):
    """(S, T) over each lane's window with e = exp(lam x - m), padded positions excluded:
    S = sum e (1 on masked lanes, so callers may divide by it) and T = sum e x, or with
    ``CENTRED`` T = sum e (x - y)^2 (``y`` is ignored otherwise)."""
    s = tl.full([BLOCK], 0.0, tl.float32)
    t = tl.full([BLOCK], 0.0, tl.float32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            xv, ok = _window_tap(x_base, i, j, a, b, mask, H, W, sxh, sxw, SH, SW, PH, PW)
            e = tl.exp(tl.where(ok, lam * xv - m, float("-inf")))  # padded: exp(-inf) = 0
            s += e
            if CENTRED:
                d = xv - y
                t += e * d * d
            else:
                t += e * xv
    return tl.where(mask, s, 1.0), t


@triton.jit
def _window_lanes(lam_ptr, total, C, OH, OW, sln, slc, slh, slw, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """This program's lanes over the output windows: (mask, n, c, i, j, lam as float32)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, i, j = _unravel(idx, C, OH, OW, CHANNELS_LAST)
    lam = tl.load(lam_ptr + n * sln + c * slc + i * slh + j * slw, mask=mask, other=0.0).to(tl.float32)
    return mask, n, c, i, j, lam


@triton.jit
def _forward_kernel(
    x_ptr, lam_ptr, y_ptr, total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, sln, slc, slh, slw, syn, syc, syh, syw,
    SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    mask, n, c, i, j, lam = _window_lanes(lam_ptr, total, C, OH, OW, sln, slc, slh, slw, CHANNELS_LAST, BLOCK)
    x_base = x_ptr + n * sxn + c * sxc
    m = _window_max(x_base, lam, i, j, mask, H, W, sxh, sxw, SH, SW, PH, PW, KH, KW, BLOCK)
    s, acc = _window_sums(x_base, lam, m, m, i, j, mask, H, W, sxh, sxw, SH, SW, PH, PW, KH, KW, False, BLOCK)
    tl.store(y_ptr + n * syn + c * syc + i * syh + j * syw, (acc / s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_stats_kernel(
    x_ptr, lam_ptr, y_ptr, g_ptr, lse_ptr, glam_ptr, total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, sln, slc, slh, slw, syn, syc, syh, syw, sgn, sgc, sgh, sgw, son, soc, soh, sow,
    SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """lse = m + log(S) and dL/dlam = g / S * sum e (x - y)^2 per window (lse, glam: float32, strides so*)."""
    mask, n, c, i, j, lam = _window_lanes(lam_ptr, total, C, OH, OW, sln, slc, slh, slw, CHANNELS_LAST, BLOCK)
    y = tl.load(y_ptr + n * syn + c * syc + i * syh + j * syw, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n * sgn + c * sgc + i * sgh + j * sgw, mask=mask, other=0.0).to(tl.float32)
    x_base = x_ptr + n * sxn + c * sxc
    m = _window_max(x_base, lam, i, j, mask, H, W, sxh, sxw, SH, SW, PH, PW, KH, KW, BLOCK)
    s, v = _window_sums(x_base, lam, m, y, i, j, mask, H, W, sxh, sxw, SH, SW, PH, PW, KH, KW, True, BLOCK)
    o = n * son + c * soc + i * soh + j * sow
    tl.store(lse_ptr + o, m + tl.log(s), mask=mask)
    tl.store(glam_ptr + o, g * v / s, mask=mask)


@triton.jit
def _grad_input_kernel(
    x_ptr, lam_ptr, y_ptr, g_ptr, lse_ptr, gx_ptr, total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, sln, slc, slh, slw, syn, syc, syh, syw, sgn, sgc, sgh, sgw, son, soc, soh, sow,
    SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, NI: tl.constexpr, NJ: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """dL/dx at each input position, gathered over the NI x NJ windows that may contain it (gx: strides of x)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, r, col = _unravel(idx, C, H, W, CHANNELS_LAST)
    xv = tl.load(x_ptr + n * sxn + c * sxc + r * sxh + col * sxw, mask=mask, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    i_last = (r + PH) // SH  # the last window whose rows start at or before r
    j_last = (col + PW) // SW
    for di in tl.static_range(NI):
        i = i_last - di
        ok_i = mask & (i >= 0) & (i < OH) & (r + PH - i * SH < KH)
        for dj in tl.static_range(NJ):
            j = j_last - dj
            ok = ok_i & (j >= 0) & (j < OW) & (col + PW - j * SW < KW)
            lam = tl.load(lam_ptr + n * sln + c * slc + i * slh + j * slw, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + n * syn + c * syc + i * syh + j * syw, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + n * sgn + c * sgc + i * sgh + j * sgw, mask=ok, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + n * son + c * soc + i * soh + j * sow, mask=ok, other=0.0)
            p = tl.exp(lam * xv - lse)  # <= 1: lse >= the window maximum of lam * x
            acc += tl.where(ok, g * p * (1.0 + lam * (xv - y)), 0.0)
    gx_off = n * sxn + c * sxc + r * sxh + col * sxw
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _out_shape(x: Tensor, kernel, stride, padding, ceil_mode) -> Tuple[int, int]:
    return (pool_output_size(x.shape[2], kernel[0], stride[0], padding[0], ceil_mode),
            pool_output_size(x.shape[3], kernel[1], stride[1], padding[1], ceil_mode))


def _lam_strides(lam: Tensor, n: int, c: int, out_hw) -> Tuple[int, ...]:
    return lam.expand(n, c, *out_hw).stride()


def launch_forward(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                   ceil_mode: bool) -> Tensor:
    """maxent_pool2d's forward with the Triton kernel; Tensor[N, C, OH, OW] in x's dtype and layout."""
    n, c, h, w = x.shape
    out_hw = _out_shape(x, kernel_size, stride, padding, ceil_mode)
    cl = _is_channels_last(x)
    x = x if cl else x.contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    y = torch.empty((n, c, *out_hw), dtype=x.dtype, device=x.device, memory_format=fmt)
    total = y.numel()
    if total == 0:
        return y
    grid = (triton.cdiv(total, _BLOCK),)
    _forward_kernel[grid](
        x, lam, y, total, c, h, w, *out_hw, *x.stride(), *_lam_strides(lam, n, c, out_hw), *y.stride(),
        *stride, *padding, KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=cl, BLOCK=_BLOCK,
    )
    return y


def launch_backward(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
                    padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx with x's dtype and strides, dL/dlam with lam's shape and dtype)."""
    n, c, h, w = x.shape
    out_hw = _out_shape(x, kernel_size, stride, padding, ceil_mode)
    cl = _is_channels_last(x)
    x = x if cl else x.contiguous()
    gx = torch.empty_like(x)  # the strides of x, which _grad_input_kernel writes through
    # Per-window float32 statistics, laid out in the iteration order of the windows.
    if cl:
        stats = torch.empty((2, n, *out_hw, c), dtype=torch.float32, device=x.device).permute(0, 1, 4, 2, 3)
    else:
        stats = torch.empty((2, n, c, *out_hw), dtype=torch.float32, device=x.device)
    lse, glam_w = stats[0], stats[1]
    if out.numel() == 0:
        return gx.zero_(), torch.zeros_like(lam)
    lam_s = _lam_strides(lam, n, c, out_hw)
    total = out.numel()
    _window_stats_kernel[(triton.cdiv(total, _BLOCK),)](
        x, lam, out, grad, lse, glam_w, total, c, h, w, *out_hw,
        *x.stride(), *lam_s, *out.stride(), *grad.stride(), *lse.stride(),
        *stride, *padding, KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=cl, BLOCK=_BLOCK,
    )
    total = x.numel()
    _grad_input_kernel[(triton.cdiv(total, _BLOCK),)](
        x, lam, out, grad, lse, gx, total, c, h, w, *out_hw,
        *x.stride(), *lam_s, *out.stride(), *grad.stride(), *lse.stride(),
        *stride, *padding, KH=kernel_size[0], KW=kernel_size[1],
        NI=triton.cdiv(kernel_size[0], stride[0]), NJ=triton.cdiv(kernel_size[1], stride[1]),
        CHANNELS_LAST=cl, BLOCK=_BLOCK,
    )
    dims = [d for d in range(4) if lam.shape[d] == 1 and glam_w.shape[d] != 1]
    glam = glam_w.sum(dim=dims, keepdim=True) if dims else glam_w
    return gx, glam.reshape(lam.shape).to(lam.dtype)
