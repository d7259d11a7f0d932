"""An onnxruntime custom-op library that runs gfgp's pools as one fused kernel (``--ort-kernel``).

An exported file holds each max-entropy pool as one ``gfgp::MaxEntPool2d`` /
``gfgp::MaxEntPool3d`` node with a model-local function body of standard ops
(:mod:`gfgp_cli.export.maxent_function`), so that a stock onnxruntime runs it with no plugin. That
body costs several times the eager op's fused C++ kernel. This module builds a shared library,
``csrc/ort_maxent_op.cpp`` compiled together with the eager kernel
(``gfgp_cli/ops/csrc/maxent_pool_cpu.cpp``), that implements both ops of domain ``gfgp``
(version 1, every lam shape the node takes; float32 and float64, and float16 and bfloat16
computed in float32 as the eager op does) for onnxruntime's CPU execution provider. A session
that registers it runs every gfgp node as that kernel instead of the body; the file is unchanged
and still runs everywhere without it. The kernel splits each pool into (n, c) planes and runs them on onnxruntime's own intra-op thread pool
(``KernelContext_ParallelFor``), not on OpenMP. It needs onnxruntime >= 1.17 (C API version 17)
and no onnxruntime headers or libraries to build: the library declares the few C ABI entries it
uses itself.

The library is compiled with the system C++ compiler (``$CXX``, default ``g++``) on first use,
into the cache directory of :mod:`gfgp_cli.ops.cpu` (``$GFGP_CACHE_DIR``, else
``$XDG_CACHE_HOME/gfgp``, else ``~/.cache/gfgp``) under a name that hashes both sources, the
flags, the compiler and the CPU (``-march=native``: build it on, or for, the CPU that runs it; on
a CPU without the instruction sets it was built for, its registration fails with one line naming
the missing one, checked by code built for the baseline x86-64 set, instead of an illegal
instruction).

Python, with gfgp installed::

    from gfgp_cli.export import ort_kernel
    options = onnxruntime.SessionOptions()
    ort_kernel.register(options)           # or options.register_custom_ops_library(path)
    session = onnxruntime.InferenceSession("model.onnx", options, providers=["CPUExecutionProvider"])

A deployment engineer takes the ``.so`` that :func:`library_path` names (``python -c "from
gfgp_cli.export import ort_kernel; print(ort_kernel.library_path())"`` builds it), or builds it
with the command at the top of ``ort_maxent_op.cpp``, ships it beside the model and loads it in
their own onnxruntime: C++ ``Ort::SessionOptions::RegisterCustomOpsLibrary(ORT_TSTR("libgfgp_ort.so"))``
(or the C API's ``RegisterCustomOpsLibrary_V2``), Python
``SessionOptions.register_custom_ops_library("libgfgp_ort.so")``. The library exports one symbol,
``RegisterCustomOps``, and depends only on the C++ runtime (no OpenMP, no onnxruntime library).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Optional

from ..ops import cpu

__all__ = ["library_path", "build_error", "register", "SOURCE"]

#: The custom-op library's own source; the kernel source (``cpu._SOURCE``) is compiled with it.
SOURCE = Path(__file__).with_name("csrc") / "ort_maxent_op.cpp"
# Only RegisterCustomOps is exported: the kernel's extern "C" entries stay private to the library,
# so they cannot clash with the ctypes-loaded eager kernel or anything else in the process.
_EXTRA_FLAGS = ["-fvisibility=hidden"]

_lock = threading.Lock()
_built: Optional[Path] = None
_error: Optional[str] = None


def _sources():
    return (SOURCE, cpu._SOURCE)


def _target() -> Path:
    """Where the compiled library for these sources, flags, compiler and CPU is cached."""
    cxx = os.environ.get("CXX", "g++")
    key = hashlib.sha256()
    for src in _sources():
        key.update(src.read_bytes())
    for part in (" ".join(cpu._compiler_flags() + _EXTRA_FLAGS), cxx, cpu._cpu_id()):
        key.update(part.encode())
    return cpu._cache_dir() / f"ort_maxent_op-{key.hexdigest()[:16]}.so"


def _ensure_built() -> Optional[Path]:
    """The built library (building it on first use), or None with the reason in ``_error``."""
    global _built, _error
    with _lock:
        if _built is None and _error is None:
            try:  # without OpenMP: the tasks run on onnxruntime's thread pool
                _built = cpu.build_if_missing(_target(), _sources(), _EXTRA_FLAGS, openmp=False)
            except cpu.BUILD_ERRORS as e:
                _error = cpu.one_line(e)
        return _built


def library_path() -> Path:
    """The path of the compiled library, building it on first use (cached across processes).

    Raises RuntimeError (one line) when it cannot be built (no compiler, a compile error).
    """
    path = _ensure_built()
    if path is None:
        raise RuntimeError(build_error())
    return path


def build_error() -> Optional[str]:
    """Why the library cannot be built here (None once it is built); builds it on first use."""
    return None if _ensure_built() is not None else f"the onnxruntime kernel library could not be built: {_error}"


def register(options) -> Path:
    """Register the library on ``options`` (an ``onnxruntime.SessionOptions``); returns its path.

    Sessions made with ``options`` then run every ``gfgp::MaxEntPool2d``/``MaxEntPool3d`` node on
    the CPU provider as the fused kernel. Raises RuntimeError (one line) when the library cannot
    be built or onnxruntime refuses it.
    """
    path = library_path()
    try:
        options.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own exception types (e.g. an onnxruntime older than 1.17)
        message = " ".join(str(e).split()) or type(e).__name__
        raise RuntimeError(f"onnxruntime could not load the gfgp kernel library {path}: {message}") from None
    return path
