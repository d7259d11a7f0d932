"""Strided convs of Conv2d/Conv3d subclasses that override ``forward``: run them at stride 1, exactly.

Libraries build convs as subclasses whose ``forward`` computes more than the conv: TensorFlow's
"SAME" padding from the input size and the stride (timm's ``Conv2dSame``, ``StdConv2dSame``),
a standardized weight, ... When such a forward cannot be traced it stays one ``call_module``
node, and a plain stride-1 copy (:func:`~graph_passes.decompose.stride1_conv`) would not be
exact: the padding it computes depends on the stride. What the forward must end with, though,
is one ``F.conv2d`` / ``F.conv3d`` call at the module's own stride, whose result it returns:
``y = conv(pad(x), w, stride=s)``. Then::

    y == conv(pad(x), w, stride=1)[..., ::s, ::s]

for every input, with ``pad`` computed as before (at stride ``s``). :func:`conv_at_own_stride`
checks that shape of the forward by running it once (on meta tensors: shapes only), and
:func:`at_stride1` makes the copy whose forward runs the class's own forward with that one
conv call at stride 1 (a ``TorchFunctionMode`` rewrites its ``stride`` argument; the module's
``stride`` attribute, which the padding reads, is unchanged). Nothing here knows any library.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple
from torch.overrides import TorchFunctionMode

__all__ = ["AtStride1", "effective_stride", "conv_at_own_stride", "at_stride1"]

# Mapping from a functional conv to its spatial dims (F.conv2d is torch.conv2d).
_CONV_FUNCTIONS: dict[Callable[..., Any], int] = {F.conv2d: 2, F.conv3d: 3}
_STRIDE_ARG = 3  # (input, weight, bias, stride, padding, dilation, groups)


class AtStride1:
    """Marks a module made by :func:`at_stride1`: it runs its one conv at stride 1.

    Its ``stride`` attribute keeps the original stride (the class's own forward reads it to
    compute the padding); the passes treat it as a stride-1 conv (:func:`effective_stride`).
    """


def effective_stride(conv: nn.Module) -> tuple[int, ...]:
    """The stride a conv module computes at: ``conv.stride``, or all 1 for an :class:`AtStride1` copy."""
    stride = tuple(conv.stride)  # type: ignore[arg-type]
    return (1,) * len(stride) if isinstance(conv, AtStride1) else stride


class _ConvCalls(TorchFunctionMode):
    """Counts the conv calls made under it; rewrites those at ``stride`` to stride 1 when ``to_stride1``."""

    def __init__(self, stride: tuple[int, ...], to_stride1: bool) -> None:
        super().__init__()
        self.stride, self.to_stride1 = stride, to_stride1
        self.calls: list[tuple[tuple[int, ...], Tensor]] = []  # (stride of the call, its output)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        dims = _CONV_FUNCTIONS.get(func)
        if dims is None:
            return func(*args, **kwargs)
        in_args = len(args) > _STRIDE_ARG
        stride = tuple(_ntuple(dims)(args[_STRIDE_ARG] if in_args else kwargs.get("stride", 1)))
        if self.to_stride1 and stride == self.stride:
            if in_args:
                args = (*args[:_STRIDE_ARG], (1,) * dims, *args[_STRIDE_ARG + 1:])
            else:
                kwargs["stride"] = (1,) * dims
        out = func(*args, **kwargs)
        self.calls.append((stride, out))
        return out


def _why_not(calls: list[tuple[tuple[int, ...], Tensor]], out: Any, stride: tuple[int, ...]) -> str:
    if len(calls) != 1:
        return f"its forward makes {len(calls)} conv calls, not one"
    if calls[0][0] != stride:
        return f"its conv runs at stride {calls[0][0]}, not at its stride {stride}"
    if out is not calls[0][1]:
        return "its forward does not return its conv's output"
    return ""


def conv_at_own_stride(conv: nn.Module, in_shape: tuple[int, ...]) -> str:
    """``""`` when ``conv``'s forward, on an input of ``in_shape``, makes exactly one conv call,
    at ``conv.stride``, and returns its output; else the reason it does not (one line).

    The forward runs once on meta tensors (the module's parameters and buffers swapped for
    data-less ones: no arithmetic), or, if an op has no meta kernel, on zeros under no_grad.
    """
    stride = tuple(conv.stride)  # type: ignore[arg-type]
    state = {k: torch.empty_like(t, device="meta")
             for k, t in itertools.chain(conv.named_parameters(), conv.named_buffers())}
    for device in ("meta", "cpu"):
        mode = _ConvCalls(stride, to_stride1=False)
        x = torch.zeros(in_shape, device=device)
        try:
            with torch.no_grad(), mode:
                out = (torch.func.functional_call(conv, state, (x,)) if device == "meta" else conv(x))
        except Exception as e:  # noqa: BLE001 - meta tensors have no data: try a real run
            if device == "cpu":
                return f"its forward fails on an input of shape {in_shape}: {type(e).__name__}"
            continue
        return _why_not(mode.calls, out, stride)
    return "unreachable"  # pragma: no cover


# Mapping from a conv subclass to its AtStride1 subclass (one per class, so isinstance still holds).
_AT_STRIDE1: dict[type[nn.Module], type[nn.Module]] = {}


def _at_stride1_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _AT_STRIDE1:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            stride = tuple(self.stride)  # type: ignore[arg-type]
            mode = _ConvCalls(stride, to_stride1=True)
            with mode:
                out = cls.forward(self, *args, **kwargs)
            reason = _why_not(mode.calls, out, stride)
            if reason:  # the check at conversion time saw one conv call; this input took another path
                raise RuntimeError(f"{cls.__name__} was decomposed to stride 1 but for this input {reason}")
            return out

        _AT_STRIDE1[cls] = type(cls.__name__, (AtStride1, cls), {
            "forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__} whose one conv runs at stride 1 (graph_passes.stride1.at_stride1).",
        })
    return _AT_STRIDE1[cls]


def at_stride1(conv: nn.Module) -> nn.Module:
    """A copy of ``conv`` (sharing its Parameters and buffers, same ``state_dict`` keys, an
    instance of its class) whose forward is the class's own with its conv call at stride 1.

    Valid when :func:`conv_at_own_stride` returned ``""`` for it: then ``at_stride1(conv)(x)``
    followed by ``x[..., ::s, ::s]`` (a skip pool of the conv's stride) equals ``conv(x)``. The
    copy raises RuntimeError if an input makes its forward take another path. ``conv`` itself
    is not modified.
    """
    new = copy.copy(conv)
    for key, value in vars(conv).items():  # copy.copy shares the dicts; give the copy its own
        if isinstance(value, dict):
            new.__dict__[key] = copy.copy(value)
    new.__class__ = _at_stride1_class(type(conv))
    return new
