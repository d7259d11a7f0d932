"""Insert a module in front of pooling sites (comparison modules, attention blocks, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from torch import nn
from torch.fx import GraphModule

from ._util import ExampleInput, finish, free_name, owner_of
from .sites import Site, find_sites

__all__ = ["insert_before_pools", "Inserted"]



class Inserted(NamedTuple):
    """What :func:`insert_before_pools` returns: the graph module and the qualnames it added."""

    graph_module: GraphModule
    inserted: list[str]



def insert_before_pools(
    gm: GraphModule,
    factory: Callable[[Site], "nn.Module | None"],
    name: str,
    sites: Iterable[Site] | None = None,
    example_input: ExampleInput | None = None,
    kinds: tuple[str, ...] = ("max_pool", "avg_pool"),
) -> Inserted:
    """Feed every converting pool site of the given ``kinds`` through ``factory(site)`` first.

    The pool itself is unchanged; only its input is rerouted through the new module, which must
    keep the shape of ``Tensor[N, site.channels, H, W]``. New modules are named ``name``,
    ``name1``, ... under the module that owns the pool (``features.nin``, ``features.nin1``).
    ``sites`` defaults to ``find_sites(gm, example_input)``; factory returning None skips a site.

    Graph before / after (``factory`` returns ``NiNBlock``)::

        features_5 = features.5(features_4)        features_nin = features.nin(features_4)
        features_6 = features.6(features_5)  ->    features_5 = features.5(features_nin)  # MaxPool2d
    """
    if sites is None:
        sites = find_sites(gm, example_input)
    nodes = {n.name: n for n in gm.graph.nodes}
    added: list[str] = []
    for site in sites:
        if site.kind not in kinds or not site.convert:
            continue
        module = factory(site)
        if module is None:
            continue
        node = nodes[site.node]
        qualname = free_name(gm, owner_of(node), name, set(added))
        gm.add_submodule(qualname, module)
        source = node.args[0]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(qualname, (source,))
        new.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
        node.replace_input_with(source, new)
        added.append(qualname)
    return Inserted(finish(gm), added)
