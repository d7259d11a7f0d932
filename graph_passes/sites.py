"""Find the downsampling sites of a traced model: strided convs and strided max/avg pools, 2-D and 3-D."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.utils import _ntuple, _pair, _triple

from ._util import ExampleInput, free_name, owner_of, propagate_shapes
from .same_pool import as_same_pool, same_geometry
from .skip_pool import SkipPool
from .stride1 import conv_at_own_stride, effective_stride

__all__ = ["Site", "find_sites", "is_strided_conv", "is_strided_functional_conv", "pool_kind", "PATCH_EMBED_MIN_STRIDE"]

#: A conv with kernel == stride and stride >= this in both spatial dims (H and W; a 3-D conv's
#: temporal stride may be smaller) is a patch embedding (ViT, Swin, ConvNeXt stems, Swin3D): it
#: tiles the image instead of filtering it, so it is not decomposed.
PATCH_EMBED_MIN_STRIDE = 4


@dataclass(frozen=True)
class Site:
    """One downsampling operation of a graph.

    Attributes:
        node: name of the fx node (stable across the passes, which never rename nodes).
        qualname: module qualified name; for a functional call, the name ``replace_pools``
            gives the module that replaces it (``<owner>.max_pool2d``, see ``find_sites``).
        kind: ``"conv"`` (strided ``nn.Conv2d`` / ``nn.Conv3d``, or ``F.conv2d`` / ``F.conv3d``
            call), ``"max_pool"``, ``"avg_pool"``
            or ``"skip"`` (a :class:`SkipPool2d` / ``SkipPool3d``).
        channels: channels of the downsampled output, from ShapeProp (``Tensor[N, C, H, W]``).
        kernel, stride, padding, dilation: pairs ``(h, w)``, or triples ``(t, h, w)`` for a 3-D
            site (their length is the site's number of spatial dims). For ``"skip"`` the site describes
            the equivalent pool: kernel = stride = s, padding 0, ceil_mode True (``ceil(H / s)``
            outputs, exactly what the skip pool keeps, for every H).
        ceil_mode: output-size rounding of the pool (False for convs).
        count_include_pad: ``nn.AvgPool2d``'s / ``nn.AvgPool3d``'s flag (True elsewhere).
        convert: whether the passes convert this site.
        reason: why not, when ``convert`` is False.
        in_shape, out_shape: shapes seen by ShapeProp for the example input.
        same_padding: a pool module with TensorFlow's "SAME" padding (its forward pads from the
            input size; :mod:`~graph_passes.same_pool`): its replacement must compute
            ``padding`` and ``ceil_mode`` per input (:func:`~graph_passes.same_geometry`);
            ``padding`` and ``ceil_mode`` here are those of the example input.
    """

    node: str
    qualname: str
    kind: str
    channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    ceil_mode: bool = False
    convert: bool = True
    reason: str = ""
    dilation: tuple[int, ...] = (1, 1)
    count_include_pad: bool = True
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    same_padding: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (for JSON and checkpoints)."""
        return dataclasses.asdict(self)


# Mapping from a functional pool to (site kind, its parameter names in call order, spatial dims).
_MAX_POOL_PARAMS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_PARAMS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_FUNCTIONAL_POOLS: dict[Callable[..., Any], tuple[str, tuple[str, ...], int]] = {
    F.max_pool2d: ("max_pool", _MAX_POOL_PARAMS, 2),
    F.max_pool2d_with_indices: ("max_pool", _MAX_POOL_PARAMS, 2),
    torch.max_pool2d: ("max_pool", _MAX_POOL_PARAMS[:-1], 2),
    F.avg_pool2d: ("avg_pool", _AVG_POOL_PARAMS, 2),
    F.max_pool3d: ("max_pool", _MAX_POOL_PARAMS, 3),
    F.max_pool3d_with_indices: ("max_pool", _MAX_POOL_PARAMS, 3),
    torch.max_pool3d: ("max_pool", _MAX_POOL_PARAMS[:-1], 3),
    F.avg_pool3d: ("avg_pool", _AVG_POOL_PARAMS, 3),
}
for _dims in (2, 3):  # the return_indices=False halves of F.max_pool2d/3d's boolean dispatch
    if hasattr(F, f"_max_pool{_dims}d"):
        _FUNCTIONAL_POOLS[getattr(F, f"_max_pool{_dims}d")] = ("max_pool", _MAX_POOL_PARAMS, _dims)
# Mapping from a functional conv to its spatial dims.
_FUNCTIONAL_CONVS: dict[Callable[..., Any], int] = {F.conv2d: 2, F.conv3d: 3}
_CONVS = (nn.Conv2d, nn.Conv3d)
_MAX_POOLS = (nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool2d, nn.AvgPool3d)


def _has_plain_conv_forward(conv: nn.Module) -> bool:
    """False for Conv2d/Conv3d subclasses that compute something else (e.g. input-dependent padding)."""
    cls = type(conv)
    base = next((b for b in _CONVS if isinstance(conv, b)), None)
    return base is not None and cls.forward is base.forward and getattr(cls, "_conv_forward", None) is base._conv_forward


def _has_plain_pool_forward(pool: nn.Module) -> bool:
    """False for max/avg pool subclasses that compute something else (e.g. input-dependent padding)."""
    base = next((b for b in _MAX_POOLS + _AVG_POOLS if isinstance(pool, b)), None)
    return base is not None and type(pool).forward is base.forward


def is_strided_conv(node: Node, modules: dict[str, nn.Module]) -> bool:
    """A ``call_module`` of an ``nn.Conv2d`` or ``nn.Conv3d`` (any groups) with stride > 1 in some dim."""
    if node.op != "call_module":
        return False
    m = modules.get(str(node.target))
    return isinstance(m, _CONVS) and max(effective_stride(m)) > 1


def _functional_stride(node: Node) -> tuple[int, ...] | None:
    """The constant stride of an ``F.conv2d`` / ``F.conv3d`` node; None for other nodes and a stride computed in the graph."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_CONVS:
        return None
    stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
    if isinstance(stride, Node) or (isinstance(stride, (list, tuple)) and any(isinstance(s, Node) for s in stride)):
        return None
    return tuple(_ntuple(_FUNCTIONAL_CONVS[node.target])(stride))


def is_strided_functional_conv(node: Node) -> bool:
    """A ``call_function`` of ``F.conv2d`` / ``F.conv3d`` with a constant stride > 1 in some dim."""
    stride = _functional_stride(node)
    return stride is not None and max(stride) > 1


def pool_kind(node: Node, modules: dict[str, nn.Module]) -> str | None:
    """``"max_pool"``, ``"avg_pool"`` or ``"skip"`` for a 2-D or 3-D pooling node (any stride), else None.

    Adaptive and global pools are not pools here: they have no fixed geometry to convert.
    """
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, _MAX_POOLS):
            return "max_pool"
        if isinstance(m, _AVG_POOLS):
            return "avg_pool"
        if isinstance(m, SkipPool):
            return "skip"
    elif node.op == "call_function" and node.target in _FUNCTIONAL_POOLS:
        return _FUNCTIONAL_POOLS[node.target][0]
    return None


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise ValueError(f"no tensor shape recorded for node={node.format_node() if isinstance(node, Node) else node}")
    return tuple(meta.shape)


def find_sites(
    gm: GraphModule, example_input: ExampleInput | None, include_patch_embed: bool = False
) -> list[Site]:
    """Every downsampling site of ``gm``, in graph order; the graph is not modified.

    Sites: ``nn.Conv2d`` with stride > 1 (grouped and depthwise included), and ``F.conv2d``
    calls with a constant stride > 1 (the forward of a Conv2d subclass traced through, a blur
    pool's fixed filter: :func:`~graph_passes.decompose` runs the call at stride 1); ``nn.MaxPool2d``,
    ``nn.AvgPool2d`` and ``F.max_pool2d`` / ``F.avg_pool2d`` / ``torch.max_pool2d`` calls with
    stride > 1; every skip pool; and the same in 3-D (``nn.Conv3d``, ``nn.MaxPool3d``,
    ``nn.AvgPool3d``, ``F.max_pool3d``, ...), whose geometry is ``(t, h, w)`` triples. Stride-1 and
    adaptive/global pools are not sites.

    Reported but not converted (``convert=False`` and a ``reason``): patch embeddings
    (kernel == stride >= 4 in H and W) unless ``include_patch_embed``; pools with dilation > 1,
    ``return_indices`` or ``divisor_override``; convs whose input is not 4-D (3-D convs: 5-D);
    a conv module whose class overrides the conv's forward, unless that forward makes one conv
    call at the module's stride and returns its output (:func:`~graph_passes.stride1.conv_at_own_stride`:
    e.g. a conv with input-dependent "SAME" padding, kept whole as a leaf); pool modules whose
    class overrides the pool's forward, unless that forward computes TensorFlow's "SAME" pool
    (:func:`~graph_passes.same_pool.as_same_pool`: converted, ``same_padding=True``);
    functional pools with non-constant geometry.

    Channels and shapes come from ``torch.fx`` ShapeProp run once on ``example_input``
    (``node.meta['tensor_meta']``); with ``example_input=None`` the metadata already on the
    graph is used.

    A functional conv's qualname is the module whose forward makes the call (the node's name for
    a call in the root's forward). A functional pool's qualname is the module name ``replace_pools`` will give it:
    ``<owner>.max_pool2d`` / ``<owner>.avg_pool2d`` (3-D: ``max_pool3d``, ...; ``_1``, ``_2``, ... when taken), where
    ``<owner>`` is the module whose forward makes the call (``Mixed_6a.max_pool2d``).
    """
    if example_input is not None:
        propagate_shapes(gm, example_input)
    modules = dict(gm.named_modules())
    taken: set[str] = set()
    sites: list[Site] = []
    for node in gm.graph.nodes:
        site = None
        if node.op == "call_module":
            site = _module_site(node, modules[str(node.target)], include_patch_embed)
        elif node.op == "call_function" and node.target in _FUNCTIONAL_POOLS:
            site = _functional_pool_site(node, gm, taken)
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
            site = _functional_conv_site(node, _FUNCTIONAL_CONVS[node.target], include_patch_embed)
        if site is not None:
            sites.append(site)
    return sites


def _module_site(node: Node, m: nn.Module, include_patch_embed: bool) -> Site | None:
    name, qualname = node.name, str(node.target)
    if isinstance(m, _CONVS):
        if max(effective_stride(m)) == 1:
            return None
        dims = len(m.stride)
        stride, kernel, dilation = tuple(m.stride), tuple(m.kernel_size), tuple(m.dilation)
        padding = (0,) * dims if isinstance(m.padding, str) else _ntuple(dims)(m.padding)
        reason = _conv_reason(kernel, stride, _shape(node.args[0]), include_patch_embed)
        if not reason and not _has_plain_conv_forward(m):
            why = conv_at_own_stride(m, _shape(node.args[0]))
            reason = f"{type(m).__name__} overrides Conv{dims}d.forward and {why}" if why else ""
        out = _shape(node)
        return Site(name, qualname, "conv", out[1], kernel, stride, padding, False, not reason, reason,
                    dilation, True, _shape(node.args[0]), out)
    if isinstance(m, SkipPool):
        out = _shape(node)
        return Site(name, qualname, "skip", out[1], m.stride, m.stride, (0,) * m.dims, True,
                    dilation=(1,) * m.dims, in_shape=_shape(node.args[0]), out_shape=out)
    if isinstance(m, _MAX_POOLS + _AVG_POOLS):
        ntuple = _pair if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) else _triple
        kernel = ntuple(m.kernel_size)
        stride = ntuple(m.stride) if m.stride is not None else kernel
        if max(stride) == 1:
            return None
        if isinstance(m, _MAX_POOLS):
            geometry = dict(dilation=ntuple(m.dilation), return_indices=m.return_indices)
        else:
            geometry = dict(dilation=ntuple(1), count_include_pad=m.count_include_pad,
                            divisor_override=m.divisor_override)
        kind = "max_pool" if isinstance(m, _MAX_POOLS) else "avg_pool"
        site = _pool_site(node, qualname, kind, kernel, stride, ntuple(m.padding), bool(m.ceil_mode), **geometry)
        if site.convert and not _has_plain_pool_forward(m):
            # Its geometry attributes do not describe what it computes: converted only when it is
            # a "SAME" pool, whose padding the replacement computes per input (same_pool.py).
            same = as_same_pool(m, site.in_shape)
            try:
                padding, ceil_mode = same_geometry(site.in_shape[2:], kernel, stride)
            except ValueError as e:
                same = same if isinstance(same, str) else str(e)
            if isinstance(same, str):
                site = dataclasses.replace(site, convert=False, reason=same)
            else:
                site = dataclasses.replace(site, padding=padding, ceil_mode=ceil_mode, same_padding=True,
                                           count_include_pad=same.count_include_pad)
        return site
    return None


def _pool_site(
    node: Node, qualname: str, kind: str, kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], ceil_mode: bool, dilation: tuple[int, ...] = (1, 1),
    return_indices: bool = False, count_include_pad: bool = True, divisor_override: int | None = None,
) -> Site:
    reason = ""
    if max(dilation) > 1:
        reason = f"dilation {dilation} > 1"
    elif return_indices:
        reason = "return_indices=True (the indices have no pooled equivalent)"
    elif divisor_override is not None:
        reason = f"divisor_override={divisor_override}"
    meta = node.meta.get("tensor_meta")
    if meta is not None and not hasattr(meta, "shape"):  # return_indices: the value is (output, indices)
        out = tuple(meta[0].shape)
    else:
        out = _shape(node)
    return Site(node.name, qualname, kind, out[1], kernel, stride, padding, ceil_mode, not reason, reason,
                dilation, count_include_pad, _shape(node.args[0]), out)


def _functional_pool_site(node: Node, gm: GraphModule, taken: set[str]) -> Site | None:
    target = node.target
    if isinstance(target, str):  # a call_function node's target is the function itself
        raise TypeError(f"node {node.name!r}: call_function target is the string {target!r}")
    kind, params, dims = _FUNCTIONAL_POOLS[target]
    ntuple = _ntuple(dims)
    bound = dict(zip(params, node.args))
    bound.update(node.kwargs)
    if node.target in (F.max_pool2d_with_indices, F.max_pool3d_with_indices):
        bound["return_indices"] = True
    constant = all(not isinstance(v, Node) for k, v in bound.items() if k != "input")
    kernel = ntuple(bound["kernel_size"]) if constant else (0,) * dims
    stride_arg = bound.get("stride")
    stride = kernel if stride_arg is None or stride_arg == [] or not constant else ntuple(stride_arg)
    if constant and max(stride) == 1:
        return None
    base = f"{'max' if kind == 'max_pool' else 'avg'}_pool{dims}d"
    qualname = free_name(gm, owner_of(node), base, taken)
    taken.add(qualname)
    if not constant:
        out = _shape(node)
        return Site(node.name, qualname, kind, out[1], kernel, stride, (0,) * dims, False, False,
                    "non-constant geometry arguments", dilation=(1,) * dims, in_shape=_shape(node.args[0]),
                    out_shape=out)
    extra: dict[str, Any] = {}
    if kind == "max_pool":
        extra = dict(dilation=ntuple(bound.get("dilation", 1)), return_indices=bool(bound.get("return_indices", False)))
    else:
        extra = dict(dilation=(1,) * dims, count_include_pad=bool(bound.get("count_include_pad", True)),
                     divisor_override=bound.get("divisor_override"))
    return _pool_site(node, qualname, kind, kernel, stride, ntuple(bound.get("padding", 0)),
                      bool(bound.get("ceil_mode", False)), **extra)


def _conv_reason(kernel: tuple[int, ...], stride: tuple[int, ...], in_shape: tuple[int, ...],
                 include_patch_embed: bool) -> str:
    """Why a strided conv (module or call) is not converted, or ``""``."""
    dims = len(stride)
    if kernel == stride and min(stride[-2:]) >= PATCH_EMBED_MIN_STRIDE and not include_patch_embed:
        return f"patch embedding (kernel == stride == {kernel}); pass include_patch_embed to convert"
    if len(in_shape) != dims + 2:
        return "input is not 4-D (N, C, H, W)" if dims == 2 else "input is not 5-D (N, C, T, H, W)"
    return ""


def _functional_conv_site(node: Node, dims: int, include_patch_embed: bool) -> Site | None:
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)`` with a constant stride > 1.

    Its padding is applied to the input whatever the stride, so the call at stride 1 followed
    by a skip pool computes it exactly (for a computed padding or weight too): converted.
    """
    stride = _functional_stride(node)
    if stride is None or max(stride) == 1:
        return None
    ntuple = _ntuple(dims)
    params = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(params, node.args))
    bound.update(node.kwargs)
    out = _shape(node)
    weight = _shape(bound["weight"]) if isinstance(bound.get("weight"), Node) else (0,) * (dims + 2)
    kernel = tuple(weight[-dims:])
    padding = bound.get("padding", 0)
    padding = (0,) * dims if isinstance(padding, (str, Node)) else ntuple(padding)
    dilation = bound.get("dilation", 1)
    dilation = (1,) * dims if isinstance(dilation, Node) else ntuple(dilation)
    reason = _conv_reason(kernel, stride, _shape(node.args[0]), include_patch_embed)
    return Site(node.name, owner_of(node) or node.name, "conv", out[1], kernel, stride, padding,
                convert=not reason, reason=reason, dilation=dilation, in_shape=_shape(node.args[0]), out_shape=out)
