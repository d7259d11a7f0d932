"""The conversion spec: what a conversion did, typed, versioned, and replayable.

A :class:`ConversionSpec` records everything needed to rebuild a converted model without
pickling code: where the model came from (a tagged :data:`Source`), how it was converted (pool,
placement, options), what the passes found (the sites), and what the weights are (which
parameters are new). :func:`gfgp_cli.convert` attaches one to every model it returns;
:mod:`gfgp_cli.checkpoint` writes it with :meth:`ConversionSpec.to_dict` and reads it with
:meth:`ConversionSpec.from_dict` (the only writer and the only reader of the plain form), and
replays it to rebuild the model.

Plain form (what a checkpoint's ``"spec"`` entry holds; primitives, tuples and lists only, so it
loads with ``torch.load(weights_only=True)``)::

    {"version": 2,
     "source": {"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
     "torchvision_version": "0.29.1", "pool": "gfgp", "placement": "paper",
     "activation": "sigmoid", "include_patch_embed": False, "comparison": None,
     "image_size": 224, "in_channels": 3, "weights": None, "new_parameters": None,
     "sites": [{...graph_passes.Site fields...}, ...]}

Versions (bump :data:`SPEC_VERSION` and teach :meth:`ConversionSpec.from_dict` the old form):
    1: the first release: no "version" and no "in_channels" key (always 3); a user's module
       source recorded its class under "class"; a pool given as a callable was not recorded.
    2: typed spec: "version", "in_channels", module source under "qualname", pool "custom"
       for a callable pool (its name under "pool_name").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, Union

from torch import nn
from torch.fx import GraphModule

from graph_passes import Site

from .errors import BadInputError

__all__ = [
    "SPEC_VERSION", "ConversionSpec", "Source", "TorchvisionSource", "ModuleSource", "SOURCE_KINDS",
    "CUSTOM_POOL", "spec_of", "attach_spec",
]

#: Version of the spec's plain form written by this code (see the module docstring).
SPEC_VERSION = 2

#: ``ConversionSpec.pool`` for a pool given as a callable (it cannot be replayed by name).
CUSTOM_POOL = "custom"

# Keyword options of the conversion itself: a torchvision source's constructor arguments are
# passed next to them when the spec is replayed, so they may not use these names.
_CONVERSION_OPTIONS = frozenset({"pool", "placement", "weights", "activation", "include_patch_embed", "image_size",
                                 "in_channels", "comparison", "seed", "measure"})

# The attribute of a converted model that holds its spec (GraphModule.meta is torch.fx's place
# for such annotations; it survives deepcopy and re-compiles).
_META_KEY = "gfgp_spec"


def _spec_error(problem: str) -> BadInputError:
    return BadInputError(f"the checkpoint's conversion spec is {problem}; re-convert the model with `gfgp convert`")


# ---------------------------------------------------------------------------------------------
# Sources: where the model came from (a tagged value; each kind has its own dataclass)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision model built by name: ``torchvision.models.get_model(name, **kwargs)``."""

    kind: ClassVar[str] = "torchvision"
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return self.name

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int) -> "TorchvisionSource":
        name, kwargs = data.get("name"), data.get("kwargs", {})
        if not isinstance(name, str) or not name:
            raise _spec_error("damaged (its torchvision source has no model name)")
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise _spec_error(f"damaged (the constructor arguments of {name} are not a dict of names)")
        taken = sorted(set(kwargs) & _CONVERSION_OPTIONS)
        if taken:
            raise _spec_error(f"damaged (constructor arguments {taken} of {name} are conversion options)")
        return cls(name, dict(kwargs))


@dataclass(frozen=True)
class ModuleSource:
    """A user's own ``nn.Module`` instance; ``qualname`` is its class (``package.module.Class``).

    The spec cannot rebuild the user's code: loading needs an instance (``load(path, module=...)``).
    """

    kind: ClassVar[str] = "module"
    qualname: str

    @classmethod
    def of(cls, module: nn.Module) -> "ModuleSource":
        return cls(f"{type(module).__module__}.{type(module).__qualname__}")

    def describe(self) -> str:
        return self.qualname

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "qualname": self.qualname}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int) -> "ModuleSource":
        qualname = data.get("class" if version == 1 else "qualname")
        if not isinstance(qualname, str):
            raise _spec_error("damaged (its module source has no class name)")
        return cls(qualname)


#: A model source. New kinds (timm models, a user's factory) are new dataclasses with a ``kind``
#: tag, ``describe``/``to_dict``/``from_dict``, added here and to :data:`SOURCE_KINDS`.
Source = Union[TorchvisionSource, ModuleSource]

#: Mapping from the plain form's ``"kind"`` tag to the source class that reads it.
SOURCE_KINDS: Dict[str, Type[Any]] = {cls.kind: cls for cls in (TorchvisionSource, ModuleSource)}


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionSpec:
    """One conversion, recorded (frozen: change it with :meth:`replace`).

    Attributes:
        source: where the model came from (:class:`TorchvisionSource` or :class:`ModuleSource`).
        pool: the pool name (one of ``gfgp_cli.choices.POOLS``), or :data:`CUSTOM_POOL` for a
            callable, whose ``__name__`` is ``pool_name``.
        placement, activation, include_patch_embed, comparison: the conversion options.
        image_size, in_channels: the example input ``Tensor[2, in_channels, image_size,
            image_size]`` that shape propagation saw (and the size the model was converted for).
        weights: the weights loaded before converting (a torchvision weights name or a file),
            or None when the model starts from random weights.
        new_parameters: names of the parameters that did not come from ``weights`` (the
            conversion's new layers, a re-built classifier); None without ``weights``.
        sites: every downsampling site the passes found (``graph_passes.Site``), converted or not.
        torchvision_version: the torchvision that built the model (replaying it elsewhere must
            find the same sites).
    """

    source: Source
    pool: str
    placement: str
    activation: str
    image_size: int
    sites: Tuple[Site, ...]
    torchvision_version: str
    in_channels: int = 3
    include_patch_embed: bool = False
    comparison: Optional[str] = None
    weights: Optional[str] = None
    new_parameters: Optional[Tuple[str, ...]] = None
    pool_name: Optional[str] = None

    @property
    def model_name(self) -> str:
        """The model, readable: a torchvision name or the user's class."""
        return self.source.describe()

    @property
    def replayable_pool(self) -> bool:
        """Whether the pool can be rebuilt by name (False for a callable pool)."""
        return self.pool != CUSTOM_POOL

    def replace(self, **changes: Any) -> "ConversionSpec":
        return dataclasses.replace(self, **changes)

    # -- the plain form (the only writer and the only reader) --------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The plain form of the current :data:`SPEC_VERSION` (see the module docstring)."""
        return {
            "version": SPEC_VERSION,
            "source": self.source.to_dict(),
            "torchvision_version": self.torchvision_version,
            "pool": self.pool,
            "pool_name": self.pool_name,
            "placement": self.placement,
            "activation": self.activation,
            "include_patch_embed": self.include_patch_embed,
            "comparison": self.comparison,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "weights": self.weights,
            "new_parameters": None if self.new_parameters is None else list(self.new_parameters),
            "sites": [s.as_dict() for s in self.sites],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ConversionSpec":
        """Read any version's plain form; raise BadInputError (one line) when it is damaged."""
        if not isinstance(data, Mapping):
            raise _spec_error("missing")
        version = data.get("version", 1)  # the first release wrote no version
        if not isinstance(version, int) or version < 1:
            raise _spec_error(f"damaged (version {version!r})")
        if version > SPEC_VERSION:
            raise BadInputError(
                f"the checkpoint's conversion spec has version {version}, newer than this gfgp understands "
                f"({SPEC_VERSION}); upgrade gfgp"
            )
        try:
            source_data = data["source"]
            kind = source_data["kind"]
            if kind not in SOURCE_KINDS:
                raise _spec_error(f"of an unknown source kind {kind!r}")
            source = SOURCE_KINDS[kind].from_dict(source_data, version)
            new_parameters = data.get("new_parameters")
            return cls(
                source=source,
                pool=str(data["pool"]),
                pool_name=data.get("pool_name"),
                placement=str(data["placement"]),
                activation=str(data.get("activation", "sigmoid")),
                include_patch_embed=bool(data.get("include_patch_embed", False)),
                comparison=data.get("comparison"),
                image_size=_positive_int(data, "image_size"),
                in_channels=_positive_int(data, "in_channels", 3),
                weights=data.get("weights"),
                new_parameters=None if new_parameters is None else tuple(new_parameters),
                sites=tuple(Site(**s) for s in data["sites"]),
                torchvision_version=str(data.get("torchvision_version", "unknown")),
            )
        except BadInputError:
            raise
        except KeyError as e:
            raise _spec_error(f"incomplete (missing {e})") from e
        except (TypeError, ValueError) as e:
            raise _spec_error(f"damaged ({type(e).__name__}: {str(e)[:120]})") from e


# ---------------------------------------------------------------------------------------------
# The spec on a converted model
# ---------------------------------------------------------------------------------------------


def _positive_int(data: Mapping[str, Any], key: str, default: Optional[int] = None) -> int:
    """``data[key]`` as a positive int; a string, a bool or a float is damage, not a value."""
    value = data[key] if default is None else data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _spec_error(f"damaged ({key} must be a positive integer, got {value!r:.40})")
    return value


def spec_of(model: nn.Module) -> ConversionSpec:
    """The spec :func:`gfgp_cli.convert` attached to ``model`` (unwraps DDP and torch.compile)."""
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile's wrapper
    meta = getattr(inner, "meta", None)
    spec = meta.get(_META_KEY) if isinstance(meta, dict) else None
    if not isinstance(spec, ConversionSpec):
        raise BadInputError(
            f"{type(model).__name__} was not made by gfgp_cli.convert, so it has no conversion spec to save; "
            "convert it first (gfgp_cli.convert(model))"
        )
    return spec


def attach_spec(model: nn.Module, spec: ConversionSpec) -> nn.Module:
    """Record ``spec`` on a converted model (a GraphModule); returns the model."""
    if not isinstance(spec, ConversionSpec):
        raise TypeError(f"attach_spec expects a ConversionSpec, got {type(spec).__name__}")
    if not isinstance(model, GraphModule):
        raise TypeError(
            f"attach_spec records the spec on the torch.fx.GraphModule gfgp_cli.convert returns, got {type(model).__name__}"
        )
    model.meta[_META_KEY] = spec
    return model
