"""The fast CPU path of max-entropy pooling: a fused C++ kernel built at first use.

``csrc/maxent_pool_cpu.cpp`` makes one pass over the input per direction (the reference path
materialises the weights of every window several times). One kernel serves both ranks: a 5-D
input ``[N, C, T, H, W]`` (3-D pooling, ``(t, h, w)`` geometry) runs as it is, a 4-D input
``[N, C, H, W]`` as the 5-D problem with ``T = 1`` and a temporal kernel of 1 (the same memory,
no copy). It has no PyTorch headers: it is
compiled with the system C++ compiler (``$CXX``, default ``g++``) in about a second, the first
time it is needed, into a cache directory (``$GFGP_CACHE_DIR``, else ``$XDG_CACHE_HOME/gfgp``,
else ``~/.cache/gfgp``) under a name that hashes the source, the flags, the compiler and the
CPU, so a rebuild happens only when one of them changes (not when the compiler is upgraded or
gains OpenMP: delete the cache directory then); it is loaded with ctypes (which releases
the GIL during the call). Work is split into tasks, (n, c) planes for NCHW/NCDHW input and (n,
channel block) for channels_last/channels_last_3d input, run with OpenMP on ``torch.get_num_threads()`` threads. Built
with g++, the library links ``libgomp.so.1``, which PyTorch's Linux wheels have already loaded,
so the kernel runs on PyTorch's own thread pool: a separate pool would compete with PyTorch's
workers, which spin for a while after each op (that cost about 3 ms per call). ``CXX=clang++``
links LLVM's libomp instead, a second pool. A compiler without OpenMP gives a serial build
(:func:`has_openmp` tells).

If the library cannot be built or loaded (no compiler, say), :func:`build_error` reports it and
the op runs the reference path, after one warning line (:mod:`gfgp_cli.ops.dispatch`).

float32 and float64 run natively; float16 and bfloat16 are computed in float32. The output
(and grad_x) has the memory format of the input, as ``F.max_pool2d``'s and ``F.max_pool3d``'s:
channels_last (4-D) or channels_last_3d (5-D) when the input is in it (and not also contiguous),
else contiguous.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .geometry import pool_output_size

__all__ = ["forward", "backward", "unsupported", "build_error", "library_path", "has_openmp", "build_if_missing",
           "BUILD_ERRORS", "one_line"]

_SOURCE = Path(__file__).with_name("csrc") / "maxent_pool_cpu.cpp"
# -ffp-contract=off: lam * x is rounded before the window maximum is subtracted, so the maximum
# position gets exactly exp(0) = 1, as in the reference path.
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None


def _cache_dir() -> Path:
    if os.environ.get("GFGP_CACHE_DIR"):
        return Path(os.environ["GFGP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gfgp"


def _cpu_id() -> str:
    """What the compiled code depends on besides the source: architecture and CPU features."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def _compiler_flags() -> List[str]:
    # -march=native is safe because the cache key includes the CPU's feature flags.
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    return _FLAGS + native


def library_path() -> Path:
    """Where the compiled library for this source, compiler and CPU is cached."""
    cxx = os.environ.get("CXX", "g++")
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_compiler_flags()).encode(), cxx.encode(), _cpu_id().encode()):
        key.update(part)
    return _cache_dir() / f"maxent_pool_cpu-{key.hexdigest()[:16]}.so"


def _build(target: Path, sources: Sequence[Path] = (_SOURCE,), extra_flags: Sequence[str] = (),
           openmp: bool = True) -> None:
    """Compile ``sources`` into the shared library ``target`` (atomically: built beside it, then
    renamed), with :func:`_compiler_flags` plus ``extra_flags``; ``openmp``: with ``-fopenmp`` when
    the compiler has it, else a serial build."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found; set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # With OpenMP if the compiler has it; else a serial build (every call on the calling thread).
        for extra in (["-fopenmp"], []) if openmp else ([],):
            proc = subprocess.run([cxx, *_compiler_flags(), *extra_flags, *extra, *map(str, sources), "-o", tmp],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["unknown error"])[0]
            raise RuntimeError(f"{cxx} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_if_missing(target: Path, sources: Sequence[Path] = (_SOURCE,), extra_flags: Sequence[str] = (),
                     openmp: bool = True) -> Path:
    """``target``, compiled by :func:`_build` first unless a cached copy exists (its name hashes
    what it is built from); raises what :func:`_build` raises."""
    if not target.exists():
        _build(target, sources, extra_flags, openmp)
    return target


#: What building or loading a library raises when it cannot be done here.
BUILD_ERRORS = (OSError, RuntimeError, subprocess.SubprocessError)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _declare(lib: ctypes.CDLL) -> None:
    p, c_int = ctypes.c_void_p, ctypes.c_int
    lib.gfgp_maxent_has_openmp.argtypes = []
    lib.gfgp_maxent_has_openmp.restype = c_int
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"gfgp_maxent_forward_{suffix}")
        # x, lam, y, geo (18 int64), ls (5 int64), nhwc, threads
        fwd.argtypes = [p, p, p, p, p, c_int, c_int]
        fwd.restype = None
        bwd = getattr(lib, f"gfgp_maxent_backward_{suffix}")
        # x, lam, y, gy, gx, gl, geo, ls, gs (5 int64), per_window, nhwc, threads
        bwd.argtypes = [p, p, p, p, p, p, p, p, p, c_int, c_int, c_int]
        bwd.restype = None


def _library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; None (and the reason) if impossible."""
    global _lib, _lib_error
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                lib = ctypes.CDLL(str(build_if_missing(library_path())))
                _declare(lib)
                _lib = lib
            except BUILD_ERRORS as e:
                _lib_error = one_line(e)
        return _lib


def unsupported(x: Tensor) -> Optional[str]:
    """Why this path does not take ``x`` (None when it does): CPU tensors of every op dtype."""
    if x.device.type != "cpu":
        return f"it runs CPU tensors only, got a {x.device.type} tensor"
    return None


def build_error() -> Optional[str]:
    """Why the kernel library cannot be built or loaded here (None once it is loaded)."""
    return None if _library() is not None else f"the CPU kernel could not be built: {_lib_error}"


def has_openmp() -> bool:
    """Whether the loaded kernel library runs its tasks on OpenMP threads (False: serial build)."""
    lib = _library()
    return lib is not None and bool(lib.gfgp_maxent_has_openmp())


def _channels_last_format(x: Tensor) -> torch.memory_format:
    """The channels-last memory format of x's rank: channels_last (4-D) or channels_last_3d (5-D)."""
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def _is_nhwc(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=_channels_last_format(x)) and not x.is_contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_block(n: int, c: int) -> int:
    """NHWC channels per task: long vector loops, yet at least two tasks per thread when possible.

    Blocks are halved only to make tasks: each window position's channels are read as one run of
    memory, and splitting it costs far more than a loop's length (128 channels as two blocks of
    64: forward 1.15x, backward 1.4x the time), so whole channel ranges are kept when N allows.
    """
    block, threads = min(c, 256), torch.get_num_threads()
    while block > 16 and n * -(-c // block) < 2 * threads:
        block //= 2
    return block


def _check_rank(x: Tensor, kernel, stride, padding) -> None:
    if x.dim() not in (4, 5) or not len(kernel) == len(stride) == len(padding) == x.dim() - 2:
        raise ValueError(f"x must be 4-D with pairs or 5-D with (t, h, w) triples, got a {x.dim()}-D tensor with "
                         f"kernel_size={list(kernel)}, stride={list(stride)}, padding={list(padding)}")


def _geometry(x: Tensor, kernel, stride, padding, ceil_mode) -> Tuple[Tensor, Tuple[int, ...]]:
    """The kernel's geometry array (a 4-D problem as T = 1, kernel 1, stride 1, padding 0) and the output size."""
    _check_rank(x, kernel, stride, padding)
    out = tuple(pool_output_size(size, k, s, p, ceil_mode) for size, k, s, p in zip(x.shape[2:], kernel, stride, padding))
    t, ot, kernel3, stride3, padding3 = 1, 1, [1, *kernel], [1, *stride], [0, *padding]
    if x.dim() == 5:
        t, ot, kernel3, stride3, padding3 = x.shape[2], out[0], list(kernel), list(stride), list(padding)
    n, c, h, w = x.shape[0], x.shape[1], x.shape[-2], x.shape[-1]
    geo = torch.tensor([n, c, t, h, w, ot, *out[-2:], *kernel3, *stride3, *padding3, _channel_block(n, c)],
                       dtype=torch.int64)
    return geo, out


def _strides5(t: Tensor) -> Tensor:
    """t's strides as the kernel reads them, for Tensor[N, C, OT, OH, OW] (a 4-D t gets 0 for OT)."""
    st = list(t.stride())
    return torch.tensor(st if t.dim() == 5 else [st[0], st[1], 0, st[2], st[3]], dtype=torch.int64)


def _per_window(lam: Tensor) -> bool:
    """Whether lam holds one value per output window (else one per (n, c), broadcast)."""
    return any(size != 1 for size in lam.shape[2:])


def _prepare(x: Tensor, lam: Tensor, out) -> Tuple[Tensor, Tensor, Tensor, bool, torch.memory_format]:
    """x in its kernel layout and compute dtype, lam likewise, lam's strides as Tensor[N, C, OT, OH, OW]."""
    nhwc = _is_nhwc(x)
    fmt = _channels_last_format(x) if nhwc else torch.contiguous_format
    ct = _compute_dtype(x.dtype)
    xk = x.to(ct).contiguous(memory_format=fmt)
    lamk = lam.to(ct)
    lamk = lamk.contiguous(memory_format=fmt) if _per_window(lamk) else lamk.contiguous()
    ls = _strides5(lamk.expand(x.shape[0], x.shape[1], *out))
    return xk, lamk, ls, nhwc, fmt


def _fn(kind: str, dtype: torch.dtype):
    return getattr(_library(), f"gfgp_maxent_{kind}_{'f64' if dtype == torch.float64 else 'f32'}")


def forward(x: Tensor, lam: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
            ceil_mode: bool) -> Tensor:
    """y = sum_i p_i x_i per window; Tensor[N, C, *out] in x's dtype and memory format.

    ``x`` is Tensor[N, C, H, W] with pairs or Tensor[N, C, T, H, W] with (t, h, w) triples.
    """
    geo, out = _geometry(x, kernel_size, stride, padding, ceil_mode)
    xk, lamk, ls, nhwc, fmt = _prepare(x, lam, out)
    y = torch.empty((x.shape[0], x.shape[1], *out), dtype=xk.dtype, memory_format=fmt)
    fn = _fn("forward", xk.dtype)
    args = (xk.data_ptr(), lamk.data_ptr(), y.data_ptr(), geo.data_ptr(), ls.data_ptr(), int(nhwc))
    fn(*args, torch.get_num_threads())
    return y.to(x.dtype)


def backward(grad: Tensor, x: Tensor, lam: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
             padding: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx in x's dtype and memory format, dL/dlam of lam's shape), docs/method.md section 1."""
    geo, out_size = _geometry(x, kernel_size, stride, padding, ceil_mode)
    xk, lamk, ls, nhwc, fmt = _prepare(x, lam, out_size)
    ct = xk.dtype
    yk = out.to(ct).contiguous(memory_format=fmt)
    gk = grad.to(ct).contiguous(memory_format=fmt)
    gx = torch.empty_like(xk)
    n, c = x.shape[:2]
    per_window = _per_window(lam)
    if per_window:
        gl = torch.empty((n, c, *out_size), dtype=ct, memory_format=fmt)
        gs = _strides5(gl)
    else:
        gl = torch.empty((n, c), dtype=ct)  # one sum per (n, c) plane
        gs = torch.zeros(5, dtype=torch.int64)
    fn = _fn("backward", ct)
    args = (xk.data_ptr(), lamk.data_ptr(), yk.data_ptr(), gk.data_ptr(), gx.data_ptr(), gl.data_ptr(),
            geo.data_ptr(), ls.data_ptr(), gs.data_ptr(), int(per_window), int(nhwc))
    fn(*args, torch.get_num_threads())
    if not per_window:
        gl = gl.reshape(n, c, *[1] * (x.dim() - 2))
        dims = [d for d in range(2) if lam.shape[d] == 1]
        if dims:
            gl = gl.sum(dim=dims, keepdim=True)
    return gx.to(x.dtype), gl.to(lam.dtype)
