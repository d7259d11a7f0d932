"""Symbolic tracing of classification models into a GraphModule with the original qualnames."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterable, Iterator

from torch import nn
from torch.fx import GraphModule, Tracer

from .sites import _has_plain_conv_forward
from .skip_pool import SkipPool
from .stride1 import AtStride1

__all__ = ["TraceError", "LeafTracer", "register_leaf_module", "trace", "untraced_state_keys"]


class TraceError(ValueError):
    """A model could not be traced; ``qualname`` names the module whose forward failed."""

    def __init__(self, message: str, qualname: str = "") -> None:
        super().__init__(message)
        self.qualname = qualname


def _default_leaf_types() -> list[type[nn.Module]]:
    types: list[type[nn.Module]] = [SkipPool]
    try:  # torchvision is optional for the passes themselves
        from torchvision.ops.misc import FrozenBatchNorm2d
        from torchvision.ops.stochastic_depth import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is installed with the project
        return types
    # FrozenBatchNorm2d: one node that move_pools knows to commute, instead of its buffers' maths.
    # StochasticDepth: traced through it would freeze `self.training` into the graph.
    return types + [FrozenBatchNorm2d, StochasticDepth]


class LeafTracer(Tracer):
    """A ``torch.fx.Tracer`` that keeps registered module types as single ``call_module`` nodes.

    ``LeafTracer.leaf_types`` (extend it with :func:`register_leaf_module`) holds the types every
    trace keeps whole: pooling layers that a conversion inserts must stay one node per pool when
    a converted model is traced again. ``leaf_modules`` adds types for one tracer only, and
    ``leaf_names`` the modules at those qualified names (the partial-tracing pass keeps an
    untraceable block whole so). Modules of ``torch.nn`` other than ``Sequential`` are leaves too (the ``torch.fx`` default), and so
    are subclasses of ``nn.Conv2d`` / ``nn.Conv3d`` that keep the conv's forward (torchvision's
    video ResNets build their convs as such subclasses): they compute exactly a conv, so they
    stay the one ``call_module`` node that a site is.

    While tracing, the qualified names of the modules being traced are kept on a stack so a
    failure can name the innermost one (:class:`TraceError`).
    """

    #: Module types every LeafTracer keeps as one node (skip pools and pool layers register here).
    leaf_types: ClassVar[list[type[nn.Module]]] = _default_leaf_types()

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = (), leaf_names: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra_leaf_types = tuple(leaf_modules)
        self.leaf_names = frozenset(leaf_names)
        # Qualified names of the modules whose forward is running, outermost first.
        self.scope_stack: list[str] = []
        # The stack as it was where the first exception was raised.
        self.failed_scope: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # AtStride1: decompose's stride-1 copy of a conv subclass (tracing it would enter its mode).
        if (isinstance(m, (*self.leaf_types, *self.extra_leaf_types, AtStride1)) or _has_plain_conv_forward(m)
                or module_qualified_name in self.leaf_names):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.scope_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_scope is None:
                self.failed_scope = list(self.scope_stack)
            raise
        finally:
            self.scope_stack.pop()


@contextlib.contextmanager
def _state_restored(m: nn.Module) -> Iterator[None]:
    """Undo attribute writes that a forward makes while being traced.

    Some modules cache values on their first call (torchvision's ``MultiScaleRoIAlign`` sets
    ``self.scales``); under the tracer those values are Proxies, which would break every later
    real call. Each module's attributes are put back as they were, whatever the trace did.
    """
    saved = [(sub, dict(sub.__dict__)) for sub in m.modules()]
    try:
        yield
    finally:
        for sub, attrs in saved:
            sub.__dict__.clear()
            sub.__dict__.update(attrs)


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Make every :class:`LeafTracer` keep ``cls`` as one node. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    if cls not in LeafTracer.leaf_types:
        LeafTracer.leaf_types.append(cls)
    return cls


def trace(model: nn.Module, leaf_modules: Iterable[type[nn.Module]] = (), leaf_names: Iterable[str] = ()) -> GraphModule:
    """Trace ``model`` into a ``GraphModule`` that computes the same function in eval mode.

    Invariant: ``trace(model)(x) == model(x)`` in eval mode, and every leaf module keeps its
    qualified name, so ``model.state_dict()`` keys load into the result (and into what the
    other passes make of it).

    - Python control flow that reads ``self.training`` is resolved as in eval mode (the model is
      put in eval mode while tracing, then every module's flag is restored). Submodules used only
      in training, such as the auxiliary classifiers of GoogLeNet and Inception-v3, are therefore
      not part of the graph; :func:`untraced_state_keys` lists their ``state_dict`` keys.
    - Leaf modules are shared with ``model`` (the ``torch.fx`` convention); the passes never
      modify them in place, they install new modules instead.
    - A ``GraphModule`` is traced again, which is harmless and makes registered leaves whole.
    - ``leaf_modules`` (types) and ``leaf_names`` (qualified names) are kept as one node each.
    - The model is left as it was, even when tracing fails: attributes a forward writes while
      being traced (values cached on the first call, which would be Proxies) are put back.

    Raises:
        TraceError: with the qualified name of the module whose forward failed ("<root>" for the
            model's own forward).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace expects an nn.Module, got {type(model).__name__}")
    tracer = LeafTracer(leaf_modules, leaf_names)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _state_restored(model):  # GraphModule copies what the graph reads (tensor constants) first
            graph = tracer.trace(model)
            gm = GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as e:
        scope = tracer.failed_scope or []
        qualname = scope[-1] if scope else ""
        where = f"module '{qualname}' ({type(model.get_submodule(qualname)).__name__})" if qualname else "<root>"
        raise TraceError(
            f"cannot trace {type(model).__name__}: {type(e).__name__}: {e} [failed in {where}]",
            qualname=qualname or "<root>",
        ) from e
    finally:
        for m, flag in flags.items():
            m.training = flag
    # GraphModule creates fresh containers on the paths to the leaves; give them the original flags.
    for name, sub in gm.named_modules():
        orig = _maybe_submodule(model, name)
        if orig is not None:
            sub.training = orig.training
    return gm


def untraced_state_keys(model: nn.Module, gm: nn.Module) -> list[str]:
    """``state_dict`` keys of ``model`` that its trace ``gm`` does not use, sorted.

    These belong to submodules that run only in training mode (auxiliary classifiers), which
    :func:`trace` resolves away; loading ``model``'s weights into ``gm`` must skip them.
    """
    return sorted(set(model.state_dict()) - set(gm.state_dict()))


def _maybe_submodule(model: nn.Module, qualname: str) -> nn.Module | None:
    try:
        return model.get_submodule(qualname)
    except AttributeError:
        return None

