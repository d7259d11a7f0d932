"""Replace pooling layers (skip pools and strided max/avg pools) through a factory."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from torch import nn
from torch.fx import GraphModule

from ._util import ExampleInput, _get, finish, free_name, owner_of, parent_path, set_submodule
from .sites import Site, find_sites

__all__ = ["replace_pools", "Replaced", "PoolFactory"]

#: ``factory(site)`` returns the module to use at ``site``, or None to leave the site as it is.
PoolFactory = Callable[[Site], "nn.Module | None"]



class Replaced(NamedTuple):
    """What :func:`replace_pools` returns: the graph module and the sites that got a module."""

    graph_module: GraphModule
    replaced: list[Site]


_POOL_KINDS = ("max_pool", "avg_pool", "skip")


def replace_pools(
    gm: GraphModule,
    factory: PoolFactory,
    sites: Iterable[Site] | None = None,
    example_input: ExampleInput | None = None,
) -> Replaced:
    """Replace every converting pool site by ``factory(site)``.

    Sites: every ``SkipPool2d`` and every max/avg pool site with ``convert=True`` (module or
    functional call). ``sites`` defaults to ``find_sites(gm, example_input)``; pass the list
    when you already have it (it must describe this graph: nodes are matched by name). Conv
    sites are ignored (:func:`decompose` handles them).

    A skip pool of stride ``s`` reaches the factory as an ``s x s`` pool with stride ``s``,
    padding 0 and ``ceil_mode=True``: PyTorch gives such a pool
    ``floor((H - s + (s - 1)) / s) + 1 = ceil(H / s)`` outputs (its last window starts at
    ``(ceil(H/s) - 1) s < H``, inside the input, so the ceil_mode rule keeps it), which is
    exactly the number of rows ``x[..., ::s]`` keeps, for every ``H`` (odd, and ``H < s`` too).
    Each window is the ``s x s`` cell whose top-left element the skip pool kept.

    Module sites get the new module under the same qualname (a module called from several
    places gets one new module per call, the later ones named ``<name>1``, ...); functional
    calls become a ``call_module`` of a new module named ``site.qualname``. When the factory
    returns None the site is left as it is. Unchanged layers keep their names and parameters;
    the modules that were replaced are not modified (they may be shared with a traced model).

    Graph before / after (``factory`` returns ``GFGPPool2d`` for every site)::

        relu_2 = layer2.0.relu(add)                  relu_2 = layer2.0.relu(add)
        layer2_0_pool = layer2.0.pool(relu_2)  ->    layer2_0_pool = layer2.0.pool(relu_2)
          # SkipPool2d(stride=2)                       # GFGPPool2d(512, kernel_size=2, stride=2, ceil_mode=True)

    Returns:
        :class:`Replaced` ``(graph_module, replaced)``: ``gm`` transformed in place, and the
        sites that got a module, in the order of ``sites``.
    """
    if sites is None:
        sites = find_sites(gm, example_input)
    nodes = {n.name: n for n in gm.graph.nodes}
    replaced: list[Site] = []
    installed: set[str] = set()  # module qualnames this pass has already filled
    for site in sites:
        if site.kind not in _POOL_KINDS or not site.convert:
            continue
        node = nodes.get(site.node)
        if node is None:
            raise ValueError(f"site {site.qualname!r}: no node {site.node!r} in this graph (stale site list?)")
        module = factory(site)
        if module is None:
            continue
        if not isinstance(module, nn.Module):
            raise TypeError(f"factory returned {type(module).__name__} for site {site.qualname!r}; expected an nn.Module or None")
        if node.op == "call_module":
            if node.target != site.qualname:
                raise ValueError(f"site {site.qualname!r} does not match node {node.format_node()}")
            name = site.qualname
            if name in installed:  # a shared pool module: one new module per call site
                name = free_name(gm, parent_path(name), name.rpartition(".")[2], installed)
                node.target = name
            set_submodule(gm, name, module)
            installed.add(name)
        elif node.op == "call_function":
            name = site.qualname
            if name in installed or _get(gm, name) is not None:
                name = free_name(gm, owner_of(node), name.rpartition(".")[2], installed)
            set_submodule(gm, name, module)
            installed.add(name)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        else:
            raise ValueError(f"site {site.qualname!r}: cannot replace node {node.format_node()}")
        replaced.append(site)
    return Replaced(finish(gm), replaced)
