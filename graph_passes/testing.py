"""Checks for code that uses the passes (like ``torch.testing``): is a conversion exact?"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from ._util import input_node
from .skip_pool import SkipPool

__all__ = ["randomize_norms", "skip_pools", "assert_same_function", "max_relative_error"]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, in place.

    With the defaults (mean 0, var 1, weight 1, bias 0) an eval-mode BN is nearly the identity,
    so a pool moved past a BN it must not pass would go unnoticed. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            # running_mean and running_var are both set or both None (track_running_stats).
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def skip_pools(gm: GraphModule) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The skip pools of ``gm`` in graph order: ``{qualname: (name of the pooled node, stride)}``."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        pool = gm.get_submodule(str(n.target))
        if isinstance(pool, SkipPool):
            found[str(n.target)] = (input_node(n).name, pool.stride)
    return found


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (the max abs diff in units of the output scale)."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


def assert_same_function(
    model: nn.Module,
    converted: nn.Module,
    sizes: Iterable[int | tuple[int, int]],
    channels: int = 3,
    batch: int = 2,
    rtol: float = 1e-4,
) -> None:
    """Assert ``converted(x) == model(x)`` in eval mode for a random input of every size given.

    Shapes must match exactly and values within ``rtol`` of the output scale
    (:func:`max_relative_error`). Both modules are put in eval mode.
    """
    model.eval()
    converted.eval()
    for size in sizes:
        h, w = (size, size) if isinstance(size, int) else size
        x = torch.randn(batch, channels, h, w)
        with torch.no_grad():
            expected, actual = model(x), converted(x)
        if actual.shape != expected.shape:
            raise AssertionError(f"input {h}x{w}: output shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        err = max_relative_error(actual, expected)
        if not err <= rtol:
            raise AssertionError(f"input {h}x{w}: max abs diff is {err:.3g} x output scale (> {rtol:g})")
