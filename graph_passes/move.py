"""Move skip pools forward through the ops they commute with, merging them at joins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn
from torch.fx import GraphModule, Node

from ._util import finish, free_name, input_node, node_label, owner_of, reroute_uses, set_submodule
from .commute import Rule, rule, size_classes
from .sites import _has_plain_conv_forward
from .skip_pool import SkipPool, skip_pool

__all__ = ["move_pools", "Moved", "PlacedPool", "PLACEMENTS"]

#: Accepted ``placement`` values, see :func:`move_pools`.
PLACEMENTS = ("paper", "exact", "local")


@dataclass(frozen=True)
class PlacedPool:
    """Where one skip pool ended up.

    Attributes:
        qualname: the skip pool module's name after the pass.
        stride: its stride ``(h, w)`` (3-D: ``(t, h, w)``).
        after: the op it follows, readable: the module it calls (``layer2.0.relu``) or, for a
            function call, its owner and function (``Conv2d_1a_3x3.relu``).
        after_node: the name of that op's fx node (unique; a module called twice has two).
        sources: where the pools merged into it started: the module feeding each skip pool when
            the pass began (after ``decompose``, the decomposed conv), in graph order.
        moved: False when the pool was left where it was.
    """

    qualname: str
    stride: tuple[int, ...]
    after: str
    after_node: str
    sources: tuple[str, ...]
    moved: bool


class Moved(NamedTuple):
    """What :func:`move_pools` returns: the graph module and where each skip pool went."""

    graph_module: GraphModule
    placed: list[PlacedPool]


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def move_pools(gm: GraphModule, placement: str = "exact") -> Moved:
    """Move every skip pool (``SkipPool2d``, ``SkipPool3d``) forward to where the placement puts it; record where they went.

    Invariant (``"exact"`` and ``"local"``): the eval-mode output is unchanged for every input
    size. ``"paper"`` deliberately changes it (docs/method.md section 3), as described below.

    Placements:
        ``"local"``: nothing moves.

        ``"exact"``: a pool moves past every op that commutes exactly with ``x[..., ::s, ::s]`` (3-D: ``x[..., ::s, ::s, ::s]``):
        BatchNorm with running statistics (incl. ``FrozenBatchNorm2d``), elementwise activations
        (modules, functions, methods, in-place variants), dropout (identity in eval mode),
        ``Identity``, ``StochasticDepth``, 1x1 stride-1 unpadded convs (any groups), and
        elementwise add/sub/mul/div/maximum/minimum/pow and ``torch.cat`` along dim 0 or 1 when
        *every* tensor operand carries the same pending pool; the pools then merge into one.
        Scalars are fine, and so are parameters/buffers of spatial size 1 (e.g. a ``(C, 1, 1)``
        layer scale); any other operand blocks, in particular an SE-style ``x * scale`` where
        ``scale`` is computed from ``x`` by global pooling (pooling ``x`` first changes ``scale``).
        "The same pending pool" means the same stride *and* provably equal pre-pool sizes: each
        value's size is tracked as (root value, offset) through size-preserving ops and stride-1
        convs (``H + 2p - d(k-1)``), so operands merge only if they are equal for every input.
        A value moves on only if *all* its users accept it, and only if that does not split the
        pool into copies that never meet again; otherwise the pool lands right after the value.
        Spatial convs, pools, global pooling, reshapes, ``size()`` and unknown ops always block.

        ``"paper"``: as exact, and additionally a pool may pass a stride-1 spatial conv that
        keeps the size (``2p = d(k-1)``, e.g. 3x3 pad 1) when, following single-user
        conv/BN/activation ops forward, it reaches a join whose other operand carries a pool from
        a *different* strided op along an exact path (the decomposed strided shortcut of a
        downsampling residual block). After the join it continues as exact, so it lands after
        the block's final activation: the official GFGP layout of ResNet-18/34, and the same as
        exact for bottleneck ResNets. Output sizes are unchanged because only size-keeping convs
        are passed; the values change (the conv now sees the un-pooled map). Before that, paper
        composes consecutive pools (exactly): a pool whose single-user path reaches the next skip
        pool through exact unary ops and stride-1 convs with kernel 1 and no padding along every
        dim it subsamples merges into that pool (``x[::a][::b] == x[::ab]``); R(2+1)D's (1, 2, 2)
        spatial and (2, 1, 1) temporal pools become the block's one (2, 2, 2) pool.

    Graph before / after (``exact``, ResNet-50 ``layer2.0`` after :func:`decompose`)::

        conv2 = layer2.0.conv2(relu)                 conv2 = layer2.0.conv2(relu)
        layer2_0_pool = layer2.0.pool(conv2)         bn2 = layer2.0.bn2(conv2)
        bn2 = layer2.0.bn2(layer2_0_pool)            ...
        ...                                          downsample_0 = layer2.0.downsample.0(x)
        downsample_0 = layer2.0.downsample.0(x)      downsample_1 = layer2.0.downsample.1(downsample_0)
        layer2_0_downsample_pool = ...(downsample_0) add = bn3 + downsample_1
        downsample_1 = ...(layer2_0_downsample_pool) relu_2 = layer2.0.relu(add)
        add = bn3 + downsample_1                     layer2_0_pool = layer2.0.pool(relu_2)
        relu_2 = layer2.0.relu(add)

    Naming: a pool that lands after node ``n`` is named ``<owner>.pool`` (``pool1``, ``pool2``,
    ... when taken), ``<owner>`` being the innermost module owning ``n``: the parent of the
    module ``n`` calls, or the module whose forward made a functional call (``layer2.0.pool``
    after ``layer2.0.relu``; ``pool`` after ResNet's top-level stem ``relu``). Pools that merge
    away are removed first, and new names are given in graph order, so names are deterministic.
    Pools that do not move keep their names.

    Returns:
        :class:`Moved` ``(graph_module, placed)``: ``gm`` transformed in place, and a
        :class:`PlacedPool` per remaining skip pool, in graph order (plain strings and ints).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    modules = dict(gm.named_modules())
    order = list(gm.graph.nodes)
    sources = _skip_pool_calls(order, modules)
    source_label: dict[Node, tuple[str, ...]] = {p: (_label(p),) for p in sources}
    composed: set[Node] = set()
    if placement == "paper":
        composed = _compose_consecutive(gm, modules, sources, source_label)
        modules, order = dict(gm.named_modules()), list(gm.graph.nodes)
        sources = _skip_pool_calls(order, modules)
    stride_of = {p: modules[str(p.target)].stride for p in sources}

    deferred: set[Node] = set()
    if placement != "local" and sources:
        deferred = _deferred_nodes(gm, modules, order, sources, stride_of, allow_paper=placement == "paper")
    placed = _rewrite(gm, order, sources, deferred, stride_of, source_label, composed)
    return Moved(finish(gm), placed)


def _skip_pool_calls(order: list[Node], modules: dict[str, nn.Module]) -> list[Node]:
    return [
        n for n in order
        if n.op == "call_module" and isinstance(modules[str(n.target)], SkipPool)
        and len(n.args) == 1 and not n.kwargs and isinstance(n.args[0], Node)
    ]


def _label(pool: Node) -> str:
    """Where a skip pool started: the module feeding it (the decomposed conv), else the pool."""
    return node_label(input_node(pool)) if input_node(pool).op == "call_module" else str(pool.target)


def _commutes_along(node: Node, modules: dict[str, nn.Module], gm: GraphModule, stride: tuple[int, ...]) -> bool:
    """Whether ``node`` computes exactly the same on values subsampled by ``stride``: an exact
    unary rule (BN, activations, ...), or a stride-1 conv whose kernel is 1 and padding 0 along
    every subsampled dim (a (3, 1, 1) temporal conv under a (1, 2, 2) pool: each output position
    reads its own (h, w) only)."""
    r = rule(node, gm, modules)
    if r is not None and r.mode == "exact" and len(r.pending) == 1:
        return True
    m = modules.get(str(node.target)) if node.op == "call_module" else None
    if not (isinstance(m, (nn.Conv2d, nn.Conv3d)) and _has_plain_conv_forward(m) and max(m.stride) == 1
            and len(m.kernel_size) == len(stride) and len(node.args) == 1 and not node.kwargs):
        return False
    padding = (0,) * len(stride) if isinstance(m.padding, str) else tuple(m.padding)
    if m.padding == "same" and any(k != 1 for k, s in zip(m.kernel_size, stride) if s > 1):
        return False
    return all(k == 1 and p == 0 for k, p, s in zip(m.kernel_size, padding, stride) if s > 1)


def _compose_consecutive(
    gm: GraphModule, modules: dict[str, nn.Module], sources: list[Node], source_label: dict[Node, tuple[str, ...]]
) -> set[Node]:
    """Paper placement: merge a skip pool into the next one when only ops that commute with it
    lie between them, on a single-user path (``x[::a][::b] == x[::a*b]`` per dim).

    R(2+1)D blocks downsample twice in a row: a (1, 2, 2) spatial conv, BatchNorm, ReLU, then a
    (2, 1, 1) temporal conv. The first pool passes BN, ReLU and the temporal conv (kernel 1 in H
    and W) and merges with the second into one (2, 2, 2) pool, which then moves on as any pool
    (the block's pool after its final ReLU, as for the 2-D ResNets). The ops in between now run
    at the un-pooled size; the output is unchanged. Returns the pools that absorbed another;
    ``source_label`` gets the absorbed pool's origins.
    """
    composed: set[Node] = set()
    for a in sources:
        if a.graph is not gm.graph or len(input_node(a).users) != 1:
            continue
        pool_a = gm.get_submodule(str(a.target))  # already merged into, maybe
        assert isinstance(pool_a, SkipPool)
        stride_a = pool_a.stride
        cur = a
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            target = gm.get_submodule(str(user.target)) if user.op == "call_module" else None
            if isinstance(target, SkipPool) and user in source_label and len(target.stride) == len(stride_a):
                merged = tuple(x * y for x, y in zip(stride_a, target.stride))
                set_submodule(gm, str(user.target), skip_pool(merged))
                source_label[user] = source_label[a] + source_label[user]
                composed.add(user)
                target_a = str(a.target)
                a.replace_all_uses_with(input_node(a))
                gm.graph.erase_node(a)
                if not any(n.op == "call_module" and n.target == target_a for n in gm.graph.nodes):
                    gm.delete_submodule(target_a)
                break
            if not _commutes_along(user, modules, gm, stride_a):
                break
            cur = user
    return composed


def _deferred_nodes(
    gm: GraphModule,
    modules: dict[str, nn.Module],
    order: list[Node],
    sources: list[Node],
    stride_of: dict[Node, tuple[int, ...]],
    allow_paper: bool,
) -> set[Node]:
    """The nodes that will compute on un-pooled values (the "deferred" set S).

    Starts from every node that has a rule, then removes nodes until these all hold:
    (1) every pending operand of a node in S is in S or is a movable source pool, and all carry
        one key (stride, size class);
    (2) a value's users are all in S or none is (a value with a blocking user is pooled there);
    (3) a value with several users in S reaches one single landing point (no duplicated pools);
    (4) "paper" convs reach a join with an exact operand whose pools come from other sources.
    Each round that changes anything removes at least one node and removals are never undone,
    so the loop ends, and its result depends only on the graph (rounds scan in graph order).
    """
    rules = {n: r for n in order if (r := rule(n, gm, modules)) is not None}
    if not allow_paper:
        rules = {n: r for n, r in rules.items() if r.mode == "exact"}
    classes = size_classes(gm, rules, modules)
    # A source can dissolve only if it is the single user of its input: otherwise in-place ops on
    # the un-pooled value would be seen by the input's other users.
    movable = {p for p in sources if len(input_node(p).users) == 1}
    # A source's input is never deferred: a pending pool arriving there lands before it (the
    # strided op it came from), which keeps every source's key fixed and the loop monotone.
    deferred = set(rules) - {input_node(p) for p in sources}

    while True:
        changed = False
        # (1) keys, sources and exactness, in graph order.
        key: dict[Node, tuple[Any, ...]] = {}
        srcs: dict[Node, frozenset[Node]] = {}
        inexact: dict[Node, bool] = {}
        for n in order:
            if n in movable:
                key[n] = (stride_of[n], classes[input_node(n)])
                srcs[n], inexact[n] = frozenset({n}), False
            elif n in deferred:
                pending = rules[n].pending
                keys = {key[o] for o in pending if o in key}
                if any(o not in key for o in pending) or len(keys) != 1:
                    deferred.discard(n)
                    changed = True
                    continue
                key[n] = keys.pop()
                srcs[n] = frozenset().union(*(srcs[o] for o in pending))
                inexact[n] = rules[n].mode == "paper" or any(inexact[o] for o in pending)
        carriers = [n for n in order if n in key]
        # (2) all users or none.
        for d in carriers:
            in_s = [u for u in d.users if u in deferred]
            if in_s and len(in_s) < len(d.users):
                deferred.difference_update(in_s)
                changed = True
        # (4) paper-only moves must end at a join with a differently sourced strided shortcut.
        for n in [n for n in order if n in deferred and rules[n].mode == "paper" and n in key]:
            if not _reaches_shortcut_join(n, deferred, rules, srcs, inexact):
                deferred.discard(n)
                changed = True
        # (3) no duplication: a fork inside S must join again before its pool lands.
        landing: dict[Node, frozenset[Node]] = {}
        for n in reversed(carriers):
            users = list(n.users)
            if users and all(u in deferred for u in users):
                landing[n] = frozenset().union(*(landing.get(u, frozenset()) for u in users))
            else:
                landing[n] = frozenset({n}) if users else frozenset()
        for n in carriers:
            users = list(n.users)
            if len(users) > 1 and all(u in deferred for u in users) and len(landing[n]) > 1:
                deferred.difference_update(users)
                changed = True
        if not changed:
            return deferred


def _reaches_shortcut_join(
    n: Node, deferred: set[Node], rules: dict[Node, Rule], srcs: dict[Node, frozenset[Node]], inexact: dict[Node, bool]
) -> bool:
    """Follow single users from ``n`` through unary ops to a join; check its other operands."""
    cur = n
    while True:
        users = list(cur.users)
        if len(users) != 1 or users[0] not in deferred:
            return False
        user = users[0]
        pending = rules[user].pending
        if len(pending) > 1:
            return any(
                o is not cur and o in srcs and not inexact[o] and srcs[o].isdisjoint(srcs[cur]) for o in pending
            )
        cur = user


def _rewrite(
    gm: GraphModule,
    order: list[Node],
    sources: list[Node],
    deferred: set[Node],
    stride_of: dict[Node, tuple[int, ...]],
    source_label: dict[Node, tuple[str, ...]],
    composed: set[Node],
) -> list[PlacedPool]:
    """Dissolve the sources whose users are deferred, then pool each deferred value whose users
    are not. Deferred nodes keep their place and now read un-pooled operands."""
    dissolved = [p for p in sources if p.users and all(u in deferred for u in p.users) and len(input_node(p).users) == 1]
    # Where pools land: deferred values whose users are not deferred (by rule (2), none of them).
    # Decided before dissolving, which hands a dissolved source's users to its input.
    landings = [m for m in order if m in deferred and m.users and not any(u in deferred for u in m.users)]
    position = {n: i for i, n in enumerate(order)}
    # Mapping from each deferred node / dissolved source to the sources its pending pool merges.
    origin: dict[Node, tuple[Node, ...]] = {p: (p,) for p in dissolved}
    stride: dict[Node, tuple[int, ...]] = {p: stride_of[p] for p in dissolved}
    for n in order:
        if n in deferred:
            operands = [o for o in n.all_input_nodes if o in origin]
            origin[n] = tuple(dict.fromkeys(p for o in operands for p in origin[o]))
            stride[n] = stride[operands[0]]

    for p in dissolved:
        target = str(p.target)
        p.replace_all_uses_with(input_node(p))
        gm.graph.erase_node(p)
        if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            gm.delete_submodule(target)

    kept = set(sources) - set(dissolved)
    placed: dict[Node, PlacedPool] = {
        p: PlacedPool(str(p.target), stride_of[p], node_label(input_node(p)), input_node(p).name, source_label[p],
                      p in composed)
        for p in kept
    }
    for m in landings:
        name = free_name(gm, owner_of(m), "pool")
        set_submodule(gm, name, skip_pool(stride[m]))
        with gm.graph.inserting_after(m):
            pool = gm.graph.call_module(name, (m,))
        reroute_uses(m, pool)
        labels = tuple(label for p in sorted(origin[m], key=position.__getitem__) for label in source_label[p])
        placed[pool] = PlacedPool(name, stride[m], node_label(m), m.name, labels, True)
    final_position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [placed[n] for n in sorted(placed, key=final_position.__getitem__)]
