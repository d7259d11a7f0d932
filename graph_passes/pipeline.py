"""The four passes composed: trace, find sites, decompose, move pools, replace pools."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.fx import GraphModule

from ._util import ExampleInput
from .decompose import decompose
from .move import PlacedPool, move_pools
from .partial import Untraced, convert_parts
from .replace import PoolFactory, replace_pools
from .sites import Site, find_sites
from .trace import TraceError, trace, untraced_state_keys

__all__ = ["pipeline", "Report"]

_NO_SITES = "no downsampling sites"


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
        parts: qualified names of the converted graph modules: ``[""]`` when the whole model
            traced, else the submodules :func:`~graph_passes.partial.convert_parts` converted.
            In the lists above, names inside a part are prefixed with the part's name (the
            module's qualified name in the result), and node names with ``part:``.
        untraced: modules left as Python (with the tracer's reason) in a partial conversion.
    """

    sites: list[Site]
    placed: list[PlacedPool]
    replaced: list[Site] = field(default_factory=list)
    untraced_state_keys: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=lambda: [""])
    untraced: list[Untraced] = field(default_factory=list)

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
    example_input: ExampleInput,
    placement: str = "exact",
    factory: PoolFactory | None = None,
    include_patch_embed: bool = False,
    partial: bool = False,
) -> tuple[nn.Module, Report]:
    """Trace (unless given a GraphModule), decompose strided convs, move skip pools, replace pools.

    ``example_input`` (a tensor, or a tuple of the forward's positional arguments) only feeds
    shape propagation (on the meta device: its size costs nothing); any size the model accepts
    will do. Shapes are propagated twice: once to find the sites, and once after the moves so
    that each skip pool's site has its channel count. With ``factory=None`` the pools stay
    ``SkipPool2d`` / max / avg pools, and with ``placement`` "exact" or "local" the result then
    computes the same function as the model in eval mode. A plain model is not modified (the
    result shares its Parameters); a GraphModule argument is transformed in place.

    A model that torch.fx cannot trace whole raises :class:`TraceError`, unless ``partial``:
    then the model's largest traceable parts are converted in a deep copy
    (:func:`~graph_passes.partial.convert_parts`; the example forward runs once, for real, to
    give each part its input) and the result is that copy, a plain ``nn.Module``.
    """
    if isinstance(model_or_gm, GraphModule):
        return _convert(model_or_gm, example_input, placement, factory, include_patch_embed, [])
    try:
        gm = trace(model_or_gm)
    except TraceError:
        if not partial:
            raise
        return _convert_partial(model_or_gm, example_input, placement, factory, include_patch_embed)
    return _convert(gm, example_input, placement, factory, include_patch_embed, untraced_state_keys(model_or_gm, gm))


def _convert(gm: GraphModule, example_input: ExampleInput, placement: str, factory: PoolFactory | None,
             include_patch_embed: bool, untraced: list[str]) -> tuple[GraphModule, Report]:
    sites = find_sites(gm, example_input, include_patch_embed)
    gm = decompose(gm, sites)
    gm, placed = move_pools(gm, placement)
    replaced: list[Site] = []
    if factory is not None:
        gm, replaced = replace_pools(gm, factory, find_sites(gm, example_input, include_patch_embed))
    return gm, Report(sites, placed, replaced, untraced)


def _convert_partial(model: nn.Module, example_input: ExampleInput, placement: str, factory: PoolFactory | None,
                     include_patch_embed: bool) -> tuple[nn.Module, Report]:
    def transform(part: GraphModule, args: tuple[Any, ...]) -> tuple[nn.Module, Report]:
        gm, report = _convert(part, args, placement, factory, include_patch_embed, [])
        if not report.sites:
            raise ValueError(_NO_SITES)  # nothing to convert: the module stays as it was
        return gm, report

    result = convert_parts(model, example_input, transform)
    merged = Report([], [], parts=[], untraced=[u for u in result.untraced if not u.reason.endswith(_NO_SITES)])
    for qualname, report in result.parts:
        merged.parts.append(qualname)
        merged.sites += [_prefixed(s, qualname) for s in report.sites]
        merged.placed += [_prefixed_pool(p, qualname) for p in report.placed]
        merged.replaced += [_prefixed(s, qualname) for s in report.replaced]
    merged.untraced_state_keys = untraced_state_keys(model, result.model)
    return result.model, merged


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _prefixed(site: Site, part: str) -> Site:
    return dataclasses.replace(site, node=f"{part}:{site.node}", qualname=_join(part, site.qualname))


def _prefixed_pool(pool: PlacedPool, part: str) -> PlacedPool:
    return dataclasses.replace(
        pool, qualname=_join(part, pool.qualname), after=_join(part, pool.after), after_node=f"{part}:{pool.after_node}",
        sources=tuple(_join(part, s) for s in pool.sources),
    )
