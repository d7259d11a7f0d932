"""The four passes composed: trace, find sites, decompose, move pools, replace pools."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .decompose import decompose
from .move import PlacedPool, move_pools
from .replace import PoolFactory, replace_pools
from .sites import Site, find_sites
from .trace import trace, untraced_state_keys

__all__ = ["pipeline", "Report"]


@dataclass
class Report:
    """What :func:`pipeline` did.

    Attributes:
        sites: every downsampling site of the traced model, converted (``convert``) or skipped
            (with its ``reason``).
        placed: where each skip pool ended up after :func:`move_pools`.
        replaced: the pool sites (skip pools included) the factory returned a module for.
        untraced_state_keys: ``state_dict`` keys of the model that the graph does not use
            (training-only branches such as auxiliary classifiers).
    """

    sites: list[Site]
    placed: list[PlacedPool]
    replaced: list[Site] = field(default_factory=list)
    untraced_state_keys: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[Site]:
        return [s for s in self.sites if s.convert]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if not s.convert]

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (for JSON and checkpoints)."""
        return dataclasses.asdict(self)


def pipeline(
    model_or_gm: nn.Module,
    example_input: torch.Tensor,
    placement: str = "exact",
    factory: PoolFactory | None = None,
    include_patch_embed: bool = False,
) -> tuple[GraphModule, Report]:
    """Trace (unless given a GraphModule), decompose strided convs, move skip pools, replace pools.

    ``example_input`` only feeds shape propagation (on the meta device: its size costs nothing);
    any size the model accepts will do. Shapes are propagated twice: once to find the sites,
    and once after the moves so that each skip pool's site has its channel count. With
    ``factory=None`` the pools stay ``SkipPool2d`` / max / avg pools, and with ``placement``
    "exact" or "local" the result then computes the same function as the model in eval mode.
    A plain model is not modified (the result shares its Parameters); a GraphModule argument is
    transformed in place.
    """
    gm = model_or_gm if isinstance(model_or_gm, GraphModule) else trace(model_or_gm)
    untraced = [] if gm is model_or_gm else untraced_state_keys(model_or_gm, gm)
    sites = find_sites(gm, example_input, include_patch_embed)
    gm = decompose(gm, sites)
    gm, placed = move_pools(gm, placement)
    replaced: list[Site] = []
    if factory is not None:
        gm, replaced = replace_pools(gm, factory, find_sites(gm, example_input, include_patch_embed))
    return gm, Report(sites, placed, replaced, untraced)
