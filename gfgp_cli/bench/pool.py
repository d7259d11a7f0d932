"""``gfgp bench pool``: maxent_pool2d against F.max_pool2d and F.avg_pool2d, side by side.

For each case (shape and geometry) and memory layout, every contender is timed interleaved in
one process (:func:`~gfgp_cli.bench.timing.interleaved_medians`):

- forward: inference (inputs do not require grad);
- forward+backward: inputs require grad, then ``torch.autograd.grad`` of the output with a fixed
  upstream gradient (no ``.grad`` accumulation);
- saved bytes: what autograd keeps for backward (unique storages, inputs included).

maxent_pool2d gets lam of shape (N, C, 1, 1), uniform in (0, 1): what GFGP's sigmoid produces.
Ratios are to F.max_pool2d on the same case and layout.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..ops import maxent_pool2d
from ..ops.dispatch import resolve, use_implementation
from .timing import describe_device, device_sync, interleaved_medians, resolve_device, saved_tensor_bytes

__all__ = ["PoolCase", "DEFAULT_CASES", "parse_case", "bench_pool"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class PoolCase:
    """One benchmark input: shape (N, C, H, W) and pooling geometry (square kernel/stride/padding)."""

    shape: Tuple[int, int, int, int]
    kernel: int
    stride: int
    padding: int = 0

    @property
    def name(self) -> str:
        s = "x".join(map(str, self.shape)) + f" k{self.kernel} s{self.stride}"
        return s + (f" p{self.padding}" if self.padding else "")


# The two reference cases of issue 2: a ResNet-50 skip pool and the stem pool.
DEFAULT_CASES = (PoolCase((16, 256, 56, 56), 2, 2), PoolCase((16, 64, 112, 112), 3, 2, 1))

_CASE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+):k(\d+):s(\d+)(?::p(\d+))?$")


def parse_case(spec: str) -> PoolCase:
    """Parse ``NxCxHxW:kK:sS[:pP]``, e.g. ``16x256x56x56:k2:s2`` or ``16x64x112x112:k3:s2:p1``."""
    m = _CASE_RE.match(spec.strip())
    if not m:
        raise ValueError(f"case must look like NxCxHxW:kK:sS[:pP] (e.g. 16x64x112x112:k3:s2:p1), got {spec!r}")
    n, c, h, w, k, s, p = (int(v) if v is not None else 0 for v in m.groups())
    if min(n, c, h, w) < 1:
        raise ValueError(f"case {spec!r}: every dimension must be >= 1")
    from ..ops import check_pool_geometry

    check_pool_geometry(k, s, p)
    if h + 2 * p < k or w + 2 * p < k:
        raise ValueError(f"case {spec!r}: the kernel {k} does not fit the {h}x{w} input with padding {p}")
    return PoolCase((n, c, h, w), k, s, p)


def _contenders(case: PoolCase, implementations: Sequence[str]
                ) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Mapping from contender name to ``fn(x, lam) -> output``."""
    k, s, p = case.kernel, case.stride, case.padding

    def maxent(impl: str):
        def fn(x_, lam_):
            with use_implementation(impl):
                return maxent_pool2d(x_, lam_, k, s, p)
        return fn

    fns = {}
    for impl in implementations:
        fns["maxent_pool2d" if impl == "auto" else f"maxent_pool2d[{impl}]"] = maxent(impl)
    fns["max_pool2d"] = lambda x_, lam_: F.max_pool2d(x_, k, s, p)
    fns["avg_pool2d"] = lambda x_, lam_: F.avg_pool2d(x_, k, s, p)
    return fns


def _implementation(contender: str, x: torch.Tensor) -> Optional[str]:
    """The maxent_pool2d implementation a contender runs (None for the torch pools)."""
    if not contender.startswith("maxent_pool2d"):
        return None
    forced = contender[len("maxent_pool2d["):-1] if contender.endswith("]") else "auto"
    with use_implementation(forced):
        return resolve(x)


def _train_step(fn, x: torch.Tensor, lam: torch.Tensor, grad_out: torch.Tensor, uses_lam: bool):
    """forward + backward of one contender, with gradients w.r.t. x (and lam when it is used).

    maxent contenders force their implementation for the forward; the op runs the backward with
    the implementation recorded at forward time (gfgp_cli.ops.dispatch).
    """
    inputs = (x, lam) if uses_lam else (x,)
    return lambda: torch.autograd.grad(fn(x, lam), inputs, grad_out)


def bench_pool(
    device: str = "cpu",
    repeats: int = 10,
    dtype: str = "float32",
    cases: Optional[Sequence[PoolCase]] = None,
    channels_last: bool = True,
    implementations: Sequence[str] = ("auto", "reference"),
    seed: int = 0,
) -> dict:
    """Time maxent_pool2d, F.max_pool2d and F.avg_pool2d side by side; return a JSON-able dict.

    ``implementations`` lists the maxent_pool2d paths to time (``"auto"``: what the op picks
    for the device; see :mod:`gfgp_cli.ops.dispatch`). With ``channels_last`` every case is
    also run on a channels_last copy of its input. Rows hold milliseconds (medians), the
    ratios to max_pool2d and the bytes saved for backward.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = resolve_device(device)
    torch_dtype = _DTYPES[dtype]
    sync = device_sync(dev)
    gen = torch.Generator().manual_seed(seed)
    rows: List[dict] = []
    for case in cases or DEFAULT_CASES:
        n, c = case.shape[:2]
        x0 = torch.randn(case.shape, generator=gen).to(dev, torch_dtype)
        lam0 = torch.rand((n, c, 1, 1), generator=gen).to(dev, torch_dtype)
        layouts = [("contiguous", torch.contiguous_format)]
        if channels_last:
            layouts.append(("channels_last", torch.channels_last))
        for layout, memory_format in layouts:
            x = x0.contiguous(memory_format=memory_format)
            xg, lamg = x.detach().requires_grad_(), lam0.detach().requires_grad_()
            fns = _contenders(case, implementations)
            out_shape = fns["avg_pool2d"](x, lam0).shape
            grad_out = torch.randn(out_shape, generator=gen).to(dev, torch_dtype).contiguous(
                memory_format=memory_format)
            uses_lam = {name: name.startswith("maxent") for name in fns}
            fwd = {name: (lambda f=f, x=x, lam0=lam0: f(x, lam0)) for name, f in fns.items()}
            train = {name: _train_step(f, xg, lamg, grad_out, uses_lam[name]) for name, f in fns.items()}
            with torch.no_grad():
                fwd_t = interleaved_medians(fwd, repeats, sync=sync)
            train_t = interleaved_medians(train, repeats, sync=sync)
            saved = {name: saved_tensor_bytes(lambda f=f, xg=xg, lamg=lamg: f(xg, lamg)) for name, f in fns.items()}
            for name in fns:
                rows.append({
                    "case": case.name, "layout": layout, "op": name,
                    "implementation": _implementation(name, x),
                    "forward_ms": fwd_t[name] * 1e3,
                    "forward_ratio": fwd_t[name] / fwd_t["max_pool2d"],
                    "forward_backward_ms": train_t[name] * 1e3,
                    "forward_backward_ratio": train_t[name] / train_t["max_pool2d"],
                    "saved_bytes": saved[name],
                    "input_bytes": x.numel() * x.element_size(),
                })
    return {
        "device": describe_device(dev), "dtype": dtype, "repeats": repeats,
        "cases": [asdict(c) | {"name": c.name} for c in (cases or DEFAULT_CASES)], "rows": rows,
    }
