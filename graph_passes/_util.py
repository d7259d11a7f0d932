"""Helpers shared by the passes: clean-up, naming of new modules, shape propagation."""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
from collections.abc import Set
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

__all__: list[str] = []  # private module

#: What feeds shape propagation: one tensor (``Tensor[N, C, H, W]`` for a CNN), or a tuple of
#: the forward's positional arguments (tensors, or lists and dicts of them: a detection
#: backbone's ``OrderedDict`` of feature maps, an optical-flow model's two images).
ExampleInput = Any


def example_args(example_input: ExampleInput) -> tuple[Any, ...]:
    """``example_input`` as the tuple of positional arguments of a forward."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


def describe_example(example_input: ExampleInput) -> str:
    """The shapes of an example input, readable (``(2, 3, 224, 224)``; ``[(3, 320, 320), ...]``)."""
    shapes = pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, example_args(example_input))
    text = ", ".join(str(a) for a in shapes)
    return text if len(text) <= 120 else text[:117] + "..."


def finish(gm: GraphModule) -> GraphModule:
    """The clean-up every pass ends with, so a broken graph fails in the pass that broke it."""
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def parent_path(qualname: str) -> str:
    """``"layer2.0.conv1"`` -> ``"layer2.0"``; a top-level name -> ``""`` (the root)."""
    return qualname.rpartition(".")[0]


def owner_of(node: Node) -> str:
    """Qualified name of the innermost module whose ``forward`` produced ``node``.

    A ``call_module`` node belongs to the parent of the module it calls (``layer2.0.relu`` ->
    ``layer2.0``); other nodes take the innermost entry of the tracer's standard
    ``nn_module_stack`` metadata; nodes without it (inputs, nodes built by hand) belong to the
    root (``""``).
    """
    if node.op == "call_module":
        return parent_path(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return ""


def input_node(node: Node) -> Node:
    """``node.args[0]`` where the caller relies on it being a node (the input of a pool call).

    Narrows the ``Argument`` union of ``Node.args`` for the type checker; a constant there is a
    graph no pass makes, and raises TypeError.
    """
    x = node.args[0]
    if not isinstance(x, Node):
        raise TypeError(f"node {node.name!r}: expected a node as its first argument, got {type(x).__name__}")
    return x


def reroute_uses(node: Node, new: Node) -> None:
    """Make every user of ``node`` read ``new`` instead, except ``new`` itself (which reads
    ``node``): how a node inserted right after ``node`` takes its place."""
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def node_label(node: Node) -> str:
    """A readable name for a node: the module it calls (``layer2.0.relu``), or for a function or
    method call the owner and the function (``Conv2d_1a_3x3.relu``), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        return _join(owner_of(node), getattr(node.target, "__name__", node.name))
    if node.op == "call_method":
        return _join(owner_of(node), str(node.target))
    return node.name


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def free_name(gm: GraphModule, owner: str, base: str, taken: Set[str] = frozenset()) -> str:
    """First of ``owner.base``, ``owner.base1``, ``owner.base2``, ... that names nothing yet.

    ``owner`` falls back to its parent (and finally to the root) while it is a module that a
    ``call_module`` node calls: new modules go into containers, never inside a leaf layer whose
    ``state_dict`` they would change. A base that is not purely alphabetic (``max_pool2d``)
    gets ``_1``, ``_2``, ... instead.
    """
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    while owner and (owner in called or not isinstance(_get(gm, owner), (nn.Module, type(None)))):
        owner = parent_path(owner)
    container = _get(gm, owner)
    sep = "" if base.isalpha() else "_"
    for i in range(10_000):
        name = base if i == 0 else f"{base}{sep}{i}"
        qualname = _join(owner, name)
        if qualname in taken:
            continue
        if container is None or not hasattr(container, name):
            return qualname
    raise RuntimeError(f"no free module name {base!r} under {owner!r}")  # pragma: no cover


def _get(gm: nn.Module, qualname: str) -> object:
    """The attribute at ``qualname`` (``gm`` itself for ``""``), or None when it does not exist."""
    obj: object = gm
    for item in qualname.split(".") if qualname else ():
        obj = getattr(obj, item, None)
        if obj is None:
            return None
    return obj


def set_submodule(gm: GraphModule, qualname: str, module: nn.Module) -> None:
    """Install ``module`` at ``qualname``, creating empty containers on the way.

    Only containers of ``gm`` are modified, never the module previously at ``qualname``, so the
    model ``gm`` was traced from (which shares its leaf modules with ``gm``) is left alone.
    """
    if not gm.add_submodule(qualname, module):
        raise ValueError(f"cannot install a module at {qualname!r}: a non-module attribute is in the way")


def _mutable(value: Any) -> Any:
    """Plain lists and dicts for torch.fx's immutable argument containers (nested)."""
    if isinstance(value, list):  # torch.fx's immutable_list is a list subclass
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    if type(value).__name__ == "immutable_dict":
        return {k: _mutable(v) for k, v in value.items()}
    return value


class _CallerOwnedArgs(ShapeProp):
    """ShapeProp whose calls get plain list and dict arguments, as the generated code passes them.

    The interpreter hands a node's list literals over as torch.fx's immutable lists, while a
    GraphModule's generated Python passes fresh lists; functions that mutate an argument they
    were given (Swin3D's ``_get_window_and_shift_size``) run in the model but fail in ShapeProp.
    """

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_function(target, _mutable(args), _mutable(kwargs))

    def run_node(self, n: Node) -> Any:
        # ShapeProp prints a traceback before it re-raises; what a node prints is passed on when
        # it runs, and a failure becomes one NodeFailed that names the node.
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                result = super().run_node(n)
        except RuntimeError as e:
            if e.__cause__ is None or not str(e).startswith("ShapeProp error for"):
                raise
            raise NodeFailed(n, e.__cause__) from e.__cause__
        sys.stderr.write(printed.getvalue())
        return result


class NodeFailed(RuntimeError):
    """A node of a graph failed during shape propagation; ``node`` and ``error`` say which and why."""

    def __init__(self, node: Node, error: BaseException) -> None:
        self.node, self.error = node, error
        gm = node.graph.owning_module
        if node.op == "call_module" and gm is not None:
            what = type(gm.get_submodule(str(node.target))).__name__
        else:
            what = getattr(node.target, "__name__", str(node.target))
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(" While executing")[0]
        super().__init__(f"at {node.name} ({what}): {first}")


class _ShapePropRunner(nn.Module):
    """Lets ``torch.func.functional_call`` swap ``gm``'s tensors for the duration of a ShapeProp."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> object:
        return _CallerOwnedArgs(self.gm).propagate(*args)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def propagate_shapes(gm: GraphModule, example_input: ExampleInput) -> None:
    """Fill ``node.meta['tensor_meta']`` for every node with torch.fx ShapeProp.

    ShapeProp runs first on the ``meta`` device: the input and every parameter and buffer are
    replaced by data-less meta tensors through ``torch.func.functional_call`` (shapes only, no
    arithmetic, no copies: ~0.03 s for ResNet-50 whatever the input size; fake tensors take ten
    times longer). Graphs with ops the meta device cannot run (data-dependent shapes) fall back
    to a real run under ``torch.no_grad``. ``example_input`` is a tensor or a tuple of positional
    arguments (:data:`ExampleInput`). Both run in eval mode and restore every module's
    training flag, so BN running statistics are never updated and ``gm`` is left as it was.
    """
    args = example_args(example_input)
    flags = {m: m.training for m in gm.modules()}
    gm.eval()
    runner = _ShapePropRunner(gm)
    try:
        try:
            tensors = itertools.chain(
                runner.named_parameters(remove_duplicate=False), runner.named_buffers(remove_duplicate=False)
            )
            meta_state = {name: torch.empty_like(t, device="meta") for name, t in tensors}
            # ShapeProp prints a traceback before re-raising; this attempt is allowed to fail.
            with contextlib.redirect_stderr(io.StringIO()):
                torch.func.functional_call(
                    runner, meta_state, pytree.tree_map(_to_meta, args), tie_weights=False, strict=False
                )
            return
        except Exception:  # noqa: BLE001 - any op without a meta kernel: fall back to a real run
            pass
        with torch.no_grad():
            try:
                runner(*args)
            except Exception as e:
                reason = " ".join(str(e).split()).split(" While executing")[0]  # fx appends the node it ran
                raise ValueError(
                    f"shape propagation failed for an input of shape {describe_example(example_input)} {reason}"
                    if isinstance(e, NodeFailed) else
                    f"shape propagation failed for an input of shape {describe_example(example_input)}: {reason}"
                ) from e
    finally:
        for m, flag in flags.items():
            m.training = flag
