"""The float64 loop reference of 3-D max-entropy pooling, shared by the 3-D op tests.

The one oracle that tests/ops/test_maxent_pool3d.py (the op), test_fast_paths3d.py (the CPU
kernel) and test_triton.py (the Triton kernels) check against: plain loops over every output
window, obviously correct and slow. Test modules load this file by its path
(``load_loops3d()`` below, or ``importlib.util.spec_from_file_location``): pytest runs with
``--import-mode=importlib``, which puts no test directory on ``sys.path``.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["triple", "out_size", "loop_reference"]


def triple(v):
    """A (t, h, w) list from an int or a tuple."""
    return list(v) if isinstance(v, (tuple, list)) else [v] * 3


def out_size(spatial, kernel, stride, padding, ceil_mode):
    """PyTorch's documented pooling output size per dim: floor (or ceil) of
    (n + 2 p - k) / s, plus 1; in ceil mode a last window that would start in the right padding is
    dropped. Written out here, independently of gfgp's geometry code. (F.avg_pool3d agrees
    wherever it accepts the input; it refuses an input smaller than the kernel even in ceil mode,
    where this rule still gives one window.)"""
    sizes = []
    for n, k, s, p in zip(spatial, triple(kernel), triple(stride), triple(padding)):
        span = n + 2 * p - k
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        sizes.append(max(o, 0))
    return tuple(sizes)


def loop_reference(x, lam, grad, kernel, stride, padding, ceil_mode):
    """(y, dL/dx, dL/dlam) in float64 by a loop over the output windows of a 5-D input.

    ``lam`` is a float or a tensor broadcastable to ``[N, C, *out]``. For each window, R is its
    valid (non-padded) positions, cut out of x by slicing: p = e^{lam x} / sum_R e^{lam x},
    y = sum_R p x, dL/dx += g p (1 + lam (x - y)) on R, dL/dlam = g sum_R p (x - y)^2, summed
    over the windows (and samples/channels) lam broadcasts to. dL/dlam is None for a float lam.
    """
    kernel, stride, padding = triple(kernel), triple(stride), triple(padding)
    x, grad = x.double(), grad.double()
    lam_t = lam.double() if torch.is_tensor(lam) else torch.tensor(float(lam), dtype=torch.float64)
    lam_t = lam_t.reshape(lam_t.shape if lam_t.dim() == 5 else (1,) * 5)
    spatial = x.shape[2:]
    out = out_size(spatial, kernel, stride, padding, ceil_mode)
    lam_full = lam_t.expand(*x.shape[:2], *out)
    y = torch.zeros(*x.shape[:2], *out, dtype=torch.float64)
    gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
    gl = torch.zeros_like(y)
    for o in itertools.product(*map(range, out)):
        window = tuple(slice(max(oi * s - p, 0), min(oi * s - p + k, size))
                       for oi, s, p, k, size in zip(o, stride, padding, kernel, spatial))
        assert all(w.stop > w.start for w in window), "every window has a valid position"
        xs = x[(slice(None), slice(None), *window)]
        lw = lam_full[(slice(None), slice(None), *o)][..., None, None, None]
        g = grad[(slice(None), slice(None), *o)][..., None, None, None]
        z = lw * xs
        e = torch.exp(z - z.amax(dim=(2, 3, 4), keepdim=True))  # the shift cancels in p
        p_ = e / e.sum(dim=(2, 3, 4), keepdim=True)
        yw = (p_ * xs).sum(dim=(2, 3, 4), keepdim=True)
        y[(slice(None), slice(None), *o)] = yw[..., 0, 0, 0]
        d = xs - yw
        gx[(slice(None), slice(None), *window)] += g * p_ * (1 + lw * d)
        gl[(slice(None), slice(None), *o)] = (g * p_ * d * d).sum(dim=(2, 3, 4))
    if not torch.is_tensor(lam):
        return y, gx, None
    dims = [d for d in range(5) if lam_t.shape[d] == 1 and gl.shape[d] != 1]
    gl = gl.sum(dim=dims, keepdim=True) if dims else gl
    return y, gx, gl.reshape(lam.shape)
