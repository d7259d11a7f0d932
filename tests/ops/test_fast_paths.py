"""The fast paths of maxent_pool2d agree with its reference path, and dispatch picks them.

The reference path (``gfgp_cli.ops.reference``, validated against float64 loops in
test_maxent_pool.py) is the oracle here: every fast path that can run on this machine must give
the same values and both gradients, over geometries (padding, ceil_mode, overlapping windows,
gaps, rectangles), the five lam shapes, four dtypes and both memory layouts; stay finite and as
accurate as the conditioning allows on adversarial inputs; and keep no more than
input + lam + 2 x output for backward. Dispatch, the build cache and the fallback are tested too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from gfgp_cli.bench.timing import saved_tensor_bytes
from gfgp_cli.ops import cpu, dispatch, maxent_pool2d, reference
from gfgp_cli.ops.dispatch import use_implementation

# Geometries as (H, W, kernel, stride, padding, ceil_mode).
GEOMETRIES = {
    "2x2s2": (8, 8, 2, 2, 0, False),
    "2x2s2-odd-ceil": (7, 9, 2, 2, 0, True),
    "3x3s2p1": (9, 8, 3, 2, 1, False),
    "3x3s2p1-ceil": (8, 7, 3, 2, 1, True),
    "3x3s1p1-overlap": (6, 7, 3, 1, 1, False),
    "2x2s3-gaps-ceil": (8, 7, 2, 3, 0, True),
    "rect-3x2-s2x1-p1x0": (9, 6, (3, 2), (2, 1), (1, 0), True),
    "5x5s2p2": (9, 9, 5, 2, 2, False),
    # Narrow maps: the NCHW CPU kernel handles several output rows per block (about 64 windows),
    # so these have several blocks, the last one partial, with windows overlapping across blocks.
    "narrow-2x2s2-blocks": (40, 10, 2, 2, 0, False),
    "narrow-3x3s2p1-ceil-blocks": (31, 12, 3, 2, 1, True),
}
LAM_SHAPES = ["scalar", "1111", "1C11", "NC11", "N111", "NCHW"]
# Tolerance relative to the largest magnitude of the compared tensor.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
N, C = 2, 37  # 37 channels: the channels_last kernel's full 16-channel chunks and a ragged tail


def fast_paths():
    """The fast implementations that run CPU tensors here (skip, with the reason, when none can)."""
    reason = cpu.build_error()
    return [pytest.param("cpu", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


def lam_for(shape_kind, n, c, out_hw, dtype, gen, low=-1.0, high=3.0):
    shapes = {"1111": (1, 1, 1, 1), "1C11": (1, c, 1, 1), "NC11": (n, c, 1, 1), "N111": (n, 1, 1, 1),
              "NCHW": (n, c, *out_hw)}
    if shape_kind == "scalar":
        return torch.empty((), dtype=torch.float64).uniform_(low, high, generator=gen).to(dtype)
    return torch.empty(shapes[shape_kind], dtype=torch.float64).uniform_(low, high, generator=gen).to(dtype)


def run(impl, x, lam, grad, k, s, p, ceil):
    """(y, dL/dx, dL/dlam) of one implementation, leaving the inputs untouched."""
    xr = x.detach().clone().requires_grad_(True)
    lr = lam.detach().clone().requires_grad_(True)
    with use_implementation(impl):
        y = maxent_pool2d(xr, lr, k, s, p, ceil)
    gx, gl = torch.autograd.grad(y, (xr, lr), grad)  # backward outside the block: same path
    return y.detach(), gx, gl


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = 1.0 + expected.double().abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def make_case(geometry, lam_shape, dtype, channels_last, seed=0, x_scale=2.0):
    h, w, k, s, p, ceil = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, h, w, dtype=torch.float64, generator=gen) * x_scale).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_hw = F.avg_pool2d(x.double(), k, s, p, ceil).shape[2:]
    lam = lam_for(lam_shape, N, C, out_hw, dtype, gen)
    grad = torch.randn(N, C, *out_hw, dtype=torch.float64, generator=gen).to(dtype)
    return x, lam, grad, (k, s, p, ceil)


# ------------------------------------------------------------------------------- agreement


def agreement_cases():
    """float32: every geometry x lam shape; float64: every geometry with a per-(n, c) and a
    per-window lam; the half types: the common geometries. Each in both layouts."""
    cases = [(g, lam, torch.float32) for g in GEOMETRIES for lam in LAM_SHAPES]
    cases += [(g, lam, torch.float64) for g in GEOMETRIES for lam in ("NC11", "NCHW")]
    cases += [(g, lam, dt) for dt in (torch.float16, torch.bfloat16) for g in ("2x2s2", "3x3s2p1-ceil", "3x3s1p1-overlap")
              for lam in ("N111", "NCHW")]
    return [pytest.param(g, lam, dt, id=f"{g}-{lam}-{str(dt).removeprefix('torch.')}") for g, lam, dt in cases]


@pytest.mark.parametrize("impl", fast_paths())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry,lam_shape,dtype", agreement_cases())
def test_fast_path_matches_reference(impl, geometry, lam_shape, dtype, channels_last):
    x, lam, grad, geo = make_case(geometry, lam_shape, dtype, channels_last)
    y, gx, gl = run(impl, x, lam, grad, *geo)
    y_ref, gx_ref, gl_ref = run("reference", x, lam, grad, *geo)
    assert_close(y, y_ref, TOL[dtype], "output")
    assert_close(gx, gx_ref, TOL[dtype], "dL/dx")
    assert_close(gl, gl_ref, TOL[dtype], "dL/dlam")
    # The output follows the input's memory format, as F.max_pool2d's does.
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert gx.stride() == x.stride()


@pytest.mark.parametrize("impl", fast_paths())
def test_fast_path_on_strided_input(impl):
    """A non-contiguous view (every other row, channels permuted) works like its contiguous copy."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 6, 18, 9, generator=gen)
    x = base[:, [5, 0, 3, 1, 4, 2], ::2]
    lam = torch.rand(2, 6, 1, 1, generator=gen)
    grad = torch.randn(2, 6, 5, 5, generator=gen)
    for a, b in zip(run(impl, x, lam, grad, 3, 2, 1, True), run("reference", x.contiguous(), lam, grad, 3, 2, 1, True)):
        assert_close(a, b, TOL[torch.float32], "strided input")


@pytest.mark.parametrize("impl", fast_paths())
def test_fast_path_result_does_not_depend_on_thread_count(impl):
    """Threads split (n, c) planes / channel blocks; each output is computed by one thread alone."""
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    for channels_last in (False, True):
        x = torch.randn(4, 64, 32, 32, generator=gen)  # 16384 outputs: the parallel threshold
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lam, grad = torch.rand(4, 64, 1, 1, generator=gen), torch.randn(4, 64, 16, 16, generator=gen)
        results = []
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                results.append(run(impl, x, lam, grad, 3, 2, 1, False))
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", fast_paths())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (1, 2, 4, 1), (1, 2, 1, 4)],
                         ids=["no-sample", "no-channel", "zero-width-out", "zero-height-out"])
def test_fast_path_handles_empty_tensors(impl, shape, channels_last):
    """The custom op itself (maxent_pool2d refuses an empty output size earlier) on empty shapes:
    empty output, zero gradients, no crash (a zero output width once divided by zero in C++)."""
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xr, lam = x.clone().requires_grad_(), torch.ones(1, 1, 1, 1, requires_grad=True)
    with use_implementation(impl):
        y = torch.ops.gfgp.maxent_pool2d(xr, lam, [2, 2], [2, 2], [0, 0], False)
    assert y.shape == (*shape[:2], shape[2] // 2, shape[3] // 2)
    y.sum().backward()
    assert xr.grad.shape == x.shape and not xr.grad.any() and lam.grad.item() == 0.0


def test_cpu_kernel_runs_on_pytorchs_openmp_pool():
    """The kernel's OpenMP runtime is the libgomp PyTorch ships (so one thread pool, not two)."""
    import ctypes
    from pathlib import Path

    if cpu.build_error() is not None:
        pytest.skip(cpu.build_error())
    if not cpu.has_openmp():
        pytest.skip("the C++ compiler here has no OpenMP: the kernel was built serial")
    torch_gomp = sorted(Path(torch.__file__).parent.glob("lib/libgomp*.so*"))
    if not torch_gomp:
        pytest.skip("this PyTorch build ships no libgomp")

    def address(lib: ctypes.CDLL) -> int:  # dlsym searches the library, then what it links
        return ctypes.cast(lib.omp_get_max_threads, ctypes.c_void_p).value

    assert address(cpu._library()) == address(ctypes.CDLL(str(torch_gomp[0])))


# ------------------------------------------------------------------------------- adversarial


def adversarial_inputs():
    """(name, x, lam): large signed inputs, large and negative lam, windows far below zero."""
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(2, 5, 9, 9, dtype=torch.float64, generator=gen) * 1e4
    very_negative = -1e4 - torch.rand(2, 5, 9, 9, dtype=torch.float64, generator=gen)  # lam x ~ -1e6
    near_ties = torch.randint(-3, 3, (2, 5, 9, 9), generator=gen).double() * 1e3
    lam_big = torch.empty(2, 5, 1, 1, dtype=torch.float64).uniform_(-100, 100, generator=gen)
    return [
        ("x1e4-lam+-100", big, lam_big),
        ("x1e4-lam100", big, torch.full((1, 5, 1, 1), 100.0, dtype=torch.float64)),
        ("x1e4-lam-100", big, torch.full((1, 1, 1, 1), -100.0, dtype=torch.float64)),
        ("all-very-negative-lam100", very_negative, torch.full((2, 5, 1, 1), 100.0, dtype=torch.float64)),
        ("all-very-negative-lam-100", very_negative, torch.full((2, 1, 1, 1), -100.0, dtype=torch.float64)),
        ("ties-lam100", near_ties, torch.full((1, 1, 1, 1), 100.0, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("impl", fast_paths())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geo", [(2, 2, 0, False), (3, 2, 1, True), (3, 1, 1, False)], ids=["2s2", "3s2p1c", "3s1p1"])
@pytest.mark.parametrize("name,x64,lam64", adversarial_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_path_adversarial_inputs(impl, name, x64, lam64, geo, channels_last):
    """Finite everywhere, and within the float32 conditioning of the problem of the float64 result.

    float32 rounds lam * x (up to 1e6 here) by up to 0.06, which moves near-tied weights by a
    few percent; the bounds below scale with the problem (|x|, |lam x|), and the reference
    path meets the same bounds.
    """
    x64 = x64.contiguous(memory_format=torch.channels_last) if channels_last else x64
    out_hw = F.avg_pool2d(x64, *geo[:3], ceil_mode=geo[3]).shape[2:]
    grad64 = torch.randn(2, 5, *out_hw, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    truth = run("reference", x64, lam64, grad64, *geo)
    x_max, lam_max = x64.abs().max().item(), lam64.abs().max().item()
    eps = torch.finfo(torch.float32).eps
    bounds = [  # y, dL/dx, dL/dlam
        64 * eps * x_max,
        64 * eps * lam_max * x_max * grad64.abs().max().item() + 0.5 * grad64.abs().max().item(),
        64 * eps * x_max**2 * grad64.abs().sum().item() + 1e-3 * truth[2].abs().max().item(),
    ]
    for path in (impl, "reference"):
        got = run(path, x64.float(), lam64.float(), grad64.float(), *geo)
        for what, value, expected, bound in zip(("output", "dL/dx", "dL/dlam"), got, truth, bounds):
            assert torch.isfinite(value).all(), f"{path} {what} not finite"
            err = (value.double() - expected).abs().max().item()
            assert err <= bound, f"{path} {what}: error {err:.3g} > bound {bound:.3g}"


# ------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("impl", ["reference", *fast_paths()])
@pytest.mark.parametrize("geo", [(2, 2, 0), (3, 2, 1)], ids=["2s2", "3s2p1"])
def test_saved_for_backward_is_at_most_input_lam_and_two_outputs(impl, geo):
    x = torch.randn(4, 16, 28, 28, requires_grad=True)
    lam = torch.rand(4, 16, 1, 1, requires_grad=True)

    def forward():
        with use_implementation(impl):
            return maxent_pool2d(x, lam, *geo)

    out_bytes = forward().numel() * 4
    saved = saved_tensor_bytes(forward)
    assert saved <= x.numel() * 4 + lam.numel() * 4 + 2 * out_bytes


# ------------------------------------------------------------------------------- dispatch


def test_auto_dispatch_picks_a_path_per_device():
    x = torch.empty(1, 1, 2, 2)
    expected = "cpu" if cpu.build_error() is None else "reference"
    assert dispatch.resolve(x) == expected
    with use_implementation("reference"):
        assert dispatch.resolve(x) == "reference"
    assert dispatch.current_implementation() == "auto"


def test_use_implementation_rejects_unknown_names_and_unsupported_tensors():
    with pytest.raises(ValueError, match="implementation must be 'auto' or one of"):
        with use_implementation("fastest"):
            pass
    with use_implementation("triton"):
        with pytest.raises(ValueError, match="'triton' cannot run here: .*CUDA"):
            maxent_pool2d(torch.randn(1, 1, 4, 4), 1.0, 2)


def test_backward_runs_the_implementation_of_its_forward(monkeypatch):
    calls = []
    real = reference.backward
    monkeypatch.setattr(reference, "backward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with use_implementation("reference"):
        y = maxent_pool2d(x, 1.0, 2)
    y.sum().backward()  # outside the block
    assert calls == [1]


def test_cpu_kernel_build_is_cached(monkeypatch, tmp_path):
    if cpu.build_error() is not None:
        pytest.skip(cpu.build_error())
    monkeypatch.setenv("GFGP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    path = cpu.library_path()
    assert path.parent == tmp_path and not path.exists()
    assert cpu.build_error() is None  # builds
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(cpu, "_lib", None)
    assert cpu.build_error() is None  # loads the cached file
    assert path.stat().st_mtime_ns == stamp and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cpu_path_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("GFGP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    monkeypatch.setattr(dispatch, "_broken", {})
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"^gfgp: max-entropy pooling cpu path unavailable \(.*no C\+\+ compiler"):
        y = maxent_pool2d(x, 1.5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        y2 = maxent_pool2d(x, 1.5, 2)
    with use_implementation("reference"):
        expected = maxent_pool2d(x, 1.5, 2)
    assert torch.equal(y, expected) and torch.equal(y2, expected)
    assert dispatch.resolve(x) == "reference"
    assert "\n" not in str(dispatch._broken["cpu"])


@pytest.mark.parametrize("impl", fast_paths())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_custom_op_registration_holds_for_fast_path(impl, channels_last):
    """opcheck: schema, fake kernel (shapes and strides), autograd registration, AOT dispatch."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for lam in (torch.rand(2, 3, 1, 1, dtype=torch.float64), torch.rand(2, 3, 5, 5, dtype=torch.float64)):
        with use_implementation(impl):
            torch.library.opcheck(torch.ops.gfgp.maxent_pool2d,
                                  (x.requires_grad_(), lam.requires_grad_(), [3, 3], [2, 2], [1, 1], False))
        x = x.detach()

