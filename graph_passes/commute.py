"""Which fx nodes commute with spatial subsampling ``x[..., ::s_h, ::s_w]`` (eval mode).

The tables and predicates :func:`graph_passes.move_pools` decides with. Values are 4-D
``(N, C, H, W)`` (SkipPool2d) or 5-D ``(N, C, T, H, W)`` (SkipPool3d, subsampling T as well), so
dims 0 and 1 are batch and channel; a value's rank comes from ShapeProp's ``tensor_meta`` where
a rule needs it (4-D is assumed without it).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from .sites import _has_plain_conv_forward

__all__ = ["Rule", "rule", "size_classes", "SizeClass"]


def _optional_types(*names: str) -> tuple[type, ...]:
    found = []
    for module_name, cls_name in (n.rsplit(".", 1) for n in names):
        try:
            module = __import__(module_name, fromlist=[cls_name])
            found.append(getattr(module, cls_name))
        except (ImportError, AttributeError):  # pragma: no cover - torchvision missing
            pass
    return tuple(found)


# Modules whose eval-mode output at a position depends only on the input at that position (and
# the channel): they commute exactly with spatial subsampling. Matched by exact type, so a
# subclass with its own forward is not trusted.
_POINTWISE_MODULES: frozenset[type] = frozenset(
    (
        nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.Tanh,
        nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.PReLU,
        nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.LogSigmoid,
        nn.RReLU,  # random only in training mode
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,  # identity in eval mode
        nn.Identity,
    )
    # StochasticDepth scales whole samples ((N, 1, 1, 1) noise): it commutes even in training.
    + _optional_types("torchvision.ops.misc.FrozenBatchNorm2d", "torchvision.ops.stochastic_depth.StochasticDepth")
)
# BatchNorm commutes in eval mode only when it normalises with running statistics.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _functions(owner: Any, *names: str) -> set[Callable[..., Any]]:
    return {getattr(owner, n) for n in names if hasattr(owner, n)}


# Functions of one tensor applied elementwise; their other arguments must be constants.
_POINTWISE_FUNCTIONS = (
    _functions(
        torch, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
        "clamp_min", "clamp_max", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square",
        "reciprocal", "erf", "sign", "selu", "celu", "rrelu",
    )
    | _functions(
        F, "relu", "relu_", "relu6", "elu", "elu_", "selu", "celu", "leaky_relu", "leaky_relu_",
        "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "sigmoid",
        "tanh", "softplus", "softsign", "tanhshrink", "logsigmoid", "hardshrink", "softshrink",
        "threshold", "threshold_",
    )
    | {operator.neg, operator.pos, operator.abs}
)
# Dropout functions are the identity only when called with training=False (the default is True).
_DROPOUT_FUNCTIONS = _functions(F, "dropout", "dropout2d", "alpha_dropout", "feature_alpha_dropout")
try:
    from torchvision.ops.stochastic_depth import stochastic_depth as _stochastic_depth

    _POINTWISE_FUNCTIONS.add(_stochastic_depth)  # per-sample noise: commutes in training too
except ImportError:  # pragma: no cover
    pass

_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "neg", "abs", "exp", "sqrt", "rsqrt",
    "square", "reciprocal", "float", "half", "double", "bfloat16", "to", "type", "contiguous",
    "clone", "detach",
}
# Elementwise functions of several operands (broadcasting).
_ELEMENTWISE_FUNCTIONS = _functions(
    operator, "add", "iadd", "sub", "isub", "mul", "imul", "truediv", "itruediv", "pow"
) | _functions(
    torch, "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "maximum",
    "minimum", "pow",
)
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum"}
# Concatenations: they commute when joining along the batch or channel dim (0 or 1).
_CAT_FUNCTIONS = _functions(torch, "cat", "concat", "concatenate")
_CAT_DIMS = {0, 1}
_CONVS = (nn.Conv2d, nn.Conv3d)


def _rank(node: Node, default: int = 4) -> int:
    """The number of dims of ``node``'s value, from ShapeProp's metadata (``default`` without it)."""
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else default


@dataclass(frozen=True)
class Rule:
    """How a node may compute on un-pooled operands: ``mode`` "exact" or "paper" (inexact,
    see move_pools), and ``pending``, the operands that must all carry the same pending pool."""

    mode: str
    pending: tuple[Node, ...]


def _is_pointwise_conv(m: nn.Module) -> bool:
    """1x1 (1x1x1), stride 1, unpadded (any groups, dilation irrelevant): a per-position channel mix."""
    assert isinstance(m, _CONVS)
    dims = len(m.kernel_size)
    padding = (0,) * dims if m.padding in ("valid", "same") else tuple(m.padding)
    return tuple(m.kernel_size) == (1,) * dims and tuple(m.stride) == (1,) * dims and padding == (0,) * dims


def _size_offset(m: nn.Module) -> tuple[int, ...]:
    """Output minus input size of a stride-1 conv: ``2p - d(k-1)`` per dim (0 for 'same')."""
    assert isinstance(m, _CONVS)
    dims = len(m.kernel_size)
    if m.padding == "same":
        return (0,) * dims
    # Convs accept only the strings "same" and "valid": any other string here is "valid".
    padding = (0,) * dims if isinstance(m.padding, str) else tuple(m.padding)
    return tuple(2 * p - d * (k - 1) for p, d, k in zip(padding, m.dilation, m.kernel_size))


def _contains_node(value: Any) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, Node)
        return a

    map_aggregate(value, visit)
    return found


def _is_spatial_constant(node: Node, gm: GraphModule, rank: int = 4) -> bool:
    """A parameter/buffer that cannot vary along H or W (5-D: T, H or W) once broadcast against a
    value of ``rank`` dims."""
    if node.op != "get_attr":
        return False
    value: Any = gm
    for item in str(node.target).split("."):
        value = getattr(value, item, None)
    if isinstance(value, (int, float, bool)):
        return True
    if not isinstance(value, torch.Tensor) or value.dim() > rank:
        return False
    return all(size == 1 for size in value.shape[-(rank - 2):])


def rule(node: Node, gm: GraphModule, modules: dict[str, nn.Module]) -> Rule | None:
    """The condition under which ``node`` may compute on not-yet-pooled inputs, or None.

    Structural only (module types and attributes, call arguments): no shapes are needed.
    """
    args, kwargs = node.args, node.kwargs
    if node.op == "call_module":
        m = modules[str(node.target)]
        if len(args) != 1 or kwargs:
            return None
        (x,) = args
        if not isinstance(x, Node):
            return None
        if type(m) in _POINTWISE_MODULES:
            return Rule("exact", (x,))
        if type(m) in _BATCH_NORMS and m.track_running_stats and m.running_mean is not None:
            return Rule("exact", (x,))
        if isinstance(m, _CONVS) and _has_plain_conv_forward(m) and max(m.stride) == 1:
            if _is_pointwise_conv(m):
                return Rule("exact", (x,))
            if not any(_size_offset(m)):
                return Rule("paper", (x,))
        return None
    if node.op not in ("call_function", "call_method") or not args:
        return None
    target = node.target
    is_fn = node.op == "call_function"
    # The one tensor operand of a unary op (every other argument a constant), else None.
    unary = args[0] if isinstance(args[0], Node) and not _contains_node((args[1:], kwargs)) else None
    if (is_fn and target in _POINTWISE_FUNCTIONS) or (not is_fn and target in _POINTWISE_METHODS):
        return Rule("exact", (unary,)) if unary is not None else None
    if is_fn and target in _DROPOUT_FUNCTIONS:
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        return Rule("exact", (unary,)) if unary is not None and training is False else None
    if (is_fn and target in _ELEMENTWISE_FUNCTIONS) or (not is_fn and target in _ELEMENTWISE_METHODS):
        operands: list[Node] = []
        ok = True

        def visit(a: Any) -> Any:
            nonlocal ok
            if isinstance(a, Node):
                if not _is_spatial_constant(a, gm, _rank(node)) and a not in operands:
                    operands.append(a)
            elif not isinstance(a, (int, float, bool, str, type(None))):
                ok = False  # e.g. a dtype or device: not an arithmetic operand we know
            return a

        map_aggregate((args, kwargs), visit)
        return Rule("exact", tuple(operands)) if ok and operands else None
    if is_fn and target in _CAT_FUNCTIONS:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        if isinstance(dim, int) and dim < 0:
            dim += _rank(node)
        if (
            not isinstance(tensors, (list, tuple))
            or not all(isinstance(t, Node) for t in tensors)
            or dim not in _CAT_DIMS
            or len(args) > 2
            or set(kwargs) - {"dim", "axis", "tensors"}
        ):
            return None
        return Rule("exact", tuple(dict.fromkeys(tensors)))
    return None


# A size class (root node, (dh, dw)) means "the spatial size of root's value plus (dh, dw)" (3-D:
# (dt, dh, dw)): two values of one class have the same spatial size for every input size.
SizeClass = tuple[Any, tuple[int, ...]]


def size_classes(gm: GraphModule, rules: dict[Node, Rule], modules: dict[str, nn.Module]) -> dict[Node, SizeClass]:
    """Size class of every node: same-size ops (those with a rule whose pending operands share a
    class) keep it, stride-1 convs add ``2p - d(k-1)``, anything else starts a class of its own."""
    classes: dict[Node, SizeClass] = {}
    for node in gm.graph.nodes:
        cls: SizeClass = (node, ())
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if (
            isinstance(m, _CONVS) and _has_plain_conv_forward(m) and max(m.stride) == 1
            and node.args and node.args[0] in classes
        ):
            root, offset = classes[node.args[0]]
            step = _size_offset(m)
            total = tuple(a + b for a, b in itertools.zip_longest(offset, step, fillvalue=0))
            cls = (root, total if any(total) else ())  # () is "no offset" for every rank
        elif node in rules:
            operand_classes = {classes[o] for o in rules[node].pending}
            if len(operand_classes) == 1:
                cls = operand_classes.pop()
        classes[node] = cls
    return classes
