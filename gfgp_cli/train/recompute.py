"""``--activation-checkpointing``: recompute the full-resolution stage of a converted model in the
backward pass instead of keeping its activations.

GFGP moves the strides of a model's early convolutions into pooling layers, so the operations
before the first pool run at the input's full resolution; their activations are most of a
training step's memory. :func:`checkpoint_full_resolution` finds them with torch.fx's ShapeProp
(the operations that read maps of the input's spatial size, up to and including the pools that
end the stage), splits the graph module into that
stage and the rest (``torch.fx.passes.split_module``) and runs the stage under
``torch.utils.checkpoint`` (non-reentrant). The returned module shares every parameter and
buffer with the model (checkpoints keep the model's own state_dict keys).

Recomputing runs the stage's BatchNorm layers a second time; their running statistics are put
back after the recomputation, so they are updated once per step as without checkpointing (and
the random generators are replayed, so dropout draws the same masks). Gradients and statistics
equal those of the plain model up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from ..errors import BadInputError

__all__ = ["checkpoint_full_resolution", "Checkpointed"]


class Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing in training."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._norms = [m for m in inner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, *args):
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), self._statistics_kept()))

    @contextlib.contextmanager
    def _statistics_kept(self) -> Iterator[None]:
        saved = [[b.detach().clone() for b in m.buffers()] for m in self._norms]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, values in zip(self._norms, saved):
                    for b, v in zip(m.buffers(), values):
                        b.copy_(v)


def _spatial(meta) -> Tuple[int, ...]:
    shape = getattr(meta, "shape", None)
    return tuple(shape[2:]) if shape is not None and len(shape) in (4, 5) else ()


def checkpoint_full_resolution(model: nn.Module, example: torch.Tensor) -> Tuple[nn.Module, str]:
    """``(the module to train, a note)``; ``example`` is one input batch (shapes only matter)."""
    if not isinstance(model, fx.GraphModule):
        raise BadInputError(
            "--activation-checkpointing needs a model converted as one traced graph; this one was converted in "
            "parts (or not by gfgp): train it without --activation-checkpointing"
        )
    was_training = model.training
    model.eval()  # shapes only: BatchNorm statistics must not move
    with torch.no_grad():
        ShapeProp(model).propagate(example[:1])
    model.train(was_training)
    full = tuple(example.shape[2:])
    calls = [n for n in model.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    region = set()
    for node in calls:
        inputs = [a for a in node.all_input_nodes if _spatial(a.meta.get("tensor_meta"))]
        if not inputs or any(_spatial(a.meta.get("tensor_meta")) != full for a in inputs):
            break  # the stage ends where an operation no longer reads full-resolution maps
        region.add(node)  # reads full-resolution maps: up to and including the first pools
    if not region or len(region) == len(calls):
        raise BadInputError(
            "--activation-checkpointing found no full-resolution stage to recompute in this model "
            f"(input {'x'.join(map(str, full))}); train it without the option"
        )
    split = split_module(model, model, lambda node: 0 if node in region else 1)
    split.submod_0 = Checkpointed(split.submod_0)
    size = "x".join(map(str, full))
    kinds: List[str] = sorted({type(model.get_submodule(str(n.target))).__name__ for n in region if n.op == "call_module"})
    return split, (f"activation checkpointing: {len(region)} operations at full resolution {size} "
                   f"({', '.join(kinds[:6])}) are recomputed in the backward pass")
