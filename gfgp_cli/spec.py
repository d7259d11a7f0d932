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

    {"version": 4,
     "source": {"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10},
                "weights_backbone": None},
     "task": "classification", "parts": [""],
     "torchvision_version": "0.29.1", "pool": "gfgp", "placement": "paper",
     "activation": "sigmoid", "include_patch_embed": False, "comparison": None,
     "image_size": 224, "in_channels": 3, "frames": None, "weights": None, "new_parameters": None,
     "sites": [{...graph_passes.Site fields...}, ...]}

Versions (bump :data:`SPEC_VERSION` and teach :meth:`ConversionSpec.from_dict` the old form):
    1: the first release: no "version" and no "in_channels" key (always 3); a user's module
       source recorded its class under "class"; a pool given as a callable was not recorded.
    2: typed spec: "version", "in_channels", module source under "qualname", pool "custom"
       for a callable pool (its name under "pool_name").
    3: every torchvision task: "task" (classification before), "parts" (the converted
       submodules of a model torch.fx cannot trace whole; [""] before: the whole model), and
       a torchvision source's "weights_backbone" (None before).
    4: video models: "frames", the example clip's length T (None before, and for image models);
       sites of 3-D ops have (t, h, w) triples.
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
SPEC_VERSION = 4

#: ``ConversionSpec.pool`` for a pool given as a callable (it cannot be replayed by name).
CUSTOM_POOL = "custom"

# Keyword options of the conversion itself: a torchvision source's constructor arguments are
# passed next to them when the spec is replayed, so they may not use these names.
_CONVERSION_OPTIONS = frozenset({"pool", "placement", "weights", "weights_backbone", "activation", "include_patch_embed",
                                 "image_size", "in_channels", "frames", "comparison", "seed", "measure", "task"})

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
    """A torchvision model built by name: ``torchvision.models.get_model(name, **kwargs)``.

    ``weights_backbone`` records the backbone weights a detection or segmentation model was
    built with (None: random); a replay builds without them (the checkpoint holds the weights).
    """

    kind: ClassVar[str] = "torchvision"
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights_backbone: Optional[str] = None

    def describe(self) -> str:
        return self.name

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "kwargs": dict(self.kwargs), "weights_backbone": self.weights_backbone}

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
        weights_backbone = data.get("weights_backbone")
        if weights_backbone is not None and not isinstance(weights_backbone, str):
            raise _spec_error(f"damaged (weights_backbone of {name} is not a name)")
        return cls(name, dict(kwargs), weights_backbone)


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
        frames: a video model's example clip length T (the example is ``Tensor[2, in_channels,
            frames, image_size, image_size]``); None for image models.
        weights: the weights loaded before converting (a torchvision weights name or a file),
            or None when the model starts from random weights.
        new_parameters: names of the parameters that did not come from ``weights`` (the
            conversion's new layers, a re-built classifier); None without ``weights``.
        sites: every downsampling site the passes found (``graph_passes.Site``), converted or not;
            in a model converted part by part, qualnames are the model's (``backbone.body.conv1``).
        task: the torchvision task family (``gfgp_cli.choices.TASKS``): what the model takes
            and returns; ``"classification"`` for a user's module (a ``Tensor[N, C, H, W]``).
        parts: qualified names of the converted submodules when torch.fx could not trace the
            whole model (``("backbone",)``); ``("",)`` when it could.
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
    frames: Optional[int] = None
    task: str = "classification"
    parts: Tuple[str, ...] = ("",)
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
            "frames": self.frames,
            "task": self.task,
            "parts": list(self.parts),
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
                frames=None if data.get("frames") is None else _positive_int(data, "frames"),
                task=_task(data),
                parts=_parts(data),
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


def _task(data: Mapping[str, Any]) -> str:
    from .choices import TASKS

    task = data.get("task", "classification")
    if task not in TASKS:
        raise _spec_error(f"damaged (unknown task {task!r:.40})")
    return str(task)


def _parts(data: Mapping[str, Any]) -> Tuple[str, ...]:
    parts = data.get("parts", [""])
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, str) for p in parts):
        raise _spec_error("damaged (parts must be a non-empty list of module names)")
    return tuple(parts)


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
    """Record ``spec`` on a converted model; returns the model.

    The spec goes in ``model.meta`` (a GraphModule's, or for a model converted part by part, a
    plain ``meta`` dict gfgp adds to the copy of the model it returns).
    """
    if not isinstance(spec, ConversionSpec):
        raise TypeError(f"attach_spec expects a ConversionSpec, got {type(spec).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_spec records the spec on the model gfgp_cli.convert returns, got {type(model).__name__}")
    meta = model.meta if isinstance(model, GraphModule) else model.__dict__.setdefault("meta", {})
    if not isinstance(meta, dict):
        raise TypeError(f"{type(model).__name__} has a 'meta' attribute that is not a dict; gfgp cannot record its spec")
    meta[_META_KEY] = spec
    return model
