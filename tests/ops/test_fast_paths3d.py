"""The CPU fast path on 5-D input [N, C, T, H, W]: 3-D max-entropy pooling.

The fused C++ kernel (``gfgp_cli.ops.cpu``) runs 4-D input as the 5-D problem with T = 1; here it
runs real 5-D input, through the kernel-module interface (``forward``/``backward`` with (t, h, w)
triples). Oracles: a float64 loop over the output windows written below (the formulas of
docs/method.md section 1, nothing shared with the kernels) and the reference path
(``gfgp_cli.ops.reference``). Covered: geometries (temporal kernel 1, padding, ceil_mode, odd
sizes, overlapping windows, gaps, mixed kernels, the NCDHW kernel's row blocks across frames), the
five lam shapes, four dtypes, NCDHW and channels_last_3d, strided and empty input, the thread
count, and 4-D input being exactly the 5-D problem with T = 1.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from gfgp_cli.ops import cpu, maxent_pool3d, reference
from gfgp_cli.ops.dispatch import use_implementation

# The shared float64 loop reference, loaded by path (--import-mode=importlib: no tests dir on sys.path).
_spec = importlib.util.spec_from_file_location("_loops3d", Path(__file__).with_name("_loops3d.py"))
_loops3d = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loops3d)
triple, out_size, loop_reference = _loops3d.triple, _loops3d.out_size, _loops3d.loop_reference

pytestmark = pytest.mark.skipif(cpu.build_error() is not None, reason=str(cpu.build_error()))

# Geometries as (T, H, W, kernel, stride, padding, ceil_mode); kernel/stride/padding (t, h, w).
GEOMETRIES = {
    "2x2x2s2": (4, 6, 6, 2, 2, 0, False),
    "1x2x2s122": (3, 6, 8, (1, 2, 2), (1, 2, 2), 0, False),
    "1x3x3s122p011": (3, 7, 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), False),
    "3x3x3s2p1-ceil": (6, 7, 6, 3, 2, 1, True),
    "2x2x2s2-odd-ceil": (5, 7, 9, 2, 2, 0, True),
    "2x2x2s2-odd-floor": (5, 7, 9, 2, 2, 0, False),  # the last frame, row and column are in no window
    "3x3x3s1p1-overlap": (4, 5, 5, 3, 1, 1, False),
    "2x2x2s3-gaps-ceil": (7, 8, 7, 2, 3, 0, True),
    "mixed-3x1x2-s1x2x1-p1x0x1": (5, 6, 7, (3, 1, 2), (1, 2, 1), (1, 0, 1), True),
    # The NCDHW kernel handles several output rows (ot, oh) per block (about 64 windows): 30 rows
    # of 5 windows in blocks of 13, so blocks start mid-frame and windows overlap across blocks.
    "blocks-3x2x2-s2-p100": (9, 12, 10, (3, 2, 2), 2, (1, 0, 0), False),
}
LAM_SHAPES = ["11111", "1C111", "NC111", "N1111", "NCTHW"]
# Tolerance relative to the largest magnitude of the compared tensor (as in test_fast_paths.py).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
N, C = 2, 37  # 37 channels: the channels_last kernel's vector loops over channels end in a ragged tail


def geometry_args(name):
    t, h, w, k, s, p, ceil = GEOMETRIES[name]
    return (t, h, w), (triple(k), triple(s), triple(p), ceil)


@functools.lru_cache(maxsize=None)
def make_case(geometry, lam_shape, dtype, seed=0):
    """(x, lam, grad, geo) in ``dtype``, contiguous; the same values for a geometry whatever the layout."""
    spatial, geo = geometry_args(geometry)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, *spatial, dtype=torch.float64, generator=gen) * 2).to(dtype)
    out = out_size(spatial, *geo)
    shapes = {"11111": (1, 1, 1, 1, 1), "1C111": (1, C, 1, 1, 1), "NC111": (N, C, 1, 1, 1),
              "N1111": (N, 1, 1, 1, 1), "NCTHW": (N, C, *out)}
    lam = torch.empty(shapes[lam_shape], dtype=torch.float64).uniform_(-1, 3, generator=gen).to(dtype)
    grad = torch.randn(N, C, *out, dtype=torch.float64, generator=gen).to(dtype)
    return x, lam, grad, geo


def run_cpu(x, lam, grad, k, s, p, ceil):
    """(y, dL/dx, dL/dlam) of the CPU kernels (backward from their own forward output)."""
    y = cpu.forward(x, lam, k, s, p, ceil)
    gx, gl = cpu.backward(grad, x, lam, y, k, s, p, ceil)
    return y, gx, gl


def run_reference(x, lam, grad, k, s, p, ceil):
    y = reference.forward(x, lam, k, s, p, ceil)
    gx, gl = reference.backward(grad, x, lam, y, k, s, p, ceil)
    return y, gx, gl


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = 1.0 + expected.double().abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def to_layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last_3d) if channels_last else t


# ------------------------------------------------------------------------------- agreement


def agreement_cases():
    """float32: every geometry x lam shape; float64: every geometry with a per-(n, c) and a
    per-window lam; the half types: three geometries. Each in both layouts."""
    cases = [(g, lam, torch.float32) for g in GEOMETRIES for lam in LAM_SHAPES]
    cases += [(g, lam, torch.float64) for g in GEOMETRIES for lam in ("NC111", "NCTHW")]
    cases += [(g, lam, dt) for dt in (torch.float16, torch.bfloat16)
              for g in ("2x2x2s2", "3x3x3s2p1-ceil", "3x3x3s1p1-overlap") for lam in ("N1111", "NCTHW")]
    return [pytest.param(g, lam, dt, id=f"{g}-{lam}-{str(dt).removeprefix('torch.')}") for g, lam, dt in cases]


@functools.lru_cache(maxsize=None)
def truth(geometry, lam_shape, dtype):
    x, lam, grad, geo = make_case(geometry, lam_shape, dtype)
    return loop_reference(x, lam, grad, *geo)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("geometry,lam_shape,dtype", agreement_cases())
def test_cpu_matches_float64_loops_and_reference(geometry, lam_shape, dtype, channels_last):
    x, lam, grad, geo = make_case(geometry, lam_shape, dtype)
    x, grad_l = to_layout(x, channels_last), to_layout(grad, channels_last)
    lam_l = to_layout(lam, channels_last) if lam_shape == "NCTHW" else lam
    got = run_cpu(x, lam_l, grad_l, *geo)
    for what, value, expected in zip(("output", "dL/dx", "dL/dlam"), got, truth(geometry, lam_shape, dtype)):
        assert value.dtype == dtype, what
        assert_close(value, expected, TOL[dtype], f"{what} vs float64 loops")
    for what, value, expected in zip(("output", "dL/dx", "dL/dlam"), got, run_reference(x, lam_l, grad_l, *geo)):
        assert_close(value, expected, TOL[dtype], f"{what} vs reference")
    y, gx, gl = got
    # Output and dL/dx follow the input's memory format (as F.max_pool3d's); dL/dlam has lam's shape.
    assert y.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    assert gx.shape == x.shape and gx.stride() == x.stride()
    assert gl.shape == lam.shape


def test_four_d_input_is_the_five_d_problem_with_one_frame():
    """Bit for bit: a 4-D call equals the 5-D call on x[:, :, None] with kernel 1, stride 1, padding 0 in t."""
    gen = torch.Generator().manual_seed(3)
    for channels_last in (False, True):
        x4 = torch.randn(2, 37, 9, 8, generator=gen)
        x5 = x4[:, :, None].contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        x4 = x4.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for lam4 in (torch.rand(2, 37, 1, 1, generator=gen), torch.rand(2, 37, 5, 4, generator=gen)):
            grad4 = torch.randn(2, 37, 5, 4, generator=gen)
            r4 = run_cpu(x4, lam4, grad4, [3, 2], [2, 2], [1, 0], True)
            r5 = run_cpu(x5, lam4[:, :, None], grad4[:, :, None], [1, 3, 2], [1, 2, 2], [0, 1, 0], True)
            for a, b in zip(r4, r5):
                assert torch.equal(a, b.squeeze(2))


def test_cpu_on_strided_input():
    """A non-contiguous view (every other frame, channels permuted) works like its contiguous copy."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 6, 10, 7, 8, generator=gen)
    x = base[:, [5, 0, 3, 1, 4, 2], ::2]
    lam = torch.rand(2, 6, 1, 1, 1, generator=gen)
    geo = ([3, 3, 3], [2, 2, 2], [1, 1, 1], True)
    grad = torch.randn(2, 6, *out_size(x.shape[2:], *geo), generator=gen)
    for a, b in zip(run_cpu(x, lam, grad, *geo), run_cpu(x.contiguous(), lam, grad, *geo)):
        assert torch.equal(a, b)


def test_cpu_result_does_not_depend_on_thread_count():
    """Threads split (n, c) planes / channel blocks; each output is computed by one thread alone."""
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    for channels_last in (False, True):
        x = to_layout(torch.randn(4, 64, 8, 16, 16, generator=gen), channels_last)  # 16384 outputs: the parallel threshold
        geo = ([2, 3, 3], [2, 2, 2], [1, 1, 1], False)
        out = out_size(x.shape[2:], *geo)
        for lam in (torch.rand(4, 64, 1, 1, 1, generator=gen), to_layout(torch.rand(4, 64, *out, generator=gen), channels_last)):
            grad = to_layout(torch.randn(4, 64, *out, generator=gen), channels_last)
            results = []
            try:
                for n in (1, 3):
                    torch.set_num_threads(n)
                    results.append(run_cpu(x, lam, grad, *geo))
            finally:
                torch.set_num_threads(threads)
            for a, b in zip(*results):
                assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4, 4), (2, 0, 4, 4, 4), (1, 2, 1, 4, 4), (1, 2, 4, 1, 4), (1, 2, 4, 4, 1)],
                         ids=["no-sample", "no-channel", "zero-frames-out", "zero-height-out", "zero-width-out"])
def test_cpu_handles_empty_tensors(shape, channels_last):
    """Empty output, zero gradients, no crash."""
    x = to_layout(torch.randn(shape), channels_last)
    lam = torch.ones(1, 1, 1, 1, 1)
    geo = ([2, 2, 2], [2, 2, 2], [0, 0, 0], False)
    y = cpu.forward(x, lam, *geo)
    assert y.shape == (*shape[:2], *(s // 2 for s in shape[2:]))
    gx, gl = cpu.backward(torch.ones_like(y), x, lam, y, *geo)
    assert gx.shape == x.shape and not gx.any() and gl.shape == lam.shape and gl.item() == 0.0


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
def test_cpu_adversarial_input_stays_finite_and_accurate(channels_last):
    """|x| ~ 1e4 and |lam| up to 100 (lam x ~ 1e6): the shift by the true window maximum keeps
    everything finite (a shift by anything less overflows exp)."""
    gen = torch.Generator().manual_seed(7)
    x = to_layout(torch.randn(2, 5, 5, 6, 6, dtype=torch.float64, generator=gen) * 1e4, channels_last)
    lam = torch.empty(2, 5, 1, 1, 1, dtype=torch.float64).uniform_(-100, 100, generator=gen)
    geo = ([3, 3, 3], [2, 2, 2], [1, 1, 1], True)
    grad = torch.randn(2, 5, *out_size(x.shape[2:], *geo), dtype=torch.float64, generator=gen)
    expected = run_reference(x, lam, grad, *geo)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, None)):
        got = run_cpu(x.to(dtype), lam.to(dtype), grad.to(dtype), *geo)
        for value, exp in zip(got, expected):
            assert torch.isfinite(value).all()
            if tol is not None:
                assert_close(value, exp, tol, "float64 adversarial")
        # float32: the output stays within the window's value range (a convex combination).
        assert (got[0].double() - expected[0]).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * 1e4 * 5


def test_rank_mismatch_is_refused():
    with pytest.raises(ValueError, match="5-D with"):
        cpu.forward(torch.randn(1, 1, 4, 4, 4), torch.ones(1, 1, 1, 1, 1), [2, 2], [2, 2], [0, 0], False)


def test_maxent_pool3d_op_runs_the_cpu_kernels():
    """Through the public op, with the CPU path forced: the kernels' values and gradients."""
    x, lam, grad, geo = make_case("3x3x3s2p1-ceil", "NC111", torch.float32)
    k, s, p, ceil = geo
    xr, lr = x.clone().requires_grad_(), lam.clone().requires_grad_()
    with use_implementation("cpu"):
        y = maxent_pool3d(xr, lr, k, s, p, ceil)
    gx, gl = torch.autograd.grad(y, (xr, lr), grad)  # backward outside the block: same path
    for a, b in zip((y, gx, gl), run_cpu(x, lam, grad, *geo)):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
def test_custom_op_registration_holds_for_cpu_path(channels_last):
    """opcheck: schema, fake kernel (shapes and strides), autograd registration, AOT dispatch."""
    x = to_layout(torch.randn(2, 3, 5, 7, 6, dtype=torch.float64), channels_last)
    geo = ([3, 3, 3], [2, 2, 2], [1, 1, 1], False)
    out = out_size(x.shape[2:], *geo)
    for lam in (torch.rand(2, 3, 1, 1, 1, dtype=torch.float64), torch.rand(2, 3, *out, dtype=torch.float64)):
        with use_implementation("cpu"):
            torch.library.opcheck(torch.ops.gfgp.maxent_pool3d, (x.requires_grad_(), lam.requires_grad_(), *geo))
        x = x.detach()
