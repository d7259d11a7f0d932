"""Checks that ``graph_passes.pipeline`` did its work, not only that the output is unchanged.

An output-equality check alone passes for a pipeline that does nothing (a no-op ``decompose`` or
``move_pools`` leaves the model exactly as it was), so the zoo and property tests also run
:func:`assert_work_done` on the result. It reads only the public API: the ``(gm, report)`` that
``pipeline`` returns, the resulting GraphModule's graph and modules, and ``SkipPool2d``; never
``gm.meta`` or the individual passes.

Test modules load this file by its path (``importlib.util.spec_from_file_location``): pytest runs
with ``--import-mode=importlib``, which puts no test directory on ``sys.path``.
"""

from __future__ import annotations

from collections import Counter

from torch import nn
from torch.fx import GraphModule, Node

import graph_passes as gp

__all__ = ["assert_work_done", "skip_pool_calls"]

# torch.fx stores tensors that a forward builds at trace time (MaxViT's indexed
# relative_position_index buffers) as GraphModule attributes with this prefix; they are in the
# converted model's state_dict but not in the original's.
FX_TENSOR_CONSTANT_PREFIX = "_tensor_constant"


def skip_pool_calls(gm: GraphModule) -> list[Node]:
    """The ``call_module`` nodes of ``gm`` that call a SkipPool2d, in graph order."""
    return [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), gp.SkipPool2d)
    ]


def _first_pools_after(node: Node, gm: GraphModule) -> list[Node]:
    """The SkipPool2d calls met first on each path from ``node`` to the output.

    Raises AssertionError when some path reaches the output without meeting one: that value
    would leave the model at full resolution, i.e. the stride was lost.
    """
    found: list[Node] = []
    seen: set[Node] = set()
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            raise AssertionError(f"{node.name}: a path to the output meets no SkipPool2d")
        if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), gp.SkipPool2d):
            found.append(user)
            continue
        stack.extend(user.users)
    return found


def assert_work_done(model: nn.Module, gm: GraphModule, report: gp.Report, placement: str) -> None:
    """Assert that ``gm, report = gp.pipeline(model, x, placement, factory)`` converted ``model``.

    For a factory that replaces nothing (``None`` or ``lambda site: None``):

    - every converted conv site is a stride-(1, 1) Conv2d in ``gm``, and every path from it meets
      a SkipPool2d with the site's stride (or a multiple: pools merged) before the output;
    - the strided convs left in ``gm`` are exactly the sites the report skipped;
    - the SkipPool2d calls of ``gm`` are exactly ``report.placed`` (names, strides, the node each
      follows, graph order), and every converted conv is the source of exactly one placed pool;
    - with placement ``"local"`` no pool moved: one pool per converted conv;
    - ``model`` is unchanged (strides), and its ``state_dict`` loads into ``gm`` with no
      unexpected key (the untraced keys aside) and no missing key other than fx constants.
    """
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    convs = [s for s in report.converted if s.kind == "conv"]
    for site in convs:
        node = nodes.get(site.node)
        assert node is not None and node.op == "call_module" and node.target == site.qualname, (
            f"converted site {site.qualname}: node {site.node!r} no longer calls it"
        )
        conv = modules[site.qualname]
        assert isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (1, 1), (
            f"converted site {site.qualname}: conv still has stride {tuple(conv.stride)}"
        )
        # The pipeline installs a new conv; the model's own module must keep its stride.
        assert tuple(model.get_submodule(site.qualname).stride) == site.stride, f"{site.qualname}: model modified"
        pools = _first_pools_after(node, gm)
        assert pools, f"converted site {site.qualname}: no SkipPool2d follows it"
        strides = {modules[str(p.target)].stride for p in pools}
        # A pool moved past a pointwise conv onto the next site's pool merges with it (s2 then s2
        # is one exact s4 skip pool): the pool's stride is a multiple of the site's.
        assert strides and all(len(p) == len(site.stride) and all(a % b == 0 for a, b in zip(p, site.stride))
                               for p in strides), f"converted site {site.qualname}: stride {site.stride}, pools {strides}"

    strided_left = {name for name, m in modules.items() if isinstance(m, nn.Conv2d) and max(m.stride) > 1}
    # Skipped conv sites include functional F.conv2d calls, which name no module.
    skipped_convs = {s.qualname for s in report.skipped if s.kind == "conv" and s.qualname in modules}
    assert strided_left == skipped_convs, (
        f"strided convs left {sorted(strided_left)} != skipped conv sites {sorted(skipped_convs)}"
    )

    in_graph = [(str(n.target), modules[str(n.target)].stride, n.args[0].name) for n in skip_pool_calls(gm)]
    reported = [(p.qualname, tuple(p.stride), p.after_node) for p in report.placed]
    assert in_graph == reported, f"skip pools in the graph {in_graph} != report.placed {reported}"
    # Pools merge at joins but are never duplicated: each decomposed conv feeds exactly one.
    sources = Counter(src for p in report.placed for src in p.sources)
    assert sources == Counter(s.qualname for s in convs), (
        f"placed pools' sources {dict(sources)} != converted convs {[s.qualname for s in convs]}"
    )
    if placement == "local":
        assert not any(p.moved for p in report.placed), "placement 'local' moved a pool"
        assert len(report.placed) == len(convs)

    untraced = set(report.untraced_state_keys)
    result = gm.load_state_dict({k: v for k, v in model.state_dict().items() if k not in untraced}, strict=False)
    assert not result.unexpected_keys, f"keys of the model that the converted one lacks: {result.unexpected_keys}"
    missing = [k for k in result.missing_keys if not k.startswith(FX_TENSOR_CONSTANT_PREFIX)]
    assert not missing, f"keys of the converted model that the original lacks: {missing}"

