"""maxent_pool2d against independent oracles (docs/method.md section 1).

- ``reference``: explicit Python loops over windows in float64, transcribed from the formula;
  its gradients come from float64 autograd through those loops (no shared code with the op).
- closed forms: lam = 0 is avg_pool2d(count_include_pad=False); large lam approaches max_pool2d.
- gradcheck in float64 for every lam shape, with and without padding, ceil_mode, overlap.
- golden values in fixtures/maxent_pool_golden.pt (see fixtures/README.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfgp_cli import maxent_pool2d
from gfgp_cli.ops import pool_output_size

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GOLDEN = FIXTURES / "maxent_pool_golden.pt"

LAM_KINDS = ["float", "0d", "1111", "1C11", "NC11", "N111", "NCHW"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def reference(x, lam, kernel, stride, padding, ceil_mode):
    """Slow, obviously correct max-entropy pooling: loops over every output window, float64.

    x: Tensor[N, C, H, W]; lam: Tensor broadcastable to [N, C, out_h, out_w] (float64).
    Padded positions are simply not visited. Differentiable through autograd.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    out_h = pool_output_size(h, kh, sh, ph, ceil_mode)
    out_w = pool_output_size(w, kw, sw, pw, ceil_mode)
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, *([1] * 3)) if not torch.is_tensor(lam) else lam
    lam = lam.to(torch.float64).expand(n, c, out_h, out_w)
    x = x.to(torch.float64)
    rows = []
    for i in range(out_h):
        cols = []
        for j in range(out_w):
            r0, c0 = i * sh - ph, j * sw - pw
            r1, c1 = min(r0 + kh, h), min(c0 + kw, w)
            r0, c0 = max(r0, 0), max(c0, 0)
            win = x[:, :, r0:r1, c0:c1].reshape(n, c, -1)  # valid positions only
            z = lam[:, :, i, j, None] * win
            z = z - z.max(dim=-1, keepdim=True).values.detach()
            p = torch.exp(z) / torch.exp(z).sum(dim=-1, keepdim=True)
            cols.append((p * win).sum(dim=-1))
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def make_lam(kind, n, c, out_hw, dtype, generator=None, low=0.0, high=3.0):
    shapes = {
        "1111": (1, 1, 1, 1), "1C11": (1, c, 1, 1), "NC11": (n, c, 1, 1),
        "N111": (n, 1, 1, 1), "NCHW": (n, c, *out_hw),
    }
    if kind == "float":
        return float(torch.empty(()).uniform_(low, high, generator=generator))
    if kind == "0d":
        return torch.empty((), dtype=torch.float64).uniform_(low, high, generator=generator).to(dtype)
    return torch.empty(shapes[kind], dtype=torch.float64).uniform_(low, high, generator=generator).to(dtype)


def out_hw(x, k, s, p, ceil):
    return (pool_output_size(x.shape[2], k, s, p, ceil), pool_output_size(x.shape[3], k, s, p, ceil))


# ------------------------------------------------------------------------------- values + grads


@st.composite
def geometries(draw):
    k = draw(st.integers(1, 4))
    s = draw(st.integers(1, 4))
    p = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    h = draw(st.integers(max(1, k - 2 * p), 9))
    w = draw(st.integers(max(1, k - 2 * p), 9))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 3))
    return n, c, h, w, k, s, p, ceil


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geom=geometries(), kind=st.sampled_from(LAM_KINDS), dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**31 - 1),
       signed_lam=st.booleans())
def test_matches_reference_values_and_gradients(geom, kind, dtype, seed, signed_lam):
    n, c, h, w, k, s, p, ceil = geom
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, c, h, w, dtype=torch.float64, generator=g) * 3
    x = x64.to(dtype)
    hw = out_hw(x, k, s, p, ceil)
    lam = make_lam(kind, n, c, hw, dtype, g, low=-3.0 if signed_lam else 0.0)
    x_req = x.clone().requires_grad_(True)
    lam_req = lam.clone().requires_grad_(True) if torch.is_tensor(lam) else lam
    y = maxent_pool2d(x_req, lam_req, k, s, p, ceil)
    assert y.dtype == dtype and y.shape == F.avg_pool2d(x, k, s, p, ceil).shape

    # The oracle sees exactly the values the op saw (rounded inputs), in float64.
    xr = x.to(torch.float64).requires_grad_(True)
    lr = (lam.to(torch.float64) if torch.is_tensor(lam) else torch.tensor(lam, dtype=torch.float64))
    lr = lr.reshape(lr.shape if lr.dim() == 4 else (1, 1, 1, 1)).requires_grad_(True)
    yr = reference(xr, lr, (k, k), (s, s), (p, p), ceil)
    tol = TOL[dtype] * (1 + yr.abs().max().item())
    torch.testing.assert_close(y.to(torch.float64), yr.detach(), atol=tol, rtol=TOL[dtype])

    grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(grad.to(dtype))
    yr.backward(grad)
    gtol = 10 * TOL[dtype] * (1 + xr.grad.abs().max().item())
    torch.testing.assert_close(x_req.grad.to(torch.float64), xr.grad, atol=gtol, rtol=10 * TOL[dtype])
    if torch.is_tensor(lam):
        assert lam_req.grad.shape == lam.shape and lam_req.grad.dtype == dtype
        ltol = 10 * TOL[dtype] * (1 + lr.grad.abs().max().item())
        torch.testing.assert_close(lam_req.grad.to(torch.float64).reshape(lr.grad.shape), lr.grad, atol=ltol, rtol=10 * TOL[dtype])


@pytest.mark.parametrize("kind", [k for k in LAM_KINDS if k != "float"])
@pytest.mark.parametrize(
    "k,s,p,ceil,hw",
    [(2, 2, 0, False, (6, 6)), (3, 2, 1, False, (7, 6)), (3, 2, 1, True, (8, 7)), (3, 1, 1, False, (5, 5)), (2, 2, 0, True, (5, 7))],
    ids=["2x2s2", "3x3s2p1", "3x3s2p1-ceil", "3x3s1p1-overlap", "2x2s2-ceil-odd"],
)
def test_gradcheck_float64(kind, k, s, p, ceil, hw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=g, requires_grad=True)
    lam = make_lam(kind, 2, 3, out_hw(x, k, s, p, ceil), torch.float64, g, low=-1.0, high=2.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: maxent_pool2d(a, b, k, s, p, ceil), (x, lam))


def test_gradient_formulas_match_paper():
    """dL/dlam is the centred variance of x under p; dL/dx_i = p_i (1 + lam (x_i - y))."""
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = maxent_pool2d(x, lam, 2)
    y.backward()
    v = x.detach().flatten()
    p = torch.softmax(0.7 * v, 0)
    mean = (p * v).sum()
    torch.testing.assert_close(y.detach().flatten()[0], mean)
    torch.testing.assert_close(lam.grad, (p * (v - mean) ** 2).sum())
    torch.testing.assert_close(x.grad.flatten(), p * (1 + 0.7 * (v - mean)))


# ------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("k,s,p,ceil", [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 1, True), (3, 1, 1, False)])
def test_lam_zero_is_avg_pool_excluding_padding(k, s, p, ceil):
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(
        maxent_pool2d(x, 0.0, k, s, p, ceil), F.avg_pool2d(x, k, s, p, ceil, count_include_pad=False)
    )


@pytest.mark.parametrize("k,s,p,ceil", [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 1, True)])
def test_large_lam_approaches_max_pool(k, s, p, ceil):
    """max - y = sum_i p_i (max - x_i) and p_i (max - x_i) <= exp(-lam d) d <= 1 / (e lam)."""
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for lam in (1.0, 10.0, 100.0, 1e4):
        gap = F.max_pool2d(x, k, s, p, ceil_mode=ceil) - maxent_pool2d(x, lam, k, s, p, ceil)
        assert gap.min() >= -1e-12
        assert gap.max() <= (k * k - 1) / (math.e * lam) + 1e-12


def test_stride_none_means_kernel_and_pairs_are_accepted():
    x = torch.randn(1, 2, 9, 10)
    torch.testing.assert_close(maxent_pool2d(x, 1.0, 3), maxent_pool2d(x, 1.0, (3, 3), (3, 3), (0, 0)))
    y = maxent_pool2d(x, 0.0, (3, 2), (1, 2), (1, 0))
    torch.testing.assert_close(y, F.avg_pool2d(x, (3, 2), (1, 2), (1, 0), count_include_pad=False))


# ------------------------------------------------------------------------------- stability


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_finite_for_extreme_inputs(dtype, scale):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 9, 9, generator=g) * scale).to(dtype)
    if dtype == torch.float16:  # 1e4 is within float16 range (max 65504)
        assert torch.isfinite(x).all()
    x.requires_grad_(True)
    for lam in (torch.full((2, 3, 1, 1), 100.0, dtype=dtype), torch.full((1, 3, 1, 1), -100.0, dtype=dtype)):
        lam = lam.clone().requires_grad_(True)
        for k, s, p, ceil in [(2, 2, 0, False), (3, 2, 1, True)]:
            y = maxent_pool2d(x, lam, k, s, p, ceil)
            gx, gl = torch.autograd.grad(y.float().sum(), (x, lam))
            assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gl).all()


def test_all_very_negative_window_is_finite_and_exact():
    """The official kernel's running max starts at 0: lam*x below ~-100 everywhere gives 0/0."""
    x = torch.full((1, 1, 2, 2), -1e4)
    x[0, 0, 0, 0] = -1e4 + 1
    y = maxent_pool2d(x, 1.0, 2)
    expected = (-1e4 + 1) * math.e / (math.e + 3) + (-1e4) * 3 / (math.e + 3)
    assert torch.isfinite(y).all()
    assert abs(y.item() - expected) < 1e-2


def test_half_types_compute_in_float32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g).to(torch.bfloat16)
    y = maxent_pool2d(x, torch.full((1, 3, 1, 1), 5.0, dtype=torch.bfloat16), 2)
    expected = maxent_pool2d(x.float(), torch.full((1, 3, 1, 1), 5.0), 2)
    # only the final rounding to bfloat16 differs from the float32 computation
    torch.testing.assert_close(y, expected.to(torch.bfloat16), atol=0, rtol=0)


def test_channels_last_input():
    x = torch.randn(2, 5, 8, 9)
    lam = torch.rand(2, 5, 1, 1)
    torch.testing.assert_close(
        maxent_pool2d(x.to(memory_format=torch.channels_last), lam, 3, 2, 1), maxent_pool2d(x, lam, 3, 2, 1)
    )


# ------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x: maxent_pool2d(x[0], 1.0, 2), r"x must be a 4-D tensor \[N, C, H, W\], got \(3, 6, 6\)"),
        (lambda x: maxent_pool2d(x, torch.ones(2, 3, 1), 2), r"lam has shape \(2, 3, 1\), but for x of shape \(2, 3, 6, 6\)"),
        (lambda x: maxent_pool2d(x, torch.ones(1, 1, 3, 3), 2), r"lam has shape \(1, 1, 3, 3\)"),
        (lambda x: maxent_pool2d(x, torch.ones(2, 3, 2, 2), 2), r"lam has shape \(2, 3, 2, 2\)"),
        (
            lambda x: maxent_pool2d(x, torch.ones(1, 1, 1, 1, dtype=torch.float64), 2),
            r"lam must have the dtype of x: got lam.dtype=torch.float64, x.dtype=torch.float32",
        ),
        (lambda x: maxent_pool2d(x, torch.ones(1, 1, 1, 1, device="meta"), 2), r"lam must be on the device of x: got lam.device=meta"),
        (lambda x: maxent_pool2d(x, 1.0, 0), r"kernel_size must be >= 1, got kernel_size=\(0, 0\)"),
        (lambda x: maxent_pool2d(x, 1.0, 2, 0), r"stride must be >= 1, got stride=\(0, 0\)"),
        (
            lambda x: maxent_pool2d(x, 1.0, 2, 2, 2),
            r"padding must be between 0 and half the kernel, got padding=\(2, 2\) for kernel_size=\(2, 2\)",
        ),
        (lambda x: maxent_pool2d(x, 1.0, 3, 2, -1), r"padding must be between 0 and half the kernel, got padding=\(-1, -1\)"),
        (lambda x: maxent_pool2d(x, 1.0, (2, 2, 2)), r"kernel_size must be an int or a pair of ints, got \(2, 2, 2\)"),
        (lambda x: maxent_pool2d(x, "1", 2), r"lam must be a float or a Tensor, got str"),
        (lambda x: maxent_pool2d(x.int(), 1.0, 2), r"x must be float32, float64, float16 or bfloat16, got torch.int32"),
        (lambda x: maxent_pool2d(x, 1.0, 7), r"too small for kernel_size=\(7, 7\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, message):
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=message):
        call(x)


# ------------------------------------------------------------------------------- registration


def test_opcheck_custom_op_registration():
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    for lam in (torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True), torch.rand(2, 3, 4, 4, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.gfgp.maxent_pool2d.default, (x, lam, [3, 3], [2, 2], [1, 1], True))


class _UsesOp(torch.nn.Module):
    def forward(self, x, lam):
        return maxent_pool2d(x, lam, 3, 2, 1) + 1


def test_fx_trace_sees_one_call():
    gm = torch.fx.symbolic_trace(_UsesOp())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is maxent_pool2d]
    assert len(calls) == 1
    x, lam = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 1, 1)
    torch.testing.assert_close(gm(x, lam), _UsesOp()(x, lam))


def test_torch_export_sees_one_op():
    x, lam = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 1, 1)
    ep = torch.export.export(_UsesOp(), (x, lam))
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.gfgp.maxent_pool2d.default) == 1
    torch.testing.assert_close(ep.module()(x, lam), _UsesOp()(x, lam))


def test_torch_compile_runs_op_opaque():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    lam = torch.rand(2, 3, 1, 1, requires_grad=True)
    compiled = torch.compile(_UsesOp(), backend="aot_eager", fullgraph=True)
    y = compiled(x, lam)
    y.sum().backward()
    gx, gl = x.grad.clone(), lam.grad.clone()
    x.grad = lam.grad = None
    _UsesOp()(x, lam).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gl, lam.grad)


def test_saved_for_backward_is_at_most_input_lam_output():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    lam = torch.rand(4, 8, 1, 1, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = maxent_pool2d(x, lam, 3, 2, 1)
    budget = (x.numel() + lam.numel() + 2 * y.numel()) * x.element_size()
    assert sum(saved.values()) <= budget


# ------------------------------------------------------------------------------- golden values


def _golden_cases():
    """Inputs of the golden file; regenerate with GFGP_ACCEPT=1 (fixtures/README.md)."""
    g = torch.Generator().manual_seed(20191027)
    cases = []
    for k, s, p, ceil, kind in [(2, 2, 0, False, "NC11"), (3, 2, 1, True, "NCHW"), (3, 1, 1, False, "1C11"), (2, 2, 0, True, "N111")]:
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g) * 2
        lam = make_lam(kind, 2, 3, out_hw(x, k, s, p, ceil), torch.float64, g)
        cases.append({"x": x, "lam": lam, "geometry": [k, s, p, int(ceil)]})
    return cases


def _evaluate(case):
    x = case["x"].clone().requires_grad_(True)
    lam = case["lam"].clone().requires_grad_(True)
    k, s, p, ceil = case["geometry"]
    y = maxent_pool2d(x, lam, k, s, p, bool(ceil))
    gx, gl = torch.autograd.grad(y, (x, lam), torch.ones_like(y))
    return y.detach(), gx, gl


def test_golden_values():
    if os.environ.get("GFGP_ACCEPT") == "1":
        cases = _golden_cases()
        for case in cases:  # expected values come from the loop reference, not from the op
            xr = case["x"].clone().requires_grad_(True)
            lr = case["lam"].clone().requires_grad_(True)
            k, s, p, ceil = case["geometry"]
            yr = reference(xr, lr, (k, k), (s, s), (p, p), bool(ceil))
            gx, gl = torch.autograd.grad(yr, (xr, lr), torch.ones_like(yr))
            case.update(y=yr.detach(), grad_x=gx, grad_lam=gl)
        torch.save(cases, GOLDEN)
    assert GOLDEN.exists(), f"{GOLDEN} is missing; re-run this test with GFGP_ACCEPT=1 to create it"
    assert GOLDEN.stat().st_size < 50_000
    for case in torch.load(GOLDEN, weights_only=True):
        y, gx, gl = _evaluate(case)
        torch.testing.assert_close(y, case["y"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(gx, case["grad_x"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(gl, case["grad_lam"], atol=1e-12, rtol=1e-12)
