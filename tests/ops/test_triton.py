"""The Triton kernels of maxent_pool2d and maxent_pool3d agree with the reference path.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: the ``interpreted`` fixture
sets ``TRITON_INTERPRET=1`` and loads a private copy of ``gfgp_cli/ops/triton/kernels.py``, so
its ``@triton.jit`` functions are created in interpreter mode (Triton reads the variable when a
function is decorated). That holds even when Triton itself was imported earlier without the
variable (torch._dynamo imports it), because the kernels call only Triton builtins and their own
helpers (see kernels.py); the tests call the launchers directly. Shapes are
small so that this stays in the fast suite. ``gpu``-marked tests run the compiled kernels on a
CUDA device through the op's normal dispatch.

The same kernels run 3-D pooling ([N, C, T, H, W], maxent_pool3d; 4-D input is the 5-D case
with T = 1): the 3-D tests compare them with a float64 reference written here as plain loops
over the windows, and with :mod:`gfgp_cli.ops.reference` on 5-D input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gfgp_cli.ops.triton as triton_path
from gfgp_cli.ops import dispatch, maxent_pool2d, maxent_pool3d, reference
from gfgp_cli.ops.dispatch import use_implementation

# The shared float64 loop reference of the 3-D op, loaded by path (--import-mode=importlib).
_spec = importlib.util.spec_from_file_location("_loops3d", Path(__file__).with_name("_loops3d.py"))
_loops3d = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loops3d)
loop_reference_3d = _loops3d.loop_reference

KERNELS = Path(triton_path.__file__).with_name("kernels.py")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
GEOMETRIES = {  # (H, W, kernel, stride, padding, ceil_mode)
    "2x2s2": (8, 8, 2, 2, 0, False),
    "3x3s2p1-ceil": (8, 7, 3, 2, 1, True),
    "3x3s1p1-overlap": (6, 7, 3, 1, 1, False),
    "2x2s3-gaps-ceil": (8, 7, 2, 3, 0, True),
    "rect-3x2-s2x1-p1x0": (9, 6, (3, 2), (2, 1), (1, 0), True),
}
LAM_SHAPES = ["scalar", "1C11", "NC11", "N111", "NCHW"]
N, C = 2, 3


@pytest.fixture(scope="module")
def interpreted():
    """gfgp's Triton kernels module, built in interpreter mode (runs CPU tensors)."""
    pytest.importorskip("triton", reason="Triton is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location("gfgp_cli.ops.triton._interpreted", KERNELS)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "gfgp_cli.ops.triton"
        spec.loader.exec_module(module)
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(module._forward_kernel, InterpretedFunction)
        yield module


def pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def make_case(geometry, lam_shape, dtype, channels_last, seed=0, x_scale=2.0, lam_range=(-1.0, 3.0)):
    h, w, k, s, p, ceil = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, h, w, dtype=torch.float64, generator=gen) * x_scale).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_hw = tuple(F.avg_pool2d(x.double(), k, s, p, ceil).shape[2:])
    shape = {"scalar": (1, 1, 1, 1), "1C11": (1, C, 1, 1), "NC11": (N, C, 1, 1), "N111": (N, 1, 1, 1),
             "NCHW": (N, C, *out_hw)}[lam_shape]
    lam = torch.empty(shape, dtype=torch.float64).uniform_(*lam_range, generator=gen).to(dtype)
    grad = torch.randn(N, C, *out_hw, dtype=torch.float64, generator=gen).to(dtype)
    return x, lam, grad, (pair(k), pair(s), pair(p), ceil)


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = 1.0 + expected.double().abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _channels_last_format(x):
    """channels_last (5-D: channels_last_3d) for such an input, else contiguous: the output's layout."""
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return fmt if x.is_contiguous(memory_format=fmt) and not x.is_contiguous() else torch.contiguous_format


def check_against_reference(kernels, x, lam, grad, geo, tol):
    """The kernels (2-D or 3-D) against gfgp_cli.ops.reference: values, layout and both gradients."""
    y = kernels.launch_forward(x, lam, *geo)
    y_ref = reference.forward(x, lam, *geo)
    assert_close(y, y_ref, tol, "output")
    assert y.is_contiguous(memory_format=_channels_last_format(x))
    # Both backward paths get the same saved output, so dL/dx and dL/dlam compare exactly.
    gx, gl = kernels.launch_backward(grad, x, lam, y_ref, *geo)
    gx_ref, gl_ref = reference.backward(grad, x, lam, y_ref, *geo)
    assert_close(gx, gx_ref, 10 * tol, "dL/dx")
    assert_close(gl, gl_ref, 10 * tol, "dL/dlam")
    assert gx.stride() == x.stride()
    return y, gx, gl


# ------------------------------------------------------------------------------- interpreter (CPU)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("lam_shape", LAM_SHAPES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_triton_float32_matches_reference(interpreted, geometry, lam_shape, channels_last):
    x, lam, grad, geo = make_case(geometry, lam_shape, torch.float32, channels_last)
    check_against_reference(interpreted, x, lam, grad, geo, TOL[torch.float32])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("lam_shape", ["NC11", "NCHW"])
@pytest.mark.parametrize("geometry", ["2x2s2", "3x3s2p1-ceil"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_types_match_reference(interpreted, dtype, geometry, lam_shape, channels_last):
    """float16/bfloat16 in and out, float32 inside: within rounding of the float32 reference."""
    x, lam, grad, geo = make_case(geometry, lam_shape, dtype, channels_last)
    y, gx, gl = check_against_reference(interpreted, x, lam, grad, geo, TOL[dtype])
    assert y.dtype == gx.dtype == gl.dtype == dtype


def test_triton_strided_input_is_handled(interpreted):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 14, 7, generator=gen)[:, [3, 0, 2], ::2]  # neither NCHW- nor NHWC-contiguous
    lam = torch.rand(2, 3, 1, 1, generator=gen)
    grad = torch.randn(2, 3, 4, 4, generator=gen)
    geo = ([3, 3], [2, 2], [1, 1], True)
    y = interpreted.launch_forward(x, lam, *geo)
    assert_close(y, reference.forward(x.contiguous(), lam, *geo), TOL[torch.float32], "output")
    gx, gl = interpreted.launch_backward(grad, x, lam, y, *geo)
    gx_ref, gl_ref = reference.backward(grad, x.contiguous(), lam, y, *geo)
    assert_close(gx, gx_ref, 10 * TOL[torch.float32], "dL/dx")
    assert_close(gl, gl_ref, 10 * TOL[torch.float32], "dL/dlam")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["x1e4-lam+-100", "all-very-negative-lam100", "all-very-negative-lam-100"])
def test_triton_adversarial_inputs_stay_finite_and_accurate(interpreted, case, channels_last):
    """x up to 1e4 and lam up to +-100 (lam x ~ 1e6): per-window shifts keep every result finite."""
    gen = torch.Generator().manual_seed(9)
    if case.startswith("x1e4"):
        x64 = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=gen) * 1e4
        lam64 = torch.empty(2, 3, 1, 1, dtype=torch.float64).uniform_(-100, 100, generator=gen)
    else:
        x64 = -1e4 - torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=gen)
        lam64 = torch.full((1, 3, 1, 1), 100.0 if case.endswith("lam100") else -100.0, dtype=torch.float64)
    if channels_last:
        x64 = x64.contiguous(memory_format=torch.channels_last)
    geo = ([3, 3], [2, 2], [1, 1], True)
    grad64 = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen)
    y64 = reference.forward(x64, lam64, *geo)
    gx64, gl64 = reference.backward(grad64, x64, lam64, y64, *geo)
    x, lam, grad = x64.float(), lam64.float(), grad64.float()
    y = interpreted.launch_forward(x, lam, *geo)
    gx, gl = interpreted.launch_backward(grad, x, lam, y, *geo)
    for value in (y, gx, gl):
        assert torch.isfinite(value).all()
    eps, x_max, g_max = torch.finfo(torch.float32).eps, x64.abs().max().item(), grad64.abs().max().item()
    assert (y.double() - y64).abs().max() <= 64 * eps * x_max
    assert (gx.double() - gx64).abs().max() <= 64 * eps * lam64.abs().max().item() * x_max * g_max + 0.5 * g_max
    assert (gl.double() - gl64).abs().max() <= 64 * eps * x_max**2 * grad64.abs().sum().item() + 1e-3 * gl64.abs().max()


# ------------------------------------------------------------------------------- dispatch (CPU)


def test_triton_path_is_for_cuda_tensors_only():
    reason = triton_path.unsupported(torch.empty(1, 1, 2, 2))
    assert reason is not None and "CUDA tensors only" in reason
    assert dispatch.resolve(torch.empty(1, 1, 2, 2)) != "triton"


def test_triton_build_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    from triton.runtime.errors import OutOfResources

    class Unbuildable:
        @staticmethod
        def launch_forward(*args):
            raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_path, "_kernels", lambda: Unbuildable)
    monkeypatch.setattr(dispatch, "_broken", {})
    x, lam = torch.randn(1, 2, 6, 6), torch.rand(1, 2, 1, 1)
    with pytest.warns(RuntimeWarning, match=r"^gfgp: max-entropy pooling triton path unavailable \(OutOfResources: out of resource"):
        y = triton_path.forward(x, lam, [2, 2], [2, 2], [0, 0], False)
    torch.testing.assert_close(y, reference.forward(x, lam, [2, 2], [2, 2], [0, 0], False))
    assert "triton" in dispatch._broken


# ------------------------------------------------------------------------------- real GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("lam_shape", LAM_SHAPES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_triton_on_cuda_matches_reference(geometry, lam_shape, dtype, channels_last):
    x, lam, grad, (k, s, p, ceil) = make_case(geometry, lam_shape, dtype, channels_last)
    x, lam, grad = x.cuda(), lam.cuda(), grad.cuda()
    assert dispatch.resolve(x) == "triton"
    results = {}
    for impl in ("auto", "reference"):
        xr, lr = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        with use_implementation(impl):
            y = maxent_pool2d(xr, lr, k, s, p, ceil)
        results[impl] = (y.detach(), *torch.autograd.grad(y, (xr, lr), grad))
    for what, a, b in zip(("output", "dL/dx", "dL/dlam"), results["auto"], results["reference"]):
        assert_close(a, b, 10 * TOL[dtype], what)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape,geo", [((16, 256, 56, 56), (2, 2, 0)), ((16, 64, 112, 112), (3, 2, 1))],
                         ids=["bench-2x2s2", "bench-3x3s2p1"])
def test_triton_on_cuda_benchmark_shapes(shape, geo):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).cuda()
    lam = torch.rand(shape[0], shape[1], 1, 1, generator=gen).cuda()
    y = maxent_pool2d(x, lam, *geo)
    with use_implementation("reference"):
        y_ref = maxent_pool2d(x, lam, *geo)
    assert_close(y, y_ref, TOL[torch.float32], "output")


# ------------------------------------------------------------------------------- 3-D (interpreter)


GEOMETRIES_3D = {  # (T, H, W, kernel, stride, padding, ceil_mode), all (t, h, w)
    "2x2x2s2-odd": (4, 5, 6, (2, 2, 2), (2, 2, 2), (0, 0, 0), False),
    "1x2x2s122": (3, 6, 5, (1, 2, 2), (1, 2, 2), (0, 0, 0), False),
    "1x3x3s122p011": (3, 7, 6, (1, 3, 3), (1, 2, 2), (0, 1, 1), False),
    "3x3x3s2p1-ceil": (5, 6, 7, (3, 3, 3), (2, 2, 2), (1, 1, 1), True),
    "3x2x3s112p101-overlap": (4, 5, 5, (3, 2, 3), (1, 1, 2), (1, 0, 1), False),
    "2x1x2s323-gaps-ceil": (5, 7, 6, (2, 1, 2), (3, 2, 3), (0, 0, 0), True),
}
LAM_SHAPES_3D = ["scalar", "1C111", "NC111", "N1111", "NCTHW"]
N3, C3 = 2, 2


def make_case_3d(geometry, lam_shape, dtype, channels_last, seed=0):
    t, h, w, k, s, p, ceil = GEOMETRIES_3D[geometry]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N3, C3, t, h, w, dtype=torch.float64, generator=gen) * 2.0).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out = tuple(F.avg_pool3d(x.double(), k, s, p, ceil).shape[2:])
    shape = {"scalar": (1, 1, 1, 1, 1), "1C111": (1, C3, 1, 1, 1), "NC111": (N3, C3, 1, 1, 1),
             "N1111": (N3, 1, 1, 1, 1), "NCTHW": (N3, C3, *out)}[lam_shape]
    lam = torch.empty(shape, dtype=torch.float64).uniform_(-1.0, 3.0, generator=gen).to(dtype)
    grad = torch.randn(N3, C3, *out, dtype=torch.float64, generator=gen).to(dtype)
    return x, lam, grad, (list(k), list(s), list(p), ceil)


def check_3d(kernels, x, lam, grad, geo, tol, against_reference=True):
    """The 3-D kernels against the float64 loops (and against gfgp_cli.ops.reference)."""
    y = kernels.launch_forward(x, lam, *geo)
    y64, gx64, gl64 = loop_reference_3d(x, lam, grad, *geo)
    assert_close(y, y64.to(x.dtype), tol, "output vs loops")
    assert y.is_contiguous(memory_format=_channels_last_format(x))
    gx, gl = kernels.launch_backward(grad, x, lam, y64.to(x.dtype), *geo)
    assert_close(gx, gx64.to(x.dtype), 10 * tol, "dL/dx vs loops")
    assert_close(gl, gl64.to(lam.dtype), 10 * tol, "dL/dlam vs loops")
    assert gx.stride() == x.contiguous(memory_format=_channels_last_format(x)).stride() and gl.shape == lam.shape
    return check_against_reference(kernels, x, lam, grad, geo, tol) if against_reference else (y, gx, gl)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("lam_shape", LAM_SHAPES_3D)
@pytest.mark.parametrize("geometry", list(GEOMETRIES_3D))
def test_triton_3d_float32_matches_loops_and_reference(interpreted, geometry, lam_shape, channels_last):
    x, lam, grad, geo = make_case_3d(geometry, lam_shape, torch.float32, channels_last)
    check_3d(interpreted, x, lam, grad, geo, TOL[torch.float32])


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("lam_shape", ["NC111", "NCTHW"])
@pytest.mark.parametrize("geometry", ["1x3x3s122p011", "3x3x3s2p1-ceil"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_3d_half_types_match_loops_and_reference(interpreted, dtype, geometry, lam_shape, channels_last):
    """float16/bfloat16 in and out, float32 inside: within rounding of the float64 loops."""
    x, lam, grad, geo = make_case_3d(geometry, lam_shape, dtype, channels_last)
    y, gx, gl = check_3d(interpreted, x, lam, grad, geo, TOL[dtype])
    assert y.dtype == gx.dtype == gl.dtype == dtype


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_2d_equals_3d_with_one_frame(interpreted, channels_last):
    """A 4-D input gives bit for bit the 5-D result of the same input with T = 1 and a temporal
    kernel of 1 (one set of kernels: the 2-D launch is the 3-D one)."""
    x, lam, grad, (k, s, p, ceil) = make_case("rect-3x2-s2x1-p1x0", "NCHW", torch.float32, channels_last)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x5 = x.unsqueeze(2).contiguous(memory_format=fmt)
    geo5 = ([1, *k], [1, *s], [0, *p], ceil)
    y4 = interpreted.launch_forward(x, lam, k, s, p, ceil)
    y5 = interpreted.launch_forward(x5, lam.unsqueeze(2), *geo5)
    assert torch.equal(y4, y5.squeeze(2))
    gx4, gl4 = interpreted.launch_backward(grad, x, lam, y4, k, s, p, ceil)
    gx5, gl5 = interpreted.launch_backward(grad.unsqueeze(2), x5, lam.unsqueeze(2), y5, *geo5)
    assert torch.equal(gx4, gx5.squeeze(2)) and torch.equal(gl4, gl5.squeeze(2))


def test_triton_3d_strided_input_and_broadcast_grad_are_handled(interpreted):
    """Neither NCDHW- nor NDHWC-contiguous x, a per-window lam with odd strides, and a stride-0
    upstream gradient (what ``y.sum().backward()`` passes)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 4, 10, 5, generator=gen)[:, [3, 0, 2], :, ::2].transpose(3, 4)  # [2, 3, 4, 5, 5]
    geo = ([2, 3, 3], [1, 2, 2], [1, 1, 1], True)
    out = tuple(F.avg_pool3d(x.double(), *geo).shape[2:])
    lam = torch.rand(2, 3, *reversed(out), generator=gen).permute(0, 1, 4, 3, 2)
    grad = torch.ones(1, 1, 1, 1, 1).expand(2, 3, *out)
    y, gx, gl = check_3d(interpreted, x, lam, grad, geo, TOL[torch.float32], against_reference=False)
    assert y.is_contiguous() and gx.is_contiguous() and gl.shape == lam.shape


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
def test_triton_3d_adversarial_inputs_stay_finite(interpreted, channels_last):
    """x up to 1e4 and lam up to +-100 (lam x ~ 1e6) over (t, h, w) windows stay finite and accurate."""
    gen = torch.Generator().manual_seed(9)
    x64 = torch.randn(2, 2, 4, 5, 5, dtype=torch.float64, generator=gen) * 1e4
    lam64 = torch.empty(2, 2, 1, 1, 1, dtype=torch.float64).uniform_(-100, 100, generator=gen)
    if channels_last:
        x64 = x64.contiguous(memory_format=torch.channels_last_3d)
    geo = ([3, 3, 3], [2, 2, 2], [1, 1, 1], True)
    grad64 = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64, generator=gen)
    y64, gx64, gl64 = loop_reference_3d(x64, lam64, grad64, *geo)
    x, lam, grad = x64.float(), lam64.float(), grad64.float()
    y = interpreted.launch_forward(x, lam, *geo)
    gx, gl = interpreted.launch_backward(grad, x, lam, y, *geo)
    for value in (y, gx, gl):
        assert torch.isfinite(value).all()
    eps, x_max, g_max = torch.finfo(torch.float32).eps, x64.abs().max().item(), grad64.abs().max().item()
    assert (y.double() - y64).abs().max() <= 64 * eps * x_max
    assert (gx.double() - gx64).abs().max() <= 64 * eps * lam64.abs().max().item() * x_max * g_max + 0.5 * g_max
    assert (gl.double() - gl64).abs().max() <= 64 * eps * x_max**2 * grad64.abs().sum().item() + 1e-3 * gl64.abs().max()


def test_triton_kernels_reject_mismatched_rank(interpreted):
    with pytest.raises(ValueError, match="5-D input with 3"):
        interpreted.launch_forward(torch.randn(1, 1, 2, 4, 4), torch.ones(1, 1, 1, 1, 1), [2, 2], [2, 2], [0, 0], False)


# ------------------------------------------------------------------------------- 3-D (real GPU)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("lam_shape", LAM_SHAPES_3D)
@pytest.mark.parametrize("geometry", list(GEOMETRIES_3D))
def test_triton_3d_on_cuda_matches_reference(geometry, lam_shape, dtype, channels_last):
    x, lam, grad, (k, s, p, ceil) = make_case_3d(geometry, lam_shape, dtype, channels_last)
    x, lam, grad = x.cuda(), lam.cuda(), grad.cuda()
    assert dispatch.resolve(x) == "triton"
    results = {}
    for impl in ("auto", "reference"):
        xr, lr = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        with use_implementation(impl):
            y = maxent_pool3d(xr, lr, k, s, p, ceil)
        results[impl] = (y.detach(), *torch.autograd.grad(y, (xr, lr), grad))
    assert results["auto"][0].is_contiguous(memory_format=torch.channels_last_3d if channels_last
                                            else torch.contiguous_format)
    for what, a, b in zip(("output", "dL/dx", "dL/dlam"), results["auto"], results["reference"]):
        assert_close(a, b, 10 * TOL[dtype], what)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("shape,geo", [((8, 64, 16, 56, 56), ((1, 2, 2), (1, 2, 2), 0)),
                                       ((8, 128, 8, 28, 28), (2, 2, 0))],
                         ids=["video-1x2x2s122", "video-2x2x2s2"])
def test_triton_3d_on_cuda_benchmark_shapes(shape, geo, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    lam = torch.rand(shape[0], shape[1], 1, 1, 1, generator=gen).cuda()
    xr, lr = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    y = maxent_pool3d(xr, lr, *geo)
    grad = torch.randn(y.shape, generator=gen).cuda()
    gx, gl = torch.autograd.grad(y, (xr, lr), grad)
    with use_implementation("reference"):
        xr, lr = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        y_ref = maxent_pool3d(xr, lr, *geo)
        gx_ref, gl_ref = torch.autograd.grad(y_ref, (xr, lr), grad)
    assert_close(y, y_ref, TOL[torch.float32], "output")
    assert_close(gx, gx_ref, 10 * TOL[torch.float32], "dL/dx")
    # dL/dlam sums a whole (T, H, W) plane per channel: a looser, relative bound.
    assert_close(gl, gl_ref, 1e-3, "dL/dlam")
