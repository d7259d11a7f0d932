"""``gfgp bench pool``: maxent_pool2d/3d against F.max_pool2d/3d and F.avg_pool2d/3d, side by side.

A case is 2-D (shape (N, C, H, W): maxent_pool2d, max_pool2d, avg_pool2d) or 3-D (shape
(N, C, T, H, W): maxent_pool3d, max_pool3d, avg_pool3d). For each case (shape and geometry) and
memory layout, every contender is timed interleaved in one process
(:func:`~gfgp_cli.bench.timing.interleaved_medians`):

- forward: inference (inputs do not require grad);
- forward+backward: inputs require grad, then ``torch.autograd.grad`` of the output with a fixed
  upstream gradient (no ``.grad`` accumulation);
- saved bytes: what autograd keeps for backward (unique storages, inputs included).

The maxent op gets lam of shape (N, C, 1, 1) (3-D: (N, C, 1, 1, 1)), uniform in (0, 1): what
GFGP's sigmoid produces. Ratios are to F.max_pool2d (3-D: F.max_pool3d) on the same case and
layout. The layout ``channels_last`` is torch.channels_last for 2-D cases and
torch.channels_last_3d for 3-D ones.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..ops import maxent_pool2d, maxent_pool3d
from ..ops.dispatch import resolve, use_implementation
from .timing import describe_device, device_sync, interleaved_medians, resolve_device, saved_tensor_bytes

__all__ = ["PoolCase", "DEFAULT_CASES", "DEFAULT_CASES_3D", "default_cases", "parse_case", "bench_pool"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# A kernel, stride or padding: one int for every spatial dim, or one int per dim ((h, w) or (t, h, w)).
_Geometry = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class PoolCase:
    """One benchmark input: shape (N, C, H, W) or (N, C, T, H, W) and its pooling geometry.

    ``kernel``, ``stride`` and ``padding`` are an int (the same in every spatial dim) or a tuple
    with one int per spatial dim.
    """

    shape: Tuple[int, ...]
    kernel: _Geometry
    stride: _Geometry
    padding: _Geometry = 0

    @property
    def dims(self) -> int:
        """2 for 2-D pooling (shape (N, C, H, W)), 3 for 3-D pooling (shape (N, C, T, H, W))."""
        return len(self.shape) - 2

    @property
    def name(self) -> str:
        def text(v: _Geometry) -> str:
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)

        s = "x".join(map(str, self.shape)) + f" k{text(self.kernel)} s{text(self.stride)}"
        return s + (f" p{text(self.padding)}" if self.padding not in (0, (0,) * self.dims) else "")


# The two reference cases of issue 2: a ResNet-50 skip pool and the stem pool.
DEFAULT_CASES = (PoolCase((16, 256, 56, 56), 2, 2), PoolCase((16, 64, 112, 112), 3, 2, 1))
# Video: a frame-wise (spatial only) pool of an early stage and a space-time pool of a later one.
DEFAULT_CASES_3D = (PoolCase((8, 64, 16, 56, 56), (1, 2, 2), (1, 2, 2)), PoolCase((8, 128, 8, 28, 28), 2, 2))

_INTS = r"\d+(?:x\d+)*"
_CASE_RE = re.compile(rf"^(\d+(?:x\d+){{3,4}}):k({_INTS}):s({_INTS})(?::p({_INTS}))?$")
_CASE_SYNTAX = ("case must look like NxCxHxW:kK:sS[:pP] or NxCxTxHxW:kK:sS[:pP], K, S and P an int or one per "
                "spatial dim (e.g. 16x64x112x112:k3:s2:p1, 8x64x16x56x56:k1x2x2:s1x2x2)")


def parse_case(spec: str) -> PoolCase:
    """Parse ``NxCxHxW:kK:sS[:pP]`` (2-D) or ``NxCxTxHxW:kK:sS[:pP]`` (3-D).

    K, S and P are an int or one int per spatial dim joined by ``x`` (``(t, h, w)`` for 3-D), e.g.
    ``16x256x56x56:k2:s2``, ``16x64x112x112:k3:s2:p1`` or ``8x64x16x56x56:k1x2x2:s1x2x2``.
    """
    m = _CASE_RE.match(spec.strip())
    if not m:
        raise ValueError(f"{_CASE_SYNTAX}, got {spec!r}")
    shape = tuple(int(v) for v in m.group(1).split("x"))
    dims = len(shape) - 2
    if min(shape) < 1:
        raise ValueError(f"case {spec!r}: every dimension must be >= 1")

    def geometry(text: Optional[str], what: str) -> _Geometry:
        if text is None:
            return 0
        values = tuple(int(v) for v in text.split("x"))
        if len(values) == 1:
            return values[0]
        if len(values) != dims:
            raise ValueError(f"case {spec!r}: {what} needs 1 or {dims} values for a {len(shape)}-D shape, got {text}")
        return values

    kernel, stride, padding = (geometry(m.group(i), what) for i, what in ((2, "k"), (3, "s"), (4, "p")))
    from ..ops import check_pool_geometry

    k, _, p = check_pool_geometry(kernel, stride, padding, dims=dims)
    if any(size + 2 * p_ < k_ for size, k_, p_ in zip(shape[2:], k, p)):
        spatial = "x".join(map(str, shape[2:]))
        raise ValueError(f"case {spec!r}: the kernel {_text(k)} does not fit the {spatial} input with padding {_text(p)}")
    return PoolCase(shape, kernel, stride, padding)


def _text(values: Tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _contenders(case: PoolCase, implementations: Sequence[str]
                ) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Mapping from contender name to ``fn(x, lam) -> output`` (the ops of the case's rank)."""
    k, s, p = case.kernel, case.stride, case.padding
    maxent_op = maxent_pool3d if case.dims == 3 else maxent_pool2d
    max_pool = F.max_pool3d if case.dims == 3 else F.max_pool2d
    avg_pool = F.avg_pool3d if case.dims == 3 else F.avg_pool2d
    base = f"maxent_pool{case.dims}d"

    def maxent(impl: str):
        def fn(x_, lam_):
            with use_implementation(impl):
                return maxent_op(x_, lam_, k, s, p)
        return fn

    fns = {}
    for impl in implementations:
        fns[base if impl == "auto" else f"{base}[{impl}]"] = maxent(impl)
    fns[f"max_pool{case.dims}d"] = lambda x_, lam_: max_pool(x_, k, s, p)
    fns[f"avg_pool{case.dims}d"] = lambda x_, lam_: avg_pool(x_, k, s, p)
    return fns


def _implementation(contender: str, x: torch.Tensor) -> Optional[str]:
    """The maxent op implementation a contender runs (None for the torch pools)."""
    if not contender.startswith("maxent_pool"):
        return None
    forced = contender[contender.index("[") + 1:-1] if contender.endswith("]") else "auto"
    with use_implementation(forced):
        return resolve(x)


def default_cases(dims: int) -> Tuple[PoolCase, ...]:
    """The cases ``bench_pool`` runs when given none: :data:`DEFAULT_CASES` (2-D) or :data:`DEFAULT_CASES_3D`."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    return DEFAULT_CASES_3D if dims == 3 else DEFAULT_CASES


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
    dims: Optional[int] = None,
) -> dict:
    """Time maxent_pool2d/3d, F.max_pool2d/3d and F.avg_pool2d/3d side by side; return a JSON-able dict.

    Each case runs the ops of its rank (2-D for shape (N, C, H, W), 3-D for (N, C, T, H, W)).
    Without ``cases``, the default cases of ``dims`` (default 2) run; with both, every case must
    have ``dims`` spatial dims. ``implementations`` lists the maxent op paths to time
    (``"auto"``: what the op picks for the device; see :mod:`gfgp_cli.ops.dispatch`). With
    ``channels_last`` every case is also run on a channels_last (3-D: channels_last_3d) copy of
    its input. Rows hold milliseconds (medians), the ratios to max_pool2d/3d and the bytes saved
    for backward.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if cases:
        wrong = [c.name for c in cases if dims is not None and c.dims != dims]
        if wrong:
            raise ValueError(f"--dims {dims} needs cases with {dims} spatial dims, got {', '.join(wrong)}")
    cases = tuple(cases) if cases else default_cases(2 if dims is None else dims)
    dev = resolve_device(device)
    torch_dtype = _DTYPES[dtype]
    sync = device_sync(dev)
    gen = torch.Generator().manual_seed(seed)
    rows: List[dict] = []
    for case in cases:
        n, c = case.shape[:2]
        x0 = torch.randn(case.shape, generator=gen).to(dev, torch_dtype)
        lam0 = torch.rand((n, c, *[1] * case.dims), generator=gen).to(dev, torch_dtype)
        layouts = [("contiguous", torch.contiguous_format)]
        if channels_last:
            layouts.append(("channels_last", torch.channels_last_3d if case.dims == 3 else torch.channels_last))
        for layout, memory_format in layouts:
            x = x0.contiguous(memory_format=memory_format)
            xg, lamg = x.detach().requires_grad_(), lam0.detach().requires_grad_()
            fns = _contenders(case, implementations)
            max_name, avg_name = f"max_pool{case.dims}d", f"avg_pool{case.dims}d"
            out_shape = fns[avg_name](x, lam0).shape
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
                    "forward_ratio": fwd_t[name] / fwd_t[max_name],
                    "forward_backward_ms": train_t[name] * 1e3,
                    "forward_backward_ratio": train_t[name] / train_t[max_name],
                    "saved_bytes": saved[name],
                    "input_bytes": x.numel() * x.element_size(),
                })
    return {
        "device": describe_device(dev), "dtype": dtype, "repeats": repeats,
        "cases": [asdict(c) | {"name": c.name, "dims": c.dims} for c in cases], "rows": rows,
    }
