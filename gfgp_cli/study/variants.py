"""The study's variants: what every downsampling site of a network becomes (docs/method.md sections 1-4).

Each variant is one call to :func:`gfgp_cli.convert` on the family's native network, with the
paper's placement, so the study exercises the same conversion path as ``gfgp convert``:

============== ===========================================================================
skip           subsampling everywhere: each site keeps the top-left element of its cell
               (strided convs are decomposed, max-pools become the same subsampling)
max            max pooling at every site (VGG's own pools; ResNet's strided convs too)
avg            average pooling at every site (padding excluded)
maxent         max-entropy pooling with a learned per-channel lam (no global guidance)
gfgp           GFGP: lam from global features, bounded by a sigmoid (docs/method.md section 2)
gfgp-softplus  GFGP with a softplus (lam unbounded above)
nin            VGG only: a NiN block before each max-pool, which stays (docs/method.md section 4)
resnin         VGG only: a residual NiN block before each max-pool, which stays
se             VGG only: a squeeze-and-excitation block before each max-pool, which stays
============== ===========================================================================

The three comparison blocks add exactly GFGP's parameters; they test whether GFGP's gain comes
from its pooling or from the extra parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

__all__ = ["Variant", "VARIANTS", "BASELINES", "resolve_variants", "convert_variant"]


def _skip_everywhere(site) -> nn.Module:
    """Every site (skip, max or avg pool) becomes stride-s subsampling."""
    from graph_passes import SkipPool2d

    return SkipPool2d(site.stride)


@dataclass(frozen=True)
class Variant:
    """One way of downsampling: the arguments of :func:`gfgp_cli.convert` that produce it."""

    name: str
    description: str
    pool: Union[str, Callable] = "skip"
    activation: str = "sigmoid"
    comparison: Optional[str] = None
    families: Tuple[str, ...] = field(default=("vgg", "resnet"))


# Mapping from variant name to its definition, in the order tables and charts list them.
VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("skip", "subsampling (top-left of each cell) at every site", pool=_skip_everywhere),
    Variant("max", "max pooling at every site", pool="max"),
    Variant("avg", "average pooling at every site", pool="avg"),
    Variant("maxent", "max-entropy pooling, learned per-channel lam", pool="maxent"),
    Variant("gfgp", "GFGP, sigmoid-bounded lam", pool="gfgp"),
    Variant("gfgp-softplus", "GFGP, softplus lam", pool="gfgp", activation="softplus"),
    Variant("nin", "NiN block before each max-pool", comparison="nin", families=("vgg",)),
    Variant("resnin", "residual NiN block before each max-pool", comparison="resnin", families=("vgg",)),
    Variant("se", "SE block before each max-pool", comparison="se", families=("vgg",)),
)}

# The fixed (not learned) pools: GFGP is compared with the best of them in each family.
BASELINES = ("skip", "max", "avg")


def resolve_variants(families: Sequence[str], names: Optional[Sequence[str]]) -> List[Tuple[str, Variant]]:
    """``(family, variant)`` pairs to run: every applicable variant when ``names`` is None.

    Unknown names are an error (with a "did you mean" hint); so is a name that applies to none of
    ``families`` (the comparison blocks are VGG-only).
    """
    from ..choices import unknown as _unknown
    from ..errors import BadInputError

    if names is None:
        names = list(VARIANTS)
    if not names:
        raise BadInputError(f"no variants given; choose from {', '.join(VARIANTS)}")
    for name in names:
        if name not in VARIANTS:
            raise _unknown("variant", name, list(VARIANTS))
        if not set(VARIANTS[name].families) & set(families):
            raise BadInputError(
                f"variant {name!r} applies to the {' and '.join(VARIANTS[name].families)} family only; "
                f"add --family {VARIANTS[name].families[0]} or --family all"
            )
    chosen = [n for n in VARIANTS if n in set(names)]  # registry order, duplicates dropped
    return [(family, VARIANTS[n]) for family in families for n in chosen if family in VARIANTS[n].families]


def convert_variant(model: nn.Module, variant: Variant, image_size: int):
    """``(converted GraphModule, ConversionReport)``: ``model`` converted the variant's way with the
    paper's placement; the report has parameters and MACs at ``image_size``."""
    from ..conversion import convert_with_report

    return convert_with_report(model, variant.pool, "paper", activation=variant.activation,
                               comparison=variant.comparison, image_size=image_size, measure=True)
