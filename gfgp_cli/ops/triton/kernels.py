"""Triton kernels of max-entropy pooling (docs/method.md section 1), forward and backward, 2-D and 3-D.

Imported only for CUDA tensors (see :mod:`gfgp_cli.ops.triton`), or directly by the tests, which
run the same launchers on CPU tensors under ``TRITON_INTERPRET=1``.

One set of kernels serves both ranks: they work on Tensor[N, C, T, H, W] with (t, h, w) windows,
and the launchers view a 4-D input [N, C, H, W] as [N, C, 1, H, W] with a temporal kernel,
stride 1 and padding 0. The temporal loops run ``tl.static_range(KT)`` (KT a ``constexpr``), so
for 2-D input they are a single iteration, and T = OT = ST = 1 arrive as compile-time constants
(Triton currently specialises integer arguments equal to 1): the temporal index arithmetic folds away.

Layout of the work: every kernel is one-dimensional over the elements it writes, ``BLOCK`` of
them per program, visited in the memory order of the tensor written (channels fastest for
channels_last / channels_last_3d input, so neighbouring lanes load neighbouring addresses). Each
lane computes one element alone; nothing is shared between lanes, so there are no atomics and
results are deterministic. Arithmetic is float32 for every input dtype (float32, float16,
bfloat16); results are cast back on store.

- ``_forward_kernel``: one lane per output window. Pass 1 takes the window maximum m of lam * x
  over the valid positions; pass 2 sums e = exp(lam x - m) and e x (so the window's largest term
  is exp(0) = 1 and nothing overflows or divides 0 by 0); y = sum e x / sum e.
- ``_window_stats_kernel`` (backward, one lane per window): with y the saved output and g the
  upstream gradient, writes lse = m + log(sum e) and dL/dlam of the window,
  g / S * sum e (x - y)^2 (the centred form).
- ``_grad_input_kernel`` (backward, one lane per input position): gathers, over the at most
  ceil(KT / ST) * ceil(KH / SH) * ceil(KW / SW) windows that contain the position,
  p = exp(lam x - lse) and dL/dx = sum g p (1 + lam (x - y)). Positions that no window contains
  get 0.

The kernels call only Triton builtins and their own ``@triton.jit`` helpers, never the
``@jit`` functions of ``triton.language.standard`` (``tl.zeros``, ``tl.cdiv``, ...): so the
interpreter can run them in a process that imported Triton before ``TRITON_INTERPRET`` was set
(the tests decorate a private copy of this file with the variable set).

Pointers: ``x_ptr`` Tensor[N, C, T, H, W], ``lam_ptr`` lam read as Tensor[N, C, OT, OH, OW]
through its broadcast strides (0 on broadcast dims), ``y_ptr``/``g_ptr``/``lse_ptr``/``glam_ptr``
Tensor[N, C, OT, OH, OW]; every tensor is addressed through its own five strides.
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
def _unravel(idx, C, D2, D3, D4, CHANNELS_LAST: tl.constexpr):
    """(n, c, d2, d3, d4) of flat index idx over [N, C, D2, D3, D4] in NCDHW or NDHWC memory order."""
    if CHANNELS_LAST:
        c = idx % C
        t = idx // C
        d4 = t % D4
        t = t // D4
        d3 = t % D3
        t = t // D3
        d2 = t % D2
        n = t // D2
    else:
        d4 = idx % D4
        t = idx // D4
        d3 = t % D3
        t = t // D3
        d2 = t % D2
        t = t // D2
        c = t % C
        n = t // C
    return n, c, d2, d3, d4


@triton.jit
def _window_tap(x_base, o, i, j, ct, a, b, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW):
    """(x, valid) at tap (ct, a, b) of each lane's window (o, i, j): x as float32 (0 where not
    valid); a tap is valid on an unmasked lane inside the input (padded positions take part in
    nothing)."""
    d = o * ST - PT + ct
    r = i * SH - PH + a
    col = j * SW - PW + b
    ok = mask & (d >= 0) & (d < T) & (r >= 0) & (r < H) & (col >= 0) & (col < W)
    return tl.load(x_base + d * sxt + r * sxh + col * sxw, mask=ok, other=0.0).to(tl.float32), ok


@triton.jit
def _window_max(x_base, lam, o, i, j, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW,
                KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """The maximum of lam * x over the valid positions of each lane's window (0 on masked lanes)."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for ct in tl.static_range(KT):
        for a in tl.static_range(KH):
            for b in tl.static_range(KW):
                xv, ok = _window_tap(x_base, o, i, j, ct, a, b, mask, T, H, W, sxt, sxh, sxw,
                                     ST, SH, SW, PT, PH, PW)
                m = tl.maximum(m, tl.where(ok, lam * xv, float("-inf")))
    # Every window has a valid position (padding <= kernel / 2); masked lanes get a finite 0.
    return tl.where(mask, m, 0.0)


@triton.jit
def _window_sums(x_base, lam, m, y, o, i, j, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW,
                 KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CENTRED: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(S, V) over each lane's window with e = exp(lam x - m), padded positions excluded:
    S = sum e (1 on masked lanes, so callers may divide by it) and V = sum e x, or with
    ``CENTRED`` V = sum e (x - y)^2 (``y`` is ignored otherwise)."""
    s = tl.full([BLOCK], 0.0, tl.float32)
    v = tl.full([BLOCK], 0.0, tl.float32)
    for ct in tl.static_range(KT):
        for a in tl.static_range(KH):
            for b in tl.static_range(KW):
                xv, ok = _window_tap(x_base, o, i, j, ct, a, b, mask, T, H, W, sxt, sxh, sxw,
                                     ST, SH, SW, PT, PH, PW)
                e = tl.exp(tl.where(ok, lam * xv - m, float("-inf")))  # padded: exp(-inf) = 0
                s += e
                if CENTRED:
                    dx = xv - y
                    v += e * dx * dx
                else:
                    v += e * xv
    return tl.where(mask, s, 1.0), v


@triton.jit
def _window_lanes(lam_ptr, total, C, OT, OH, OW, sln, slc, slt, slh, slw, CHANNELS_LAST: tl.constexpr,
                  BLOCK: tl.constexpr):
    """This program's lanes over the output windows: (mask, n, c, o, i, j, lam as float32)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, o, i, j = _unravel(idx, C, OT, OH, OW, CHANNELS_LAST)
    lam = tl.load(lam_ptr + n * sln + c * slc + o * slt + i * slh + j * slw, mask=mask, other=0.0).to(tl.float32)
    return mask, n, c, o, i, j, lam


@triton.jit
def _forward_kernel(
    x_ptr, lam_ptr, y_ptr, total, C, T, H, W, OT, OH, OW,
    sxn, sxc, sxt, sxh, sxw, sln, slc, slt, slh, slw, syn, syc, syt, syh, syw,
    ST, SH, SW, PT, PH, PW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    mask, n, c, o, i, j, lam = _window_lanes(lam_ptr, total, C, OT, OH, OW, sln, slc, slt, slh, slw,
                                             CHANNELS_LAST, BLOCK)
    x_base = x_ptr + n * sxn + c * sxc
    m = _window_max(x_base, lam, o, i, j, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW,
                    KT, KH, KW, BLOCK)
    s, acc = _window_sums(x_base, lam, m, m, o, i, j, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW,
                          KT, KH, KW, False, BLOCK)
    y_off = n * syn + c * syc + o * syt + i * syh + j * syw
    tl.store(y_ptr + y_off, (acc / s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_stats_kernel(
    x_ptr, lam_ptr, y_ptr, g_ptr, lse_ptr, glam_ptr, total, C, T, H, W, OT, OH, OW,
    sxn, sxc, sxt, sxh, sxw, sln, slc, slt, slh, slw, syn, syc, syt, syh, syw,
    sgn, sgc, sgt, sgh, sgw, son, soc, sot, soh, sow,
    ST, SH, SW, PT, PH, PW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """lse = m + log(S) and dL/dlam = g / S * sum e (x - y)^2 per window (lse, glam: float32, strides so*)."""
    mask, n, c, o, i, j, lam = _window_lanes(lam_ptr, total, C, OT, OH, OW, sln, slc, slt, slh, slw,
                                             CHANNELS_LAST, BLOCK)
    y = tl.load(y_ptr + n * syn + c * syc + o * syt + i * syh + j * syw, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n * sgn + c * sgc + o * sgt + i * sgh + j * sgw, mask=mask, other=0.0).to(tl.float32)
    x_base = x_ptr + n * sxn + c * sxc
    m = _window_max(x_base, lam, o, i, j, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW,
                    KT, KH, KW, BLOCK)
    s, v = _window_sums(x_base, lam, m, y, o, i, j, mask, T, H, W, sxt, sxh, sxw, ST, SH, SW, PT, PH, PW,
                        KT, KH, KW, True, BLOCK)
    off = n * son + c * soc + o * sot + i * soh + j * sow
    tl.store(lse_ptr + off, m + tl.log(s), mask=mask)
    tl.store(glam_ptr + off, g * v / s, mask=mask)


@triton.jit
def _grad_input_kernel(
    x_ptr, lam_ptr, y_ptr, g_ptr, lse_ptr, gx_ptr, total, C, T, H, W, OT, OH, OW,
    sxn, sxc, sxt, sxh, sxw, sln, slc, slt, slh, slw, syn, syc, syt, syh, syw,
    sgn, sgc, sgt, sgh, sgw, son, soc, sot, soh, sow,
    ST, SH, SW, PT, PH, PW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, NT: tl.constexpr, NI: tl.constexpr, NJ: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """dL/dx at each input position, gathered over the NT x NI x NJ windows that may contain it
    (gx: strides of x)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, d, r, col = _unravel(idx, C, T, H, W, CHANNELS_LAST)
    x_off = n * sxn + c * sxc + d * sxt + r * sxh + col * sxw
    xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    o_last = (d + PT) // ST  # the last window whose frames start at or before d
    i_last = (r + PH) // SH  # ... whose rows start at or before r
    j_last = (col + PW) // SW
    for dt in tl.static_range(NT):
        o = o_last - dt
        ok_o = mask & (o >= 0) & (o < OT) & (d + PT - o * ST < KT)
        for di in tl.static_range(NI):
            i = i_last - di
            ok_i = ok_o & (i >= 0) & (i < OH) & (r + PH - i * SH < KH)
            for dj in tl.static_range(NJ):
                j = j_last - dj
                ok = ok_i & (j >= 0) & (j < OW) & (col + PW - j * SW < KW)
                lam = tl.load(lam_ptr + n * sln + c * slc + o * slt + i * slh + j * slw,
                              mask=ok, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + n * syn + c * syc + o * syt + i * syh + j * syw, mask=ok, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + n * sgn + c * sgc + o * sgt + i * sgh + j * sgw, mask=ok, other=0.0).to(tl.float32)
                lse = tl.load(lse_ptr + n * son + c * soc + o * sot + i * soh + j * sow, mask=ok, other=0.0)
                p = tl.exp(lam * xv - lse)  # <= 1: lse >= the window maximum of lam * x
                acc += tl.where(ok, g * p * (1.0 + lam * (xv - y)), 0.0)
    tl.store(gx_ptr + x_off, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launchers


def _channels_last_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def _is_channels_last(x: Tensor) -> bool:
    """channels_last (4-D) or channels_last_3d (5-D) input, and not also plainly contiguous."""
    return x.is_contiguous(memory_format=_channels_last_format(x)) and not x.is_contiguous()


def _as_5d(t: Tensor) -> Tensor:
    """A view of a 4-D tensor [N, C, H, W] as [N, C, 1, H, W] (5-D tensors as they are).

    ``unsqueeze`` keeps every stride, so a channels_last tensor is read in the same order
    (its T stride is never used with an index other than 0)."""
    return t if t.dim() == 5 else t.unsqueeze(2)


def _geometry_3d(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int]):
    """(kernel, stride, padding) as (t, h, w) triples: 2-D geometry gets a temporal 1, 1, 0."""
    if x.dim() == 5:
        return list(kernel_size), list(stride), list(padding)
    return [1, *kernel_size], [1, *stride], [0, *padding]


def _out_shape(x: Tensor, kernel, stride, padding, ceil_mode) -> Tuple[int, ...]:
    """The pooled spatial size of x, one entry per spatial dim of x."""
    return tuple(pool_output_size(x.shape[2 + d], kernel[d], stride[d], padding[d], ceil_mode)
                 for d in range(x.dim() - 2))


def _lam_strides(lam5: Tensor, n: int, c: int, out5) -> Tuple[int, ...]:
    return lam5.expand(n, c, *out5).stride()


def _checked_rank(x: Tensor, kernel_size: List[int]) -> None:
    if x.dim() not in (4, 5) or len(kernel_size) != x.dim() - 2:
        raise ValueError(f"expected 4-D input with 2 kernel sizes or 5-D input with 3, got {x.dim()}-D "
                         f"input and kernel_size={list(kernel_size)}")


def launch_forward(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                   ceil_mode: bool) -> Tensor:
    """The op's forward with the Triton kernel: Tensor[N, C, *out] in x's dtype and layout.

    x: Tensor[N, C, H, W] with pairs, or Tensor[N, C, T, H, W] with (t, h, w) triples; lam has
    x's number of dims (broadcast or one per output window)."""
    _checked_rank(x, kernel_size)
    n, c = x.shape[:2]
    out = _out_shape(x, kernel_size, stride, padding, ceil_mode)
    cl = _is_channels_last(x)
    x = x if cl else x.contiguous()
    fmt = _channels_last_format(x) if cl else torch.contiguous_format
    y = torch.empty((n, c, *out), dtype=x.dtype, device=x.device, memory_format=fmt)
    total = y.numel()
    if total == 0:
        return y
    k3, s3, p3 = _geometry_3d(x, kernel_size, stride, padding)
    x5, y5, lam5 = _as_5d(x), _as_5d(y), _as_5d(lam)
    out5 = y5.shape[2:]
    grid = (triton.cdiv(total, _BLOCK),)
    _forward_kernel[grid](
        x5, lam5, y5, total, c, *x5.shape[2:], *out5,
        *x5.stride(), *_lam_strides(lam5, n, c, out5), *y5.stride(),
        *s3, *p3, KT=k3[0], KH=k3[1], KW=k3[2], CHANNELS_LAST=cl, BLOCK=_BLOCK,
    )
    return y


def launch_backward(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
                    padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx with x's dtype and strides, dL/dlam with lam's shape and dtype); 4-D or 5-D as in
    :func:`launch_forward`."""
    _checked_rank(x, kernel_size)
    n, c = x.shape[:2]
    out_sp = _out_shape(x, kernel_size, stride, padding, ceil_mode)
    cl = _is_channels_last(x)
    x = x if cl else x.contiguous()
    gx = torch.empty_like(x)  # the strides of x, which _grad_input_kernel writes through
    if out.numel() == 0:
        return gx.zero_(), torch.zeros_like(lam)
    k3, s3, p3 = _geometry_3d(x, kernel_size, stride, padding)
    x5, gx5, lam5, out5, grad5 = _as_5d(x), _as_5d(gx), _as_5d(lam), _as_5d(out), _as_5d(grad)
    o5 = out_sp if x.dim() == 5 else (1, *out_sp)
    # Per-window float32 statistics, laid out in the iteration order of the windows.
    if cl:
        stats = torch.empty((2, n, *o5, c), dtype=torch.float32, device=x.device).permute(0, 1, 5, 2, 3, 4)
    else:
        stats = torch.empty((2, n, c, *o5), dtype=torch.float32, device=x.device)
    lse, glam_w = stats[0], stats[1]
    lam_s = _lam_strides(lam5, n, c, o5)
    total = out.numel()
    _window_stats_kernel[(triton.cdiv(total, _BLOCK),)](
        x5, lam5, out5, grad5, lse, glam_w, total, c, *x5.shape[2:], *o5,
        *x5.stride(), *lam_s, *out5.stride(), *grad5.stride(), *lse.stride(),
        *s3, *p3, KT=k3[0], KH=k3[1], KW=k3[2], CHANNELS_LAST=cl, BLOCK=_BLOCK,
    )
    total = x.numel()
    _grad_input_kernel[(triton.cdiv(total, _BLOCK),)](
        x5, lam5, out5, grad5, lse, gx5, total, c, *x5.shape[2:], *o5,
        *x5.stride(), *lam_s, *out5.stride(), *grad5.stride(), *lse.stride(),
        *s3, *p3, KT=k3[0], KH=k3[1], KW=k3[2],
        NT=triton.cdiv(k3[0], s3[0]), NI=triton.cdiv(k3[1], s3[1]), NJ=triton.cdiv(k3[2], s3[2]),
        CHANNELS_LAST=cl, BLOCK=_BLOCK,
    )
    if x.dim() == 4:
        glam_w = glam_w.squeeze(2)  # back to [N, C, OH, OW], so the sum below is the 2-D one
    dims = [d for d in range(x.dim()) if lam.shape[d] == 1 and glam_w.shape[d] != 1]
    glam = glam_w.sum(dim=dims, keepdim=True) if dims else glam_w
    return gx, glam.reshape(lam.shape).to(lam.dtype)
