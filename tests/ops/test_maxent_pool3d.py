"""maxent_pool3d: the op over (t, h, w) windows against independent oracles.

- the slow float64 loop reference of tests/ops/_loops3d.py (explicit loops over every output
  window, both gradients by their formulas), under hypothesis over shapes, geometries and lam shapes;
- ``torch.autograd.gradcheck`` in float64 for every lam shape on several geometries (odd sizes,
  padding, ceil_mode, anisotropic kernels such as (1, 3, 3));
- lam = 0 is ``F.avg_pool3d(count_include_pad=False)``; every output lies between the window's
  mean and its maximum and approaches ``F.max_pool3d`` as lam grows;
- golden values in fixtures/maxent_pool3d_golden.pt (made by the loop reference; regenerate
  with ``GFGP_ACCEPT=1``, fixtures/README.md);
- the 2-D op is the 3-D op on a clip of one frame, and the layers GFGPPool3d / MaxEntPool3d.
Every implementation (``reference`` and, where it builds, the fused ``cpu`` kernel) is checked.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfgp_cli import GFGPPool3d, MaxEntPool3d, maxent_pool2d, maxent_pool3d
from gfgp_cli.ops import cpu
from gfgp_cli.ops.dispatch import use_implementation

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "maxent_pool3d_golden.pt"
LAM_KINDS = ["float", "0d", "11111", "1C111", "NC111", "N1111", "per-window"]
# Geometries (T, H, W, kernel, stride, padding, ceil_mode).
GEOMETRIES = {
    "2x2x2s2": (4, 6, 6, 2, 2, 0, False),
    "1x2x2s122": (3, 6, 7, (1, 2, 2), (1, 2, 2), 0, False),
    "1x3x3s122p011": (3, 7, 6, (1, 3, 3), (1, 2, 2), (0, 1, 1), False),
    "3x3x3s2p1-ceil": (5, 6, 7, 3, 2, 1, True),
    "2x2x2s2-odd-ceil": (5, 5, 7, 2, 2, 0, True),
    "3x1x3s1-overlap": (4, 3, 5, (3, 1, 3), 1, (1, 0, 1), False),
    "2x2x1s3-gaps-ceil": (7, 8, 4, (2, 2, 1), (3, 3, 2), 0, True),
}


def _implementations():
    reason = cpu.build_error()
    return ["reference", pytest.param("cpu", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


# The shared float64 loop reference (tests/ops/_loops3d.py), loaded by path (--import-mode=importlib).
_spec = importlib.util.spec_from_file_location("_loops3d", Path(__file__).with_name("_loops3d.py"))
_loops3d = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loops3d)
_triple = _loops3d.triple


def out_size(x, kernel, stride, padding, ceil):
    return _loops3d.out_size(x.shape[2:], _triple(kernel), _triple(stride), _triple(padding), ceil)


def make_lam(kind, n, c, out, dtype, gen, low=-1.0, high=3.0):
    shapes = {"11111": (1, 1, 1, 1, 1), "1C111": (1, c, 1, 1, 1), "NC111": (n, c, 1, 1, 1),
              "N1111": (n, 1, 1, 1, 1), "per-window": (n, c, *out)}
    if kind == "float":
        return float(torch.empty(()).uniform_(low, high, generator=gen))
    shape = () if kind == "0d" else shapes[kind]
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen).to(dtype)


def run(impl, x, lam, geometry, grad):
    """(y, dL/dx, dL/dlam or None) of the op with one implementation."""
    xr = x.detach().clone().requires_grad_(True)
    lr = lam.detach().clone().requires_grad_(True) if torch.is_tensor(lam) else lam
    with use_implementation(impl):
        y = maxent_pool3d(xr, lr, *geometry)
        inputs = [xr, lr] if torch.is_tensor(lr) else [xr]
        grads = torch.autograd.grad(y, inputs, grad)
    return y.detach(), grads[0], grads[1] if len(grads) > 1 else None


def expected(x, lam, geometry, grad):
    """(y, dL/dx, dL/dlam or None) of the float64 loop reference."""
    return _loops3d.loop_reference(x, lam, grad, *geometry)


def assert_close(actual, wanted, tol):
    scale = max(float(wanted.abs().max()), 1.0)
    assert actual.shape == wanted.shape
    assert float((actual.to(torch.float64) - wanted).abs().max()) <= tol * scale


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
def test_values_and_both_gradients_match_the_loop_reference(impl, geometry, lam_kind):
    t, h, w, *geo = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(hash((geometry, lam_kind)) % 2**31)
    x = torch.randn(2, 3, t, h, w, dtype=torch.float64, generator=g) * 2
    out = out_size(x, *geo[:3], geo[3])
    lam = make_lam(lam_kind, 2, 3, out, torch.float64, g)
    grad = torch.randn(2, 3, *out, dtype=torch.float64, generator=g)
    got, want = run(impl, x, lam, geo, grad), expected(x, lam, geo, grad)
    for a, b in zip(got, want):
        if b is not None:
            assert_close(a, b, 1e-10)


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lower_precision_and_channels_last_3d(impl, dtype, tol, channels_last):
    t, h, w, *geo = GEOMETRIES["3x3x3s2p1-ceil"]
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(2, 19, t, h, w, dtype=torch.float64, generator=g)
    out = out_size(x64, *geo[:3], geo[3])
    lam64 = make_lam("NC111", 2, 19, out, torch.float64, g, 0.0, 1.0)
    grad64 = torch.randn(2, 19, *out, dtype=torch.float64, generator=g)
    x = x64.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y, gx, gl = run(impl, x, lam64.to(dtype), geo, grad64.to(dtype))
    assert y.dtype == dtype and gx.dtype == dtype and gl.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    # the oracle sees the same rounded inputs
    want = expected(x.to(torch.float64), lam64.to(dtype).to(torch.float64), geo, grad64.to(dtype).to(torch.float64))
    for a, b in zip((y, gx, gl), want):
        assert_close(a, b, tol)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    s=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    pad=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    ceil=st.booleans(), lam_kind=st.sampled_from(LAM_KINDS), seed=st.integers(0, 2**16),
)
def test_random_geometries_match_the_loop_reference(t, h, w, k, s, pad, ceil, lam_kind, seed):
    p = tuple(ki // 2 if use else 0 for ki, use in zip(k, pad))
    x = torch.randn(2, 2, t, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out = out_size(x, k, s, p, ceil)
    if min(out) < 1:
        with pytest.raises(ValueError, match="too small"):
            maxent_pool3d(x, 1.0, k, s, p, ceil)
        return
    g = torch.Generator().manual_seed(seed + 1)
    lam = make_lam(lam_kind, 2, 2, out, torch.float64, g)
    grad = torch.randn(2, 2, *out, dtype=torch.float64, generator=g)
    for impl in ["reference"] + (["cpu"] if cpu.build_error() is None else []):
        for a, b in zip(run(impl, x, lam, (k, s, p, ceil), grad), expected(x, lam, (k, s, p, ceil), grad)):
            if b is not None:
                assert_close(a, b, 1e-10)


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("geometry", ["1x3x3s122p011", "3x3x3s2p1-ceil", "2x2x1s3-gaps-ceil"])
@pytest.mark.parametrize("lam_kind", ["11111", "1C111", "NC111", "N1111", "per-window"])
def test_gradcheck_float64(impl, geometry, lam_kind):
    t, h, w, *geo = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, min(t, 4), min(h, 5), min(w, 5), dtype=torch.float64, generator=g).requires_grad_(True)
    out = out_size(x, *geo[:3], geo[3])
    lam = make_lam(lam_kind, 2, 2, out, torch.float64, g).requires_grad_(True)
    with use_implementation(impl):
        assert torch.autograd.gradcheck(lambda a, b: maxent_pool3d(a, b, *geo), (x, lam))


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_lam_zero_is_avg_pool3d_and_large_lam_approaches_max_pool3d(impl, geometry):
    t, h, w, k, s, p, ceil = GEOMETRIES[geometry]
    x = torch.randn(2, 3, t, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with use_implementation(impl):
        avg = F.avg_pool3d(x, k, s, p, ceil, count_include_pad=False)
        torch.testing.assert_close(maxent_pool3d(x, 0.0, k, s, p, ceil), avg, rtol=0, atol=1e-12)
        mx = F.max_pool3d(x, k, s, p, ceil_mode=ceil)
        y = maxent_pool3d(x, 30.0, k, s, p, ceil)
        # the max bound: the mean of the window <= y <= its maximum; at lam = 30 within 0.05 of it
        assert bool((y <= mx + 1e-12).all()) and bool((y >= avg - 1e-12).all())
        assert float((mx - y).max()) < 0.05


def test_two_d_op_is_the_three_d_op_on_one_frame():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, generator=g)
    lam = torch.rand(2, 5, 1, 1, dtype=torch.float64, generator=g)
    y2 = maxent_pool2d(x, lam, 3, 2, 1, True)
    y3 = maxent_pool3d(x[:, :, None], lam[:, :, None], (1, 3, 3), (1, 2, 2), (0, 1, 1), True)
    torch.testing.assert_close(y3[:, :, 0], y2, rtol=0, atol=1e-14)


def test_bad_input_is_refused_in_one_line():
    x = torch.randn(1, 2, 3, 4, 4)
    for call, match in [
        (lambda: maxent_pool3d(x[0], 1.0, 2), r"5-D tensor \[N, C, T, H, W\]"),
        (lambda: maxent_pool3d(x, 1.0, (2, 2)), "kernel_size must be an int or a tuple of 3 ints"),
        (lambda: maxent_pool3d(x, torch.ones(1, 2, 1, 1), 2), "lam has shape"),
        (lambda: maxent_pool3d(x, 1.0, 2, padding=(0, 2, 0)), "padding must be between 0 and half the kernel"),
        (lambda: maxent_pool3d(x, 1.0, (4, 2, 2)), "too small"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("layer", [GFGPPool3d, MaxEntPool3d])
def test_layers_pool_clips_and_train(layer):
    pool = layer(6, kernel_size=(1, 2, 2))
    x = torch.randn(3, 6, 4, 9, 8, requires_grad=True)
    y = pool(x)
    assert y.shape == (3, 6, 4, 5, 4) if pool.ceil_mode else y.shape == (3, 6, 4, 4, 4)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pool.parameters())
    lam = pool.lam(x)
    assert lam.shape == ((3, 6, 1, 1, 1) if layer is GFGPPool3d else (1, 6, 1, 1, 1))
    with pytest.raises(ValueError, match=r"expects input \[N, 6, T, H, W\]"):
        pool(torch.randn(3, 6, 9, 8))
    pool.eval()
    torch.testing.assert_close(pool(x), maxent_pool3d(x, pool.lam(x), (1, 2, 2)))


def test_gfgp_pool3d_lam_comes_from_the_global_average_over_time_and_space():
    torch.manual_seed(0)  # the estimator's weights: 8 hidden units, not all of them inactive
    pool = GFGPPool3d(16, kernel_size=2).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 6, 6, generator=g)
    order = torch.randperm(4 * 6 * 6, generator=g)
    shuffled = x.flatten(2)[:, :, order].reshape(x.shape)  # the same mean per channel, other positions
    torch.testing.assert_close(pool.lam(x), pool.lam(shuffled))
    changed = x.clone()
    changed[:, :, 0] += torch.linspace(-3, 3, 16)[:, None, None]  # other means over T, H, W
    with torch.no_grad():
        assert float((pool.lam(x) - pool.lam(changed)).abs().max()) > 1e-3


# ------------------------------------------------------------------------------- golden values


def _golden_cases():
    g = torch.Generator().manual_seed(20191027)
    cases = []
    for name, kind in [("2x2x2s2", "NC111"), ("1x3x3s122p011", "per-window"), ("3x3x3s2p1-ceil", "1C111"),
                       ("2x2x1s3-gaps-ceil", "N1111")]:
        t, h, w, *geo = GEOMETRIES[name]
        x = torch.randn(2, 1, t, h, w, dtype=torch.float64, generator=g) * 2
        lam = make_lam(kind, 2, 1, out_size(x, *geo[:3], geo[3]), torch.float64, g)
        cases.append({"x": x, "lam": lam, "geometry": [list(_triple(v)) for v in geo[:3]] + [int(geo[3])]})
    return cases


@pytest.mark.parametrize("impl", _implementations())
def test_golden_values(impl):
    if os.environ.get("GFGP_ACCEPT") == "1" and impl == "reference":
        cases = _golden_cases()
        for case in cases:  # expected values from the loop reference, not from the op
            geo = [tuple(v) for v in case["geometry"][:3]] + [bool(case["geometry"][3])]
            ones = torch.ones(2, 1, *out_size(case["x"], *geo[:3], geo[3]), dtype=torch.float64)
            case["y"], case["grad_x"], case["grad_lam"] = expected(case["x"], case["lam"], geo, ones)
        torch.save(cases, GOLDEN)
    cases = torch.load(GOLDEN, weights_only=True)
    assert len(cases) == 4
    for case in cases:
        geo = [tuple(v) for v in case["geometry"][:3]] + [bool(case["geometry"][3])]
        y, gx, gl = run(impl, case["x"], case["lam"], geo, torch.ones_like(case["y"]))
        for a, b in zip((y, gx, gl), (case["y"], case["grad_x"], case["grad_lam"])):
            assert_close(a, b, 1e-12)
