"""Which kernels run ``gfgp::maxent_pool2d`` / ``gfgp::maxent_pool3d`` and their backward: the dispatch of the ops.

Implementations: each a module with ``forward(x, lam, kernel, stride, padding, ceil_mode)``,
``backward(grad, x, lam, out, kernel, stride, padding, ceil_mode)``, ``unsupported(x)`` (why it
does not take such a tensor, or None) and ``build_error()`` (why it cannot be built or loaded in
this process, or None):

- ``reference``: :mod:`gfgp_cli.ops.reference`, plain PyTorch on any device; defines the semantics.
- ``cpu``: :mod:`gfgp_cli.ops.cpu`, the fast path for CPU tensors (a fused C++ kernel, compiled
  in about a second at first use and cached; nothing is compiled at install time).
- ``triton``: :mod:`gfgp_cli.ops.triton`, fused kernels for CUDA tensors (Triton, imported lazily).

``auto`` (the default) picks ``cpu`` for CPU tensors, ``triton`` for CUDA tensors and
``reference`` elsewhere. A fast path that cannot be loaded or built warns once, in one line, and
the op falls back to ``reference``. :func:`use_implementation` forces one implementation inside
a ``with`` block (tests and benchmarks); the choice made at forward time also runs the backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import warnings
from types import ModuleType
from typing import Dict, Iterator

from torch import Tensor

__all__ = ["IMPLEMENTATIONS", "use_implementation", "current_implementation", "resolve", "select", "mark_broken"]

# Mapping from implementation name to the module that holds its kernels (imported on first use).
IMPLEMENTATIONS: Dict[str, str] = {
    "reference": "gfgp_cli.ops.reference",
    "cpu": "gfgp_cli.ops.cpu",
    "triton": "gfgp_cli.ops.triton",
}
# Mapping from device type to the implementation ``auto`` picks for it.
_AUTO: Dict[str, str] = {"cpu": "cpu", "cuda": "triton"}

_forced: contextvars.ContextVar[str] = contextvars.ContextVar("gfgp_maxent_implementation", default="auto")
# Mapping from implementation name to the one-line reason it cannot run here (set once).
_broken: Dict[str, str] = {}


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Run ``maxent_pool2d`` and ``maxent_pool3d`` (forward and backward) with one implementation inside the block.

    ``name`` is ``"auto"`` or one of :data:`IMPLEMENTATIONS`. A forced implementation that does
    not support the tensors it meets raises instead of falling back.
    """
    if name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be 'auto' or one of {sorted(IMPLEMENTATIONS)}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current_implementation() -> str:
    """The name set by the innermost :func:`use_implementation` (``"auto"`` outside any)."""
    return _forced.get()


def mark_broken(name: str, reason: str) -> None:
    """Record that ``name`` cannot run in this process; warn once, in one line."""
    if name not in _broken:
        _broken[name] = reason
        warnings.warn(f"gfgp: max-entropy pooling {name} path unavailable ({reason}); using the reference path",
                      RuntimeWarning, stacklevel=3)


def _load(name: str) -> ModuleType:
    return importlib.import_module(IMPLEMENTATIONS[name])


def resolve(x: Tensor) -> str:
    """The name of the implementation that runs the op for input ``x`` under the current setting.

    Each implementation module has ``unsupported(x)`` (why it does not take such tensors: not an
    error, ``auto`` just looks further) and ``build_error()`` (why it cannot be built or loaded
    here: ``auto`` warns once and falls back to ``reference``).
    """
    forced = _forced.get()
    if forced != "auto":
        module = _load(forced)
        reason = module.unsupported(x) or module.build_error()
        if reason:
            raise ValueError(f"maxent_pool2d implementation {forced!r} cannot run here: {reason}")
        return forced
    name = _AUTO.get(x.device.type, "reference")
    if name != "reference" and name not in _broken:
        module = _load(name)
        if module.unsupported(x) is None:
            reason = module.build_error()
            if reason is None:
                return name
            mark_broken(name, reason)
    return "reference"


def select(x: Tensor) -> ModuleType:
    """The kernel module that runs the op for input ``x`` under the current setting."""
    return _load(resolve(x))
