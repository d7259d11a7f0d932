"""Decompose strided convolutions into a stride-1 convolution followed by a skip pool."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Union

from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.utils import _ntuple

from ._util import finish, free_name, owner_of, reroute_uses, set_submodule
from .sites import _FUNCTIONAL_CONVS, Site, _has_plain_conv_forward
from .skip_pool import skip_pool
from .stride1 import at_stride1

__all__ = ["decompose", "stride1_conv"]

_Conv = Union[nn.Conv2d, nn.Conv3d]


def stride1_conv(conv: _Conv) -> _Conv:
    """A new module equal to ``conv`` except stride 1 (``(1, 1)``, 3-D ``(1, 1, 1)``), sharing its Parameters.

    ``conv`` itself is not modified (a traced GraphModule shares its leaves with the model it was
    traced from). Weights, bias, padding, padding_mode, dilation, groups, hooks and any extra
    attributes of a subclass carry over; the new module's ``state_dict`` has the same keys.
    A subclass that overrides the conv's forward (input-dependent padding, a standardized
    weight) gets :func:`~graph_passes.stride1.at_stride1` instead: its own forward, whose one
    conv call runs at stride 1 while the padding is computed for its stride as before.
    """
    if not _has_plain_conv_forward(conv):
        return at_stride1(conv)  # type: ignore[return-value]
    new = copy.copy(conv)
    # copy.copy shares the instance's dicts; give the new module its own (same Parameter objects).
    for key, value in vars(conv).items():
        if isinstance(value, dict):  # _parameters, _buffers, _modules, hook tables
            new.__dict__[key] = copy.copy(value)
    new.stride = (1,) * len(conv.stride)
    return new


def decompose(gm: GraphModule, sites: Iterable[Site]) -> GraphModule:
    """Replace every converting strided-conv site by the conv at stride 1 and a skip pool.

    Invariant: the output is unchanged for every input size. A conv with stride ``s``, kernel
    ``k``, dilation ``d`` and padding ``p`` gives ``floor((H + 2p - d(k-1) - 1) / s) + 1`` rows;
    at stride 1 it gives ``H' = H + 2p - d(k-1)`` rows, of which ``SkipPool2d(s)`` keeps rows
    ``0, s, 2s, ...``, i.e. ``ceil(H' / s) = floor((H' - 1) / s) + 1`` of them: the same rows with
    the same values (per dim: an ``nn.Conv3d`` gets a ``SkipPool3d``). Padding (any ``padding_mode``) is applied to the input before the
    convolution in both cases, so it does not interact with the stride.

    Graph before / after (``layer2.0.conv2`` is a 3x3 stride-2 conv)::

        conv2 = layer2.0.conv2(relu)             conv2 = layer2.0.conv2(relu)   # stride (1, 1)
        bn2 = layer2.0.bn2(conv2)         ->     layer2_0_pool = layer2.0.pool(conv2)  # SkipPool2d(2)
                                                 bn2 = layer2.0.bn2(layer2_0_pool)

    The conv keeps its qualname and Parameters (a new module sharing them is installed: the
    original module is not modified). The skip pool is named ``<owner>.pool`` (``pool1``,
    ``pool2``, ... when taken), ``<owner>`` being the module that contains the conv. Sites with
    ``kind != "conv"`` or ``convert=False`` are ignored.

    A functional conv site (``F.conv2d`` / ``F.conv3d``, e.g. inside a Conv2d subclass's forward
    that was traced through) is decomposed in the graph: the call's ``stride`` argument becomes
    1 and a skip pool follows it (named ``<owner>.pool`` as above). Its padding is applied to
    the call's input whatever the stride, so the invariant holds as for a module.

    Raises:
        ValueError: a site does not match the graph, or a conv module is called from several
            places and only some of them are listed.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    # Mapping from conv module qualname to the call sites to decompose.
    calls: dict[str, list[Node]] = {}
    convs: dict[str, _Conv] = {}
    functional: list[Node] = []
    for site in sites:
        if site.kind != "conv" or not site.convert:
            continue
        node = nodes.get(site.node)
        if node is not None and node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
            functional.append(node)
            continue
        if node is None or node.op != "call_module" or node.target != site.qualname:
            raise ValueError(f"site {site.qualname!r} (node {site.node!r}) is not a call of that module in this graph")
        conv = gm.get_submodule(site.qualname)
        if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            raise ValueError(f"site {site.qualname!r} is a {type(conv).__name__}, not an nn.Conv2d or nn.Conv3d")
        convs[site.qualname] = conv
        calls.setdefault(site.qualname, [])
        if node not in calls[site.qualname]:
            calls[site.qualname].append(node)

    for qualname, call_nodes in calls.items():
        every_call = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == qualname]
        if len(every_call) != len(call_nodes):
            raise ValueError(
                f"{qualname!r} is called {len(every_call)} times but {len(call_nodes)} of its calls are sites; "
                "decompose needs all of them (the stride belongs to the shared module)"
            )
        conv = convs[qualname]
        stride = tuple(conv.stride)  # a pair (Conv2d) or a triple (Conv3d)
        set_submodule(gm, qualname, stride1_conv(conv))
        for node in call_nodes:
            pool_name = free_name(gm, owner_of(node), "pool")
            set_submodule(gm, pool_name, skip_pool(stride))
            with gm.graph.inserting_after(node):
                pool = gm.graph.call_module(pool_name, (node,))
            reroute_uses(node, pool)
    for node in functional:
        _decompose_call(gm, node)
    return finish(gm)


def _decompose_call(gm: GraphModule, node: Node) -> None:
    """``F.conv2d(x, w, b, s, ...)`` -> ``F.conv2d(x, w, b, 1, ...)`` followed by a skip pool of stride ``s``."""
    dims = _FUNCTIONAL_CONVS[node.target]  # type: ignore[index]
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > _STRIDE_ARG:
        stride, args[_STRIDE_ARG] = args[_STRIDE_ARG], (1,) * dims
    else:
        stride, kwargs["stride"] = kwargs.get("stride", 1), (1,) * dims
    node.args, node.kwargs = tuple(args), kwargs
    pool_name = free_name(gm, owner_of(node), "pool")
    set_submodule(gm, pool_name, skip_pool(_ntuple(dims)(stride)))
    with gm.graph.inserting_after(node):
        pool = gm.graph.call_module(pool_name, (node,))
    reroute_uses(node, pool)


_STRIDE_ARG = 3  # F.conv2d(input, weight, bias, stride, padding, dilation, groups)
