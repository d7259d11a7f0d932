"""Models that torch.fx cannot trace whole: convert their largest traceable parts, in a copy.

Detection models, optical-flow models and many research models have a ``forward`` with
data-dependent Python (loops over a list of images, ``if`` on a tensor, an iterative update),
so :func:`~graph_passes.trace` fails on the root. Their downsampling, though, lives in plain
submodules (a backbone, an encoder) that do trace. Often only one kind of block fails (an
attention block with an ``if`` on a shape, a conv with input-dependent padding): that block
is kept whole, as one leaf node, and the model around it traces. This pass, read top to bottom::

    plan   = find_parts(model)                       # largest traceable submodules with pool/conv nodes,
                                                     # untraceable blocks kept whole (their parts inside too)
    inputs = capture_inputs(model, example, plan)    # each part's arguments in one eval forward
    for part in plan.parts: part.graph_module = transform(part, inputs[part])   # e.g. the pipeline
    install the transformed parts into a deep copy of the model, at their qualified names

The glue between the parts (detection heads, region proposals, an update loop) stays Python and
runs as before. Qualified names are kept, so the model's ``state_dict`` keys load into the result.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule

from ._util import ExampleInput, example_args, parent_path
from .sites import is_strided_conv, is_strided_functional_conv, pool_kind
from .trace import TraceError, trace

__all__ = ["Untraced", "Part", "Plan", "Converted", "find_parts", "capture_inputs", "convert_parts", "first_line"]


@dataclass(frozen=True)
class Untraced:
    """A module left as Python: its qualified name (``""`` for the root), class and why."""

    qualname: str
    type: str
    reason: str


@dataclass
class Part:
    """A submodule that traces and holds candidate downsampling nodes.

    Attributes:
        qualname: where it sits in the model (``""`` when the whole model traces).
        graph_module: its trace (shares leaf modules with the model it was traced from).
        example: its positional arguments as seen in the example forward (:func:`capture_inputs`).
    """

    qualname: str
    graph_module: GraphModule
    example: tuple[Any, ...] = ()


class Plan(NamedTuple):
    """What :func:`find_parts` returns: the parts to convert, and the modules left as Python."""

    parts: list[Part]
    untraced: list[Untraced]


def first_line(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    line = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _has_candidates(gm: GraphModule) -> bool:
    """Whether the graph calls a strided conv or a pool (the sites decide the rest)."""
    modules = dict(gm.named_modules())
    return any(is_strided_conv(n, modules) or is_strided_functional_conv(n) or pool_kind(n, modules) is not None
               for n in gm.graph.nodes)


def _has_forward(m: nn.Module) -> bool:
    """False for containers (ModuleList, ModuleDict) and helpers called only through methods."""
    return type(m).forward is not nn.Module.forward


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _trace_keeping_whole(m: nn.Module, leaves: tuple[type[nn.Module], ...]) -> tuple[GraphModule | None, dict[str, str]]:
    """Trace ``m``, keeping whole each submodule whose forward fails: ``(graph or None, kept)``.

    Each failure names the innermost module whose forward failed (:class:`TraceError`); that
    module becomes a leaf and ``m`` is traced again, until it traces. ``kept`` maps the leaves'
    qualified names (relative to ``m``), in the order found, to the first line of their error.
    When ``m``'s own forward fails the graph is None and ``kept`` is ``{"": reason}``.
    """
    kept: dict[str, str] = {}
    while True:
        try:
            return trace(m, leaves, kept), kept
        except TraceError as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            if e.qualname == "<root>" or e.qualname in kept:
                return None, {"": first_line(cause)}
            kept[e.qualname] = first_line(cause)


def find_parts(model: nn.Module, leaf_modules: Iterable[type[nn.Module]] = ()) -> Plan:
    """The largest submodules of ``model`` that trace and call a strided conv or a pool.

    Starting at the root: a module is traced, keeping whole (as one leaf node) each submodule
    whose own forward fails to trace (:func:`_trace_keeping_whole`); it is a part when its graph
    has candidate nodes (else there is nothing to convert in it, and it is left alone). Each
    block kept whole is recorded as :class:`Untraced` (reason ``"kept whole: ..."``) and its
    children are tried in turn, so a strided conv inside it is still converted. A module whose
    own forward does not trace is recorded as :class:`Untraced` (with the first line of the
    tracer's error) and its children are tried in turn. Modules without a ``forward`` of their
    own (``ModuleList``, ``ModuleDict``, helpers called through methods) are not reported:
    their children are tried. The model is not modified.
    """
    leaves = tuple(leaf_modules)
    parts: list[Part] = []
    untraced: list[Untraced] = []

    def children(m: nn.Module, qualname: str) -> None:
        for name, child in m.named_children():
            visit(child, _join(qualname, name))

    def visit(m: nn.Module, qualname: str) -> None:
        if not _has_forward(m):
            children(m, qualname)
            return
        gm, kept = _trace_keeping_whole(m, leaves)  # leaves m as it was, even when it fails
        if gm is None:
            untraced.append(Untraced(qualname, type(m).__name__, kept[""]))
            children(m, qualname)
            return
        if _has_candidates(gm):
            parts.append(Part(qualname, gm))
        for name, why in kept.items():
            block = m.get_submodule(name)
            untraced.append(Untraced(_join(qualname, name), type(block).__name__, f"kept whole: {why}"))
            children(block, _join(qualname, name))

    visit(model, "")
    return Plan(parts, untraced)


def _positional(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``module(*args, **kwargs)``'s arguments as a positional tuple (a trace has placeholders only)."""
    if not kwargs:
        return args
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def capture_inputs(model: nn.Module, example_input: ExampleInput, qualnames: Iterable[str]) -> dict[str, tuple[Any, ...]]:
    """The positional arguments each named submodule receives first when ``model`` runs.

    Runs ``model(*example_input)`` once in eval mode under ``torch.no_grad`` with forward
    pre-hooks on the named submodules, then removes the hooks and restores every training flag.
    A submodule called several times keeps its first call's arguments; one that is not called
    for this input is absent from the result.
    """
    wanted = list(qualnames)
    seen: dict[str, tuple[Any, ...]] = {}
    handles = []
    for q in wanted:
        sub = model.get_submodule(q)

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], q: str = q) -> None:
            seen.setdefault(q, _positional(m, args, kwargs))

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*example_args(example_input))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return seen


class Converted(NamedTuple):
    """What :func:`convert_parts` returns.

    Attributes:
        model: a deep copy of the model with every converted part installed.
        parts: ``(qualname, what transform returned besides the graph module)`` per part, in
            model order.
        untraced: the modules left as Python, and parts the transform could not convert.
    """

    model: nn.Module
    parts: list[tuple[str, Any]]
    untraced: list[Untraced]


# GraphModule.__deepcopy__ rebuilds the module from its graph and sets again only the attributes
# listed under this key of its ``meta`` (torch.fx's own name for it).
_PRESERVED = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def _keep_attributes(original: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the plain attributes of ``original`` that it lacks (a patch embedding's
    ``grid_size``): the Python around a converted part reads them, and a GraphModule keeps only
    what its graph uses. Submodules, parameters and buffers are not plain attributes. On a
    GraphModule they are also recorded where its deepcopy looks for them."""
    kept = {name: value for name, value in vars(original).items() if not name.startswith("_") and not hasattr(new, name)}
    for name, value in kept.items():
        setattr(new, name, value)
    if kept and isinstance(new, GraphModule):
        new.meta.setdefault(_PRESERVED, {}).update(kept)


def convert_parts(
    model: nn.Module,
    example_input: ExampleInput,
    transform: Callable[[GraphModule, tuple[Any, ...]], tuple[nn.Module, Any]],
    leaf_modules: Iterable[type[nn.Module]] = (),
) -> Converted:
    """Apply ``transform(graph_module, example_args) -> (new_module, record)`` to each part.

    The parts are those of :func:`find_parts` on a deep copy of ``model`` (``model`` itself is
    never modified and shares nothing with the result); their example arguments come from one
    forward of the copy on ``example_input`` (:func:`capture_inputs`). Each new module replaces
    its part at the part's qualified name, with the part's plain attributes that it lacks (the
    Python around it may read them). A part whose transform raises ``ValueError`` (e.g.
    shape propagation failed) or that the example forward never calls is left unconverted and
    reported in ``untraced`` with the reason.
    """
    work = copy.deepcopy(model)
    plan = find_parts(work, leaf_modules)
    untraced = list(plan.untraced)
    inputs = capture_inputs(work, example_input, [p.qualname for p in plan.parts]) if plan.parts else {}
    done: list[tuple[str, Any]] = []
    for part in plan.parts:
        original = work.get_submodule(part.qualname)
        if part.qualname not in inputs:
            untraced.append(Untraced(part.qualname, type(original).__name__, "not called in eval mode for the example input"))
            continue
        part.example = inputs[part.qualname]
        try:
            new, record = transform(part.graph_module, part.example)
        except ValueError as e:
            untraced.append(Untraced(part.qualname, type(original).__name__, first_line(e)))
            continue
        if part.qualname:
            _keep_attributes(original, new)
            parent = work.get_submodule(parent_path(part.qualname))
            setattr(parent, part.qualname.rpartition(".")[2], new)
        else:
            work = new
        done.append((part.qualname, record))
    return Converted(work, done, untraced)
